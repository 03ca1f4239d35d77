"""Naming every input of a reference row exactly, for the reference store (``ref_cache.py``). Pure
torch; ComfyUI's objects arrive as arguments.

A reference row's keys/values at a block depend on the reference (latent, mask, caption), its label,
seed and index, the noise level, the latent size and dtype, the row's other model inputs and the
model (weights with their patches, object patches, other packs' patches). ``reference_digest``,
``row_input_digests`` and ``model_fingerprint`` name these; ``kept_index`` says which tokens of a
row the techniques can select, the only ones the store keeps.
"""
from __future__ import annotations

import hashlib
import weakref

import torch

from .mrsa import reference_layer_mask
from .patch import WRAPPER_KEY

KEEP_MASK, KEEP_ALL = "mask", "all"


class Uncacheable(Exception):
    """An input of the reference rows that cannot be named exactly (the call runs uncached)."""


def tensor_digest(t: torch.Tensor) -> str:
    """SHA-1 of a tensor's dtype, shape and bytes (exact: any changed value changes it)."""
    t = t.detach()
    flat = t.to("cpu").contiguous().reshape(-1)
    h = hashlib.sha1(f"{t.dtype}{tuple(t.shape)}".encode())
    if flat.numel():
        h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def value_digest(value) -> str:
    """A digest of a model input: tensors by content, lists/tuples/dicts element-wise, plain
    scalars by value. Anything else raises ``Uncacheable``."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return repr(value)
    if isinstance(value, torch.Tensor):
        return tensor_digest(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(value_digest(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k!r}:{value_digest(v)}" for k, v in sorted(value.items(), key=lambda kv: repr(kv[0]))) + "}"
    raise Uncacheable(f"model input of type {type(value).__name__}")


_reference_digests: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def reference_digest(reference) -> str:
    """What of a ``Reference`` decides its rows: latent, mask (the tokens kept and, on FLUX, the
    tokens run), soft/hard mask, caption and pooled caption (computed once per object)."""
    hit = _reference_digests.get(reference)
    if hit is None:
        parts = [tensor_digest(reference.latent), tensor_digest(reference.mask), repr(bool(reference.soft_mask)),
                 repr(int(reference.downscale)), value_digest(reference.caption),
                 value_digest(getattr(reference, "caption_pooled", None))]
        hit = hashlib.sha1("|".join(parts).encode()).hexdigest()
        _reference_digests[reference] = hit
    return hit


def _foreign(fn, own_types):
    """The object to name for a patch: another pack's as it is, the pack's own by what it wraps."""
    if isinstance(fn, own_types):
        return getattr(fn, "inner", None)
    return fn


def model_fingerprint(base_model, transformer_options, own_types=()) -> tuple[tuple, list]:
    """``(parts, anchors)`` naming the model a reference row runs through: the model object, its
    weight patches (``patches_uuid``: a LoRA or its strength changes it), object patches, and the
    other packs' attention/block patches, wrappers and attention override. ``anchors``: the
    objects named by identity (an entry is valid only while they live). Raises ``Uncacheable``
    when weight hooks are registered (their weights change per conditioning)."""
    parts: list = [("model", id(base_model))]
    anchors: list = [base_model]
    patcher = getattr(base_model, "current_patcher", None)
    if patcher is not None:
        if getattr(patcher, "hook_patches", None) or getattr(patcher, "current_hooks", None) is not None:
            raise Uncacheable("weight hooks on the model")
        parts.append(("weights", str(getattr(patcher, "patches_uuid", None))))
        for name, obj in sorted((getattr(patcher, "object_patches", None) or {}).items()):
            if obj is None or isinstance(obj, (bool, int, float, str)):
                parts.append(("object", name, repr(obj)))          # a value (memory_usage_factor): by value
            else:
                parts.append(("object", name, id(obj)))
                anchors.append(obj)
    opts = transformer_options or {}
    for kind, fns in sorted((opts.get("patches") or {}).items()):
        for fn in fns or ():
            parts.append(("patch", kind, id(fn)))
            anchors.append(fn)
    for kind, table in sorted((opts.get("patches_replace") or {}).items()):
        for key, fn in sorted((table or {}).items(), key=lambda kv: repr(kv[0])):
            other = _foreign(fn, own_types)
            if other is not None:
                parts.append(("replace", kind, repr(key), id(other)))
                anchors.append(other)
    for kind, table in sorted((opts.get("wrappers") or {}).items()):
        for key, fns in sorted((table or {}).items(), key=lambda kv: repr(kv[0])):
            if key == WRAPPER_KEY:
                continue                     # the pack's own reference pass
            for fn in fns or ():
                parts.append(("wrapper", kind, repr(key), id(fn)))
                anchors.append(fn)
    override = opts.get("optimized_attention_override")
    if override is not None:
        parts.append(("override", id(override)))
        anchors.append(override)
    return tuple(parts), anchors


def kept_index(reference, n_tokens: int, latent_hw: tuple, keep: str) -> torch.Tensor | None:
    """The tokens of ``reference`` kept at a layer of ``n_tokens`` tokens: None for every token
    (``KEEP_ALL``), else the tokens its layer mask covers (hard masks at least half), or, when a
    tiny subject leaves none, every token it touches (DMSA's appearance fallback)."""
    if keep == KEEP_ALL:
        return None
    memo = _kept.setdefault(reference, {})
    key = (int(n_tokens), tuple(latent_hw))
    if key not in memo:
        memo[key] = _mask_index(reference, n_tokens, latent_hw)
    return memo[key]


_kept: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _mask_index(reference, n_tokens: int, latent_hw: tuple) -> torch.Tensor | None:
    m = reference_layer_mask(reference, n_tokens, latent_hw, touched=True)
    idx = torch.nonzero(m.reshape(-1) != 0, as_tuple=False).flatten()
    return None if idx.numel() == n_tokens else idx


def row_input_digests(reqs, src: list, own_caption: list, c_crossattn, concat, kwargs: dict, per_row: set) -> list:
    """Per reference row, a digest of its model inputs besides its latent and noise: the text it
    borrows from target row ``src[i]`` (a row with its own caption is named by the reference),
    its ``c_concat`` row and its other inputs (``kwargs``: per-row values hold the reference rows,
    ``per_row`` names them; others are shared). Raises ``Uncacheable``."""
    memo: dict = {}

    def once(tag, fn):
        if tag not in memo:
            memo[tag] = fn()
        return memo[tag]

    shared = once("shared", lambda: [(n, value_digest(v)) for n, v in sorted(kwargs.items()) if n not in per_row])
    out = []
    for i, s in enumerate(src):
        text = "own" if own_caption[i] or c_crossattn is None else once(("text", s), lambda: tensor_digest(c_crossattn[s]))
        parts = [text, shared, None if concat is None else tensor_digest(concat[i])]
        for n in sorted(per_row):
            v = kwargs[n]
            parts.append((n, value_digest([t[i] for t in v] if isinstance(v, (list, tuple)) else v[i])))
        out.append(hashlib.sha1(repr(parts).encode()).hexdigest())
    return out
