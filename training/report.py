"""What a finished training run shows in ComfyUI: the loss curve drawn as an IMAGE and the validation
previews the child wrote, loaded as an IMAGE batch (and one by one for the progress bar)."""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw


def loss_curve_image(losses: list, width: int = 640, height: int = 320) -> torch.Tensor:
    """The loss per step (and its running mean over ~5 % of the steps) as an IMAGE ``[1, H, W, 3]``."""
    im = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(im)
    left, top, right, bottom = 56, 16, width - 12, height - 28
    d.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    vals = [float(v) for v in losses if math.isfinite(float(v))]
    if vals:
        lo, hi = min(vals), max(vals)
        hi = hi if hi > lo else lo + 1e-8
        n = len(vals)

        def xy(i, v):
            x = left + (right - left) * (i / max(1, n - 1))
            return x, bottom - (bottom - top) * (v - lo) / (hi - lo)
        d.line([xy(i, v) for i, v in enumerate(vals)], fill=(150, 170, 230), width=1)
        w = max(1, n // 20)
        run = [sum(vals[max(0, i - w + 1):i + 1]) / len(vals[max(0, i - w + 1):i + 1]) for i in range(n)]
        d.line([xy(i, v) for i, v in enumerate(run)], fill=(20, 60, 200), width=2)
        d.text((4, top), f"{hi:.4g}", fill=(0, 0, 0))
        d.text((4, bottom - 10), f"{lo:.4g}", fill=(0, 0, 0))
        d.text((left, bottom + 6), f"step 1 .. {n}    loss (light) and running mean (dark)", fill=(0, 0, 0))
    return torch.from_numpy(np.asarray(im).astype(np.float32) / 255.0)[None]


def preview_picture(path) -> Image.Image:
    """One preview PNG as an RGB PIL image (the file closed again), for ComfyUI's progress bar."""
    with Image.open(path) as im:
        return im.convert("RGB")


def preview_images(paths: list) -> torch.Tensor:
    """The previews as an IMAGE batch (those of the first one's size); a black 64x64 image for none."""
    if not paths:
        return torch.zeros(1, 64, 64, 3)
    ims = [torch.from_numpy(np.asarray(preview_picture(p)).astype(np.float32) / 255.0) for p in paths]
    shape = ims[0].shape
    return torch.stack([i for i in ims if i.shape == shape])
