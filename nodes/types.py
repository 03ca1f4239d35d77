"""What several node files share: the pack's socket types that pass between node families, and the
checks that unpack a ComfyUI input (IMAGE, CONDITIONING) the same way everywhere."""
from __future__ import annotations

import torch
from comfy_api.latest import io

References = io.Custom("PERSONALIZE_REFERENCE")          # Reference Encode → the attention techniques
EvalModelType = io.Custom("PERSONALIZE_EVAL_MODEL")       # Evaluation Model Loader → the scores and metrics


def check_images(name, images, required=True):
    """A ComfyUI IMAGE ``[B, H, W, C>=3]`` with at least one image, else an error naming the input;
    None for an absent optional input."""
    if images is None and not required:
        return None
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[-1] < 3 or images.shape[0] < 1:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{name}: expected a ComfyUI IMAGE [B,H,W,3], got {shape}")
    return images


def conditioning_tensor(conditioning, name: str = "caption", first_row: bool = True):
    """The text conditioning tensor ``[B, T, D]`` of a CONDITIONING (its first entry), or None."""
    if conditioning is None:
        return None
    try:
        cap = conditioning[0][0]
    except (TypeError, IndexError, KeyError):
        raise ValueError(f"{name}: expected a CONDITIONING from CLIP Text Encode") from None
    if not isinstance(cap, torch.Tensor) or cap.dim() != 3:
        raise ValueError(f"{name}: expected a CONDITIONING from CLIP Text Encode")
    return (cap[:1] if first_row else cap).detach()


def conditioning_pooled(conditioning):
    """The pooled output ``[1, D]`` of a CONDITIONING's first entry, or None when it has none."""
    if conditioning is None:
        return None
    try:
        pooled = conditioning[0][1].get("pooled_output")
    except (TypeError, IndexError, KeyError, AttributeError):
        return None
    if not isinstance(pooled, torch.Tensor) or pooled.dim() != 2:
        return None
    return pooled[:1].detach()
