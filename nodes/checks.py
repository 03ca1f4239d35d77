"""The one check of a node's inputs against its own schema, made at the start of ``execute`` (every node
with such inputs, the Train nodes included; their own data checks come after it).

ComfyUI range-checks a number typed into a widget, but not one that arrives through a link (a math node, a
primitive, a node of another pack), and it never looks inside an IMAGE, LATENT or MASK. So each node hands its
arguments to ``check_inputs``, which reads the node's declared inputs and refuses, naming the input and what
it expects:

- a FLOAT that is NaN or infinite, or any number outside the widget's declared ``min``/``max``;
- an INT outside its declared ``min``/``max``;
- an IMAGE that is not ``[B, H, W, C]`` with 1, 3 or 4 channels (a 2-channel image is refused, not guessed
  at), is empty, or holds NaN/Inf. The documented conversions, since the pack works on RGB pixels: an RGBA
  image has its alpha channel dropped, a 1-channel (grey) image is repeated into R, G and B;
- a MASK that is not ``[H, W]`` or ``[B, H, W]`` (or image-like: 1, 3 or 4 channels), is empty, or holds
  NaN/Inf;
- a LATENT whose ``samples`` are not a tensor of 4 or 5 dimensions, or hold NaN/Inf.

An optional input left unconnected (None) is not checked. The values are returned, IMAGEs as RGB."""
from __future__ import annotations

import math
import numbers

import torch
from comfy_api.latest import io


def _finite(name: str, tensor: torch.Tensor, what: str) -> None:
    """A ValueError naming the input, the items of the batch (1-based) and how many values are NaN or
    infinite, when any is."""
    if tensor.is_floating_point() or tensor.is_complex():
        bad = ~torch.isfinite(tensor)
        if bool(bad.any()):
            items = bad.flatten(1).any(1) if tensor.dim() > 2 else bad.any()[None]
            which = ", ".join(str(i + 1) for i in torch.nonzero(items).flatten().tolist())
            raise ValueError(f"{name}: {what} {which} of {items.numel()} contains NaN or infinite values "
                             f"({int(bad.sum())} of {tensor.numel()}); expected finite values: the node that made it "
                             f"failed (a VAE or sampler in the wrong precision?)")


def _shape(value) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


def _range(lo, hi) -> str:
    if lo is not None and hi is not None:
        return f"must lie in {lo:g}..{hi:g}"
    if lo is None and hi is None:
        return "must be a finite number"
    return f"must be at least {lo:g}" if lo is not None else f"must be at most {hi:g}"


def check_number(name: str, value, lo=None, hi=None, integer: bool = False):
    """``value`` as a number: finite, within ``[lo, hi]`` where those are given, else a ValueError naming
    ``name``, the value and the range."""
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name}: expected {kind}, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name}: {_range(lo, hi)}, got {value}, which is not a finite number (a value that "
                         f"arrives through a link is not range-checked by ComfyUI)")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{name}: {_range(lo, hi)}, got {value:g} (a value that arrives through a link is not "
                         f"range-checked by ComfyUI)")
    return value


def check_image(name: str, image) -> torch.Tensor:
    """A ComfyUI IMAGE ``[B, H, W, 3]`` (RGBA: the alpha channel dropped; grey ``[B, H, W, 1]``: repeated
    into RGB), finite; else an error naming ``name``."""
    if not isinstance(image, torch.Tensor) or image.dim() != 4 or min(image.shape[:3]) < 1 \
            or image.shape[-1] not in (1, 3, 4):
        hint = ""
        if isinstance(image, torch.Tensor) and image.dim() == 4 and image.shape[-1] not in (1, 3, 4):
            hint = (f" ({image.shape[-1]} channels: not an RGB, RGBA or grey image; turn it into RGB first, e.g. "
                    f"with core's Convert Mask to Image)")
        elif isinstance(image, torch.Tensor) and image.dim() == 3:
            hint = " (a MASK [B,H,W]? connect an IMAGE, or convert the mask with Convert Mask to Image)"
        raise ValueError(f"{name}: expected a ComfyUI IMAGE [B,H,W,3] (RGB; RGBA has its alpha dropped, grey is "
                         f"repeated into RGB), got {_shape(image)}{hint}")
    _finite(name, image, "image")
    if image.shape[-1] == 1:
        return image.repeat(1, 1, 1, 3)
    return image[..., :3] if image.shape[-1] == 4 else image


def check_mask(name: str, mask) -> torch.Tensor:
    """A ComfyUI MASK ``[H, W]`` or ``[B, H, W]`` (or an image-like mask ``[B, H, W, C]`` / ``[B, C, H, W]``
    with 1, 3 or 4 channels, which ``references/masks.py`` turns into one), finite; else an error naming
    ``name``."""
    image_like = isinstance(mask, torch.Tensor) and mask.dim() == 4 and (mask.shape[-1] in (1, 3, 4)
                                                                          or mask.shape[1] in (1, 3, 4))
    if not isinstance(mask, torch.Tensor) or (mask.dim() not in (2, 3) and not image_like) or min(mask.shape) < 1:
        raise ValueError(f"{name}: expected a ComfyUI MASK [H,W] or [B,H,W], got {_shape(mask)}")
    _finite(name, mask, "mask")
    return mask


def check_latent(name: str, latent) -> dict:
    """A ComfyUI LATENT (a dict whose ``samples`` are ``[B, C, H, W]`` or ``[B, C, T, H, W]``), finite; else
    an error naming ``name``."""
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor) or samples.dim() not in (4, 5) or min(samples.shape) < 1:
        got = _shape(samples) if isinstance(latent, dict) else type(latent).__name__
        raise ValueError(f"{name}: expected a ComfyUI LATENT (samples [B,C,H,W]), got {got}")
    _finite(name, samples, "latent")
    return latent


def check_inputs(cls, values: dict) -> dict:
    """Every argument of ``cls.execute`` that the node's schema declares as FLOAT, INT, IMAGE, MASK or
    LATENT, checked as the module says; returns ``values`` with IMAGEs as RGB. Call it first thing in
    ``execute`` with ``locals()``."""
    out = dict(values)
    for inp in cls.define_schema().inputs:
        name = inp.id
        if name not in values or values[name] is None:
            continue
        value = values[name]
        if isinstance(inp, io.Float.Input):
            check_number(name, value, inp.min, inp.max)
        elif isinstance(inp, io.Int.Input):
            check_number(name, value, inp.min, inp.max, integer=True)
        elif isinstance(inp, io.Image.Input):
            out[name] = check_image(name, value)
        elif isinstance(inp, io.Mask.Input):
            out[name] = check_mask(name, value)
        elif isinstance(inp, io.Latent.Input):
            out[name] = check_latent(name, value)
    return out
