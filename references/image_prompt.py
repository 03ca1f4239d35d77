"""Image prompts for MIP-Adapter (``PERSONALIZE_IMAGE_PROMPT``): the images of one object, the
word of the prompt that names it, an optional region of the generated image and a weight; and the
square framing of the images before the CLIP vision encoder. Pure torch."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .masks import as_mask_batch, fit_box, resize_plane
from .reference import check_image

CROPS = ("center", "pad")


@dataclass(frozen=True, eq=False)
class ImagePrompt:
    """``image``: ``[B, H, W, 3]`` views of one object (their image-prompt tokens are averaged).
    ``entity``: the word of the prompt naming the object. ``mask``: ``[H, W]`` region of the
    generated image the object should take (overrides the entity word's attention map) or None.
    ``crop``: how a non-square image is framed for the CLIP vision encoder."""
    image: torch.Tensor
    entity: str
    weight: float = 1.0
    mask: torch.Tensor | None = None
    crop: str = "center"
    name: str = "image prompt"


def make_image_prompt(image, entity: str, weight: float = 1.0, mask=None, crop: str = "center",
                      name: str = "image prompt") -> ImagePrompt:
    """Checks the inputs of one image prompt and normalises them."""
    check_image(image)
    entity = (entity or "").strip()
    if not entity:
        raise ValueError("entity: empty; give the word of your prompt that names this object (e.g. 'cat')")
    if crop not in CROPS:
        raise ValueError(f"crop: unknown '{crop}'; choose one of {list(CROPS)}")
    m = None
    if mask is not None:
        mb = as_mask_batch(mask, "mask")
        if mb.shape[0] != 1:
            raise ValueError(f"mask: {mb.shape[0]} masks given for one image prompt; give one mask (the region "
                             f"of the generated image this object takes), one per MIP-Adapter Reference")
        m = mb[0].clamp(0, 1).contiguous()
        if float(m.max()) <= 0:
            raise ValueError("mask: the mask is empty, so this object would appear nowhere; draw its region or "
                             "leave the mask unconnected to let the entity word place it")
    return ImagePrompt(image=image[..., :3].float().cpu(), entity=entity, weight=float(weight), mask=m, crop=crop,
                       name=name)


def square_pad(image: torch.Tensor, fill: float = 1.0) -> torch.Tensor:
    """Pad ``[B, H, W, 3]`` to a square with ``fill`` (white, as MIP-Adapter's training crops were),
    the image centred and not resized."""
    _, H, W, _ = image.shape
    if H == W:
        return image
    s = max(H, W)
    top, left, h, w = fit_box(H, W, s, s)
    out = torch.full((image.shape[0], s, s, image.shape[-1]), fill, dtype=image.dtype)
    out[:, top:top + h, left:left + w] = image if (h, w) == (H, W) else \
        resize_plane(image.movedim(-1, 1), h, w).movedim(1, -1)
    return out


def framed(prompt: ImagePrompt) -> torch.Tensor:
    """The images as they go to the CLIP vision encoder (which centre-crops to a square)."""
    return square_pad(prompt.image) if prompt.crop == "pad" else prompt.image


def mean_colour_image(mean, size: int = 224) -> torch.Tensor:
    """An image whose CLIP normalisation is (within 8-bit rounding) zero: the encoder input the
    official plus adapters use for the unconditional image prompt."""
    colour = torch.tensor([round(255 * float(c)) / 255 for c in mean], dtype=torch.float32)
    return colour.view(1, 1, 1, 3).expand(1, size, size, 3).contiguous()
