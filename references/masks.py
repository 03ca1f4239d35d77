"""Mask handling shared by every technique: normalising user masks, fitting them to a target
latent, and resizing them to the token grid of an attention layer. Pure torch."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def as_mask_batch(mask: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """Bring a user mask to a float batch ``[B, H, W]``.

    Accepts ComfyUI MASKs ``[B, H, W]`` or ``[H, W]``, and image-like masks with 1, 3 or 4
    channels, channels-last ``[B, H, W, C]`` (ComfyUI IMAGE) or channels-first ``[B, C, H, W]``.
    A 3-channel mask is reduced to its mean (grey); the alpha channel of RGBA is ignored.
    Values in 0..255 are rescaled to 0..1.
    """
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name}: expected a torch tensor, got {type(mask).__name__}")
    m = mask.detach().float()
    if m.dim() == 2:
        m = m[None]
    elif m.dim() == 4:
        if m.shape[-1] in (1, 3, 4) and m.shape[1] not in (1, 3, 4):
            m = m[..., :3].mean(-1)
        elif m.shape[1] in (1, 3, 4):
            m = m[:, :3].mean(1)
        else:
            m = m[..., :3].mean(-1)
    elif m.dim() != 3:
        raise ValueError(f"{name}: expected a mask of shape [B,H,W], [H,W] or an image-like "
                         f"[B,H,W,C] with 1 or 3 channels, got shape {tuple(mask.shape)}")
    if m.shape[-1] < 1 or m.shape[-2] < 1:
        raise ValueError(f"{name}: mask has an empty spatial size {tuple(mask.shape)}")
    if not torch.isfinite(m).all():
        raise ValueError(f"{name}: mask contains NaN or infinite values")
    if m.max() > 1.0 + 1e-6:
        if m.max() <= 255.0:
            m = m / 255.0
        else:
            raise ValueError(f"{name}: mask values must lie in 0..1 (or 0..255), max is {float(m.max()):.3g}")
    if m.min() < 0:
        raise ValueError(f"{name}: mask values must not be negative, min is {float(m.min()):.3g}")
    return m


def resize_plane(x: torch.Tensor, h: int, w: int, mode: str = "auto") -> torch.Tensor:
    """Resize ``[..., H, W]`` to ``[..., h, w]``: area averaging when shrinking, bilinear when
    growing (``mode='auto'``), so a mask keeps its coverage fraction on coarse grids."""
    H, W = x.shape[-2:]
    if (H, W) == (h, w):
        return x
    lead = x.shape[:-2]
    y = x.reshape(-1, 1, H, W).float()
    if mode == "auto":
        mode = "area" if (h <= H and w <= W) else "bilinear"
    if mode == "bilinear":
        y = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)
    else:
        y = F.interpolate(y, size=(h, w), mode=mode)
    return y.reshape(*lead, h, w).to(x.dtype)


def threshold_mask(mask: torch.Tensor, threshold: float, soft: bool) -> torch.Tensor:
    """Values below ``threshold`` leave the subject (0). Kept values become 1 (hard) or stay as
    they are (soft). Unlike FreeCustom, where only pixels of exactly 255 count, anti-aliased or
    JPEG masks keep their subject."""
    keep = mask >= threshold if threshold > 0 else mask > 0
    if soft:
        return torch.where(keep, mask, torch.zeros_like(mask))
    return keep.to(mask.dtype)


def token_grid(n_tokens: int, height: int, width: int) -> tuple[int, int]:
    """The (h, w) token grid of an attention layer with ``n_tokens`` tokens in a network whose
    input latent is ``height x width``. UNet downsampling halves with rounding up (stride-2
    convolutions with padding 1), so odd sizes are followed exactly."""
    h, w = int(height), int(width)
    while h * w > n_tokens and (h > 1 or w > 1):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    if h * w != n_tokens:
        raise ValueError(f"latent of {height}x{width} does not fit an attention layer with {n_tokens} "
                         f"tokens (no halving of the latent gives that many tokens)")
    return h, w


def layer_mask(mask: torch.Tensor, h: int, w: int, soft: bool) -> torch.Tensor:
    """A pixel mask ``[H, W]`` on the layer's ``h x w`` token grid, flattened row-major to
    ``[h*w]``. Each token takes the fraction of its area that the subject covers; a hard mask
    keeps the tokens covered at least half (value 1), a soft one keeps the covered fraction."""
    cov = resize_plane(mask.float(), h, w)
    if soft:
        return cov.reshape(-1)
    return (cov >= 0.5).float().reshape(-1)


def fit_box(src_h: int, src_w: int, dst_h: int, dst_w: int) -> tuple[int, int, int, int]:
    """Aspect-preserving placement of a ``src`` rectangle inside ``dst`` (letterbox):
    returns (top, left, height, width) in ``dst`` units."""
    scale = min(dst_h / src_h, dst_w / src_w)
    h = max(1, min(dst_h, round(src_h * scale)))
    w = max(1, min(dst_w, round(src_w * scale)))
    return (dst_h - h) // 2, (dst_w - w) // 2, h, w


def letterbox(x: torch.Tensor, dst_h: int, dst_w: int, fill: float = 0.0) -> torch.Tensor:
    """Place ``x`` ``[..., H, W]`` centred in a ``dst_h x dst_w`` plane without distorting its
    aspect; the border is ``fill``."""
    H, W = x.shape[-2:]
    if (H, W) == (dst_h, dst_w):
        return x
    top, left, h, w = fit_box(H, W, dst_h, dst_w)
    inner = resize_plane(x, h, w)
    out = torch.full((*x.shape[:-2], dst_h, dst_w), fill, dtype=x.dtype, device=x.device)
    out[..., top:top + h, left:left + w] = inner
    return out
