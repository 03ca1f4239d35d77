"""The reference object that flows between nodes (``PERSONALIZE_REFERENCE``) and the fitting of a
reference to a target latent. Pure torch."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .masks import as_mask_batch, letterbox, resize_plane, threshold_mask


@dataclass(frozen=True, eq=False)
class Reference:
    """One reference subject.

    ``latent``: ``[1, C, h, w]`` VAE latent as ComfyUI LATENTs hold it (unscaled; the model's
    ``process_latent_in`` is applied at sampling time). ``mask``: ``[h*f, w*f]`` subject mask in
    0..1 on the pixel grid of ``latent`` (``f`` = ``downscale``). ``caption``: ``[1, T, D]`` text
    conditioning of the reference, or None (then the target's positive prompt is used).
    ``caption_pooled``: ``[1, D]`` pooled output of the caption's text encoder, or None (a FLUX
    reference then borrows the prompt's, as its text does without a caption).
    """
    latent: torch.Tensor
    mask: torch.Tensor
    weight: float = 3.0
    soft_mask: bool = False
    caption: torch.Tensor | None = None
    downscale: int = 8
    name: str = "reference"
    caption_pooled: torch.Tensor | None = None
    _fitted: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def channels(self) -> int:
        return int(self.latent.shape[1])

    def fitted(self, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent ``[1, C, height, width]`` and pixel mask ``[height*f, width*f]`` of this
        reference placed in a target latent of ``height x width``: unchanged when the shape
        matches, otherwise scaled without distortion and centred (letterbox); the border is
        outside the mask, so it is never attended to. Cached per shape."""
        key = (int(height), int(width))
        hit = self._fitted.get(key)
        if hit is None:
            f = self.downscale
            lat = letterbox(self.latent.float(), key[0], key[1], fill=0.0)
            msk = letterbox(self.mask.float(), key[0] * f, key[1] * f, fill=0.0)
            hit = (lat, msk)
            self._fitted[key] = hit
        return hit


def fit_image(image: torch.Tensor, resolution: int, multiple: int = 8) -> torch.Tensor:
    """Scale an IMAGE ``[B, H, W, C]`` so its longer side is ``resolution`` (0 keeps the size),
    then crop each side down to a multiple of ``multiple`` pixels (centred)."""
    _, H, W, _ = image.shape
    if resolution > 0:
        s = resolution / max(H, W)
        h, w = max(multiple, round(H * s)), max(multiple, round(W * s))
        if (h, w) != (H, W):
            image = resize_plane(image.movedim(-1, 1), h, w).movedim(1, -1).clamp(0, 1)
    _, H, W, _ = image.shape
    h, w = (H // multiple) * multiple, (W // multiple) * multiple
    if h < multiple or w < multiple:
        raise ValueError(f"image: {H}x{W} px is smaller than {multiple} px on a side")
    top, left = (H - h) // 2, (W - w) // 2
    return image[:, top:top + h, left:left + w, :]


def prepare_masks(mask: torch.Tensor | None, batch: int, height: int, width: int,
                  threshold: float, soft: bool) -> torch.Tensor:
    """User mask (any size, 1 or 3 channels, soft or hard) to ``[batch, height, width]``.
    ``None`` means the whole image is the subject."""
    if mask is None:
        return torch.ones(batch, height, width)
    m = as_mask_batch(mask, "mask")
    if m.shape[0] not in (1, batch):
        raise ValueError(f"mask: batch of {m.shape[0]} masks for {batch} images; give one mask, "
                         f"or one mask per image")
    m = resize_plane(m, height, width).clamp(0, 1)
    m = threshold_mask(m, threshold, soft)
    if m.shape[0] == 1 and batch > 1:
        m = m.expand(batch, -1, -1)
    for i in range(m.shape[0]):
        if float(m[i].max()) <= 0:
            raise ValueError(f"mask: mask {i} is empty after thresholding at {threshold} "
                             f"(every pixel is below the threshold); draw the subject, lower "
                             f"mask_threshold, or leave the mask unconnected to use the whole image")
    return m.contiguous()


def check_image(image: torch.Tensor) -> None:
    if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[-1] not in (1, 3, 4):
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"image: expected a ComfyUI IMAGE [B,H,W,3], got {shape}")
    if image.shape[0] < 1:
        raise ValueError("image: the image batch is empty")
    if not torch.isfinite(image).all():
        raise ValueError("image: contains NaN or infinite values; check the node that produced it")
