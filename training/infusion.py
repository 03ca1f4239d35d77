"""Infusion's learned offsets (docs/algorithms.md §6): the trainable parameters and their file format
(the concept token's position is ``references/prompt_tokens.py``). Pure torch (+ safetensors); no ComfyUI import.

Per cross-attention (attn2) layer two vectors ``Δk, Δv`` of the layer's inner width, added to the
projected key and value of the concept token of the conditional prompt (``attention/infusion.py``).
Layers are keyed as ComfyUI addresses its attention patches, ``(block_name, block_id, block_index)``
(e.g. ``("input", 1, 0)``); on disk they carry the names of the official checkpoint (§6.2), the LDM
path of the layer's projection:

    input_blocks.1.1.transformer_blocks.0.attn2.to_k.target_output     [320]
    input_blocks.1.1.transformer_blocks.0.attn2.to_v.target_output     [320]
    ...
    middle_block.1.transformer_blocks.0.attn2.to_v.target_output       [1280]
    output_blocks.11.1.transformer_blocks.0.attn2.to_v.target_output   [320]

A file of this pack is a safetensors file (``ComfyUI/models/model_patches``) with that key layout and
the metadata ``personalize_kind: infusion``, ``concept_word``, ``base_family`` (``SD1.x``/``SD2.x``),
``widths`` (JSON ``{ldm path: width}``) and ``offsets`` (``kv`` or ``v``). ``load_offsets`` also reads
the official checkpoints: a ``.ckpt``/``.pt`` whose ``target_output`` entry holds those keys (read with
``torch.load(weights_only=True)``), with K and V offsets (the xformers code path) or V offsets only
(the path without xformers, §6.1).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from ..attention.infusion import FAMILIES
from ..files.atomic import atomic_save_safetensors
from ..files.checkpoints import flat_state_dict, read_checkpoint, safetensors_metadata

KIND = "infusion"
FORMAT_VERSION = "1"
_BLOCK_ORDER = {"input": 0, "middle": 1, "output": 2}
_KEY_RE = re.compile(r"^(?:model\.)?(?:diffusion_model\.)?"
                     r"(?:(input|output)_blocks\.(\d+)|(middle)_block)\.(\d+)\.transformer_blocks\.(\d+)"
                     r"\.attn2\.to_([kv])\.target_output$")


# --------------------------------------------------------------------------- layer names

def ldm_path(key: tuple) -> str:
    """The LDM module path of the attn2 layer of ComfyUI block key ``(name, id, index)`` in an
    SD1.x/SD2.x UNet (a block is ``[ResBlock, SpatialTransformer, ...]``, so the transformer is
    entry 1): ``("input", 1, 0)`` -> ``input_blocks.1.1.transformer_blocks.0.attn2``."""
    name, i, j = key
    if name == "middle":
        return f"middle_block.1.transformer_blocks.{int(j)}.attn2"
    if name in ("input", "output"):
        return f"{name}_blocks.{int(i)}.1.transformer_blocks.{int(j)}.attn2"
    raise ValueError(f"unknown block name {name!r} in layer key {key!r}; expected input, middle or output")


def target_key(key: tuple, which: str) -> str:
    """The official file key of ``which`` (``"k"``/``"v"``) of layer ``key``."""
    return f"{ldm_path(key)}.to_{which}.target_output"


def parse_target_key(name: str) -> tuple[tuple, str] | None:
    """``(layer key, "k"|"v")`` of an official ``...attn2.to_k/to_v.target_output`` key (an optional
    ``model.diffusion_model.`` prefix is accepted); None for any other key."""
    m = _KEY_RE.match(name)
    if m is None:
        return None
    if m.group(4) != "1":
        raise ValueError(f"key {name!r}: the transformer is not entry 1 of its block, which is not the "
                         f"SD1.x/SD2.x UNet layout Infusion is made for")
    if m.group(3):
        key = ("middle", 0, int(m.group(5)))
    else:
        key = (m.group(1), int(m.group(2)), int(m.group(5)))
    return key, m.group(6)


def sort_keys(keys) -> list:
    """Layer keys in UNet order: input blocks, middle, output blocks; by id, then index."""
    return sorted(keys, key=lambda k: (_BLOCK_ORDER[k[0]], k[1], k[2]))


def _param_name(key: tuple) -> str:
    return f"{key[0]}_{int(key[1])}_{int(key[2])}"


# --------------------------------------------------------------------------- the parameters

class InfusionOffsets(nn.Module):
    """The trainable Δk, Δv of every cross-attention layer, zero-initialised (the official
    initialisation, §6.2: with zero offsets the model is the base model exactly).

    ``widths``: ``{layer key: inner width C}`` (320/640/1280 in SD1.x/SD2.x). ``kv``: ``"kv"`` (key
    and value offsets, the official xformers path and this pack's trainer) or ``"v"`` (value
    offsets only, the official path without xformers).
    """

    def __init__(self, widths: Mapping[tuple, int], kv: str = "kv", dtype: torch.dtype = torch.float32,
                 device=None):
        super().__init__()
        if kv not in ("kv", "v"):
            raise ValueError(f"kv: expected 'kv' or 'v', got {kv!r}")
        if not widths:
            raise ValueError("widths: no cross-attention layers given")
        for key, w in widths.items():
            ldm_path(key)                                   # checks the key
            if int(w) <= 0:
                raise ValueError(f"layer {key}: width {w} is not positive")
        self.widths = {k: int(widths[k]) for k in sort_keys(widths)}
        self.kv = kv

        def zeros():
            return nn.ParameterDict({_param_name(k): nn.Parameter(torch.zeros(w, dtype=dtype, device=device))
                                     for k, w in self.widths.items()})
        self.delta_k = zeros() if kv == "kv" else None
        self.delta_v = zeros()

    # -- access -------------------------------------------------------------------------
    def layer_keys(self) -> list:
        return list(self.widths)

    def delta(self, key: tuple) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(Δk or None, Δv)`` of layer ``key``."""
        n = _param_name(key)
        return (None if self.delta_k is None else self.delta_k[n]), self.delta_v[n]

    def offsets(self) -> dict:
        """``{layer key: (Δk or None, Δv)}`` (the parameters themselves, not copies)."""
        return {k: self.delta(k) for k in self.widths}

    def num_floats(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- file tensors ---------------------------------------------------------------------
    def to_tensors(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """``{official key: tensor}`` (detached, contiguous, on the CPU)."""
        out = {}
        for key in self.widths:
            dk, dv = self.delta(key)
            if dk is not None:
                out[target_key(key, "k")] = dk.detach().to("cpu", dtype).contiguous()
            out[target_key(key, "v")] = dv.detach().to("cpu", dtype).contiguous()
        return out

    @classmethod
    def from_tensors(cls, sd: Mapping[str, torch.Tensor], name: str = "file") -> "InfusionOffsets":
        """Offsets from a ``{key: tensor}`` dict with the official key names (other keys, such as
        Perfusion's ``target_input``, are ignored). Strict: every layer has a 1-D finite ``to_v``
        offset, ``to_k`` offsets are on every layer or on none, and a layer's two have one width."""
        found: dict[tuple, dict] = {}
        for k, t in sd.items():
            if not k.endswith(".target_output"):
                continue
            parsed = parse_target_key(k)
            if parsed is None:
                raise ValueError(f"{name}: key {k!r} is not an SD1.x/SD2.x cross-attention offset (expected "
                                 f"names like 'input_blocks.1.1.transformer_blocks.0.attn2.to_v.target_output')")
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{name}: {k!r} is not a tensor")
            if t.dim() != 1 or t.numel() == 0:
                raise ValueError(f"{name}: {k!r} has shape {list(t.shape)}; an Infusion offset is one vector "
                                 f"of the layer's width")
            if not t.is_floating_point():
                raise ValueError(f"{name}: {k!r} holds {t.dtype} values, not floating-point offsets")
            if not torch.isfinite(t).all():
                raise ValueError(f"{name}: {k!r} holds NaN or infinite values; the file is damaged or the "
                                 f"training diverged")
            key, which = parsed
            if which in found.setdefault(key, {}):
                raise ValueError(f"{name}: two offsets for {target_key(key, which)!r} (with and without a "
                                 f"'model.diffusion_model.' prefix?)")
            found[key][which] = t
        if not found:
            raise ValueError(f"{name}: holds no Infusion offsets (no '...attn2.to_k/to_v.target_output' keys); "
                             f"it is not an Infusion file")
        no_v = [ldm_path(k) for k, d in found.items() if "v" not in d]
        if no_v:
            raise ValueError(f"{name}: layers with a key offset but no value offset: {', '.join(no_v[:3])}; "
                             f"an Infusion file always has the to_v offsets")
        with_k = [k for k, d in found.items() if "k" in d]
        if with_k and len(with_k) != len(found):
            missing = [ldm_path(k) for k in sort_keys(found) if "k" not in found[k]]
            raise ValueError(f"{name}: to_k offsets on {len(with_k)} of {len(found)} layers (missing on "
                             f"{', '.join(missing[:3])}); the file is incomplete")
        widths = {}
        for key, d in found.items():
            w = {which: int(t.shape[0]) for which, t in d.items()}
            if len(set(w.values())) != 1:
                raise ValueError(f"{name}: {ldm_path(key)} has a to_k offset of width {w['k']} but a to_v "
                                 f"offset of width {w['v']}")
            widths[key] = w["v"]
        out = cls(widths, kv="kv" if with_k else "v")
        with torch.no_grad():
            for key, d in found.items():
                dk, dv = out.delta(key)
                dv.copy_(d["v"].float())
                if dk is not None:
                    dk.copy_(d["k"].float())
        return out

    def check_widths(self, model_widths: Mapping[tuple, int], name: str = "file") -> None:
        """A clear error unless every layer of the offsets exists in the model (``{layer key:
        attn2 inner width}``) with the same width."""
        missing = [k for k in self.widths if k not in model_widths]
        if missing:
            have = len(model_widths)
            raise ValueError(f"{name}: has offsets for {len(self.widths)} cross-attention layers, "
                             f"{len(missing)} of which this model lacks ({', '.join(ldm_path(k) for k in missing[:3])}"
                             f"{', ...' if len(missing) > 3 else ''}; the model has {have}); it was made for "
                             f"another UNet layout")
        wrong = [(k, w, int(model_widths[k])) for k, w in self.widths.items() if int(model_widths[k]) != w]
        if wrong:
            listed = "; ".join(f"{ldm_path(k)} is {m} wide in the model, {w} in the file" for k, w, m in wrong[:3])
            raise ValueError(f"{name}: offset widths do not match the model's cross-attention layers ({listed}"
                             f"{'; ...' if len(wrong) > 3 else ''}); it was made for another model")


# --------------------------------------------------------------------------- files

@dataclass
class InfusionFile:
    """A loaded Infusion file: its offsets, the concept word and base family it names (None for an
    official checkpoint, which stores neither), and where it came from."""
    offsets: InfusionOffsets
    concept_word: str | None
    family: str | None
    source: str                 # "personalize" or "official"
    path: str


def save_offsets(path, offsets: InfusionOffsets, concept_word: str = "", family: str | None = None,
                 dtype: torch.dtype = torch.float32, extra_metadata: Mapping[str, str] | None = None) -> str:
    """Write ``offsets`` as a safetensors Infusion file (module docstring), atomically (the pack's one
    atomic writer: a temporary file in the same folder, then a rename). Returns the path."""
    if family is not None and family not in FAMILIES.values():
        raise ValueError(f"family: {family!r}; Infusion files are for {' or '.join(FAMILIES.values())}")
    meta = {"personalize_kind": KIND, "format_version": FORMAT_VERSION, "concept_word": (concept_word or "").strip(),
            "offsets": offsets.kv, "widths": json.dumps({ldm_path(k): w for k, w in offsets.widths.items()})}
    if family is not None:
        meta["base_family"] = family
    for k, v in (extra_metadata or {}).items():
        meta.setdefault(str(k), str(v))
    path = os.fspath(path)
    atomic_save_safetensors(path, offsets.to_tensors(dtype), meta)
    return path


def _offset_dict(obj, name: str) -> dict:
    """The ``{key: tensor}`` holding the offsets: the official checkpoint's ``target_output`` entry,
    one under ``state_dict``, or the file's own flat dict."""
    if isinstance(obj, dict):
        for k in ("target_output", "state_dict"):
            inner = obj.get(k)
            if isinstance(inner, dict) and any(str(x).endswith(".target_output") for x in inner):
                return inner
    sd = flat_state_dict(obj, nested_keys=("target_output", "state_dict", "model"))
    if sd is None:
        raise ValueError(f"{name}: holds no dictionary of tensors; it is not an Infusion file")
    return sd


def load_offsets(path, name: str | None = None) -> InfusionFile:
    """Read an Infusion file: this pack's safetensors (with its metadata) or an official checkpoint
    (``.ckpt``/``.pt``/``.pth``, read with ``torch.load(weights_only=True)``; a safetensors
    conversion works too). Every problem is a ValueError that names the file."""
    path = os.fspath(path)
    name = name or os.path.basename(path)
    obj = read_checkpoint(path, redo="Train it again or download it again.")
    meta = safetensors_metadata(path) if isinstance(obj, dict) and all(
        isinstance(v, torch.Tensor) for v in obj.values()) else {}
    kind = meta.get("personalize_kind")
    if kind is not None and kind != KIND:
        raise ValueError(f"{name}: is a Personalize '{kind}' file, not an Infusion file")
    offsets = InfusionOffsets.from_tensors(_offset_dict(obj, name), name=name)
    family = meta.get("base_family") or None
    if family is not None and family not in FAMILIES.values():
        raise ValueError(f"{name}: its metadata names base family {family!r}; Infusion supports "
                         f"{' and '.join(FAMILIES.values())}")
    if kind == KIND and meta.get("widths"):
        try:
            listed = json.loads(meta["widths"])
        except ValueError:
            raise ValueError(f"{name}: its 'widths' metadata is not JSON; the file is damaged") from None
        actual = {ldm_path(k): w for k, w in offsets.widths.items()}
        if {str(k): int(v) for k, v in listed.items()} != actual:
            raise ValueError(f"{name}: its tensors do not match its own 'widths' metadata; the file is damaged")
    word = (meta.get("concept_word") or "").strip() or None
    return InfusionFile(offsets, word, family, "personalize" if kind == KIND else "official", path)


_loaded: dict = {}


def load_offsets_cached(path, name: str | None = None) -> InfusionFile:
    """``load_offsets``, remembering the last file read: the same path, unchanged (modification time and
    size), is not read again, so a graph re-run with another prompt or strength reuses it. One file is
    kept (an Infusion file is small; a new one replaces it)."""
    path = os.fspath(path)
    st = os.stat(path)
    key = (path, st.st_mtime_ns, st.st_size, name)
    hit = _loaded.get(key)
    if hit is None:
        hit = load_offsets(path, name=name)
        _loaded.clear()
        _loaded[key] = hit
    return hit
