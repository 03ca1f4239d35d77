"""IP-Adapter and MIP-Adapter checkpoints: recognising the variant from the tensors of a file (read by
``files/checkpoints.py``; the image-projection part built by ``attention/image_proj.py``), the per-layer
weights, and their map to ComfyUI blocks. Pure torch; nothing here imports ComfyUI.

A checkpoint has two parts (docs/algorithms.md §3.4):

* ``image_proj``: turns CLIP vision output into ``tokens`` extra context tokens of the UNet's
  context width. Three layouts are understood:

  - linear ("ImageProjModel"): ``proj`` Linear ``E -> tokens*ctx`` then LayerNorm ``norm`` over
    each token; reads CLIP ``image_embeds`` ``[B, E]``. SD1.5 base/light, SDXL base/vit-h, MIP sdxl.
  - Resampler ("plus"): learned queries ``latents [1, Q, D]`` cross-attend (perceiver layers) to
    the projected CLIP ``penultimate_hidden_states`` ``[B, 257, E]``; ``Q`` tokens out.
    SD1.5 plus/plus-face, SDXL plus vit-h, MIP sdxl_plus.
  - MLP ("full face"): ``Linear E->E, GELU, Linear E->ctx, LayerNorm`` on every CLIP token, so one
    output token per penultimate-state token (257 for ViT-H/14 at 224 px).

  FaceID checkpoints (insightface identity embeddings) are recognised and refused.

* ``ip_adapter``: per cross-attention layer ``n`` (key prefix ``2n+1``, because diffusers numbers
  attn1/attn2 processors in pairs) the image key/value projections ``to_k_ip``, ``to_v_ip``
  ``[C_n, ctx]``; a MIP-Adapter adds the learned gate ``text_to_weight`` ``[1, C_n]``.
  Layer ``n`` counts diffusers' ``attn_processors`` order, which is ComfyUI's input blocks, then
  output blocks, then the middle block (docs/algorithms.md §0.2).

The official MIP code loads the layer weights with ``strict=False``, so a missing or misnamed key
silently leaves a randomly initialised layer; here every missing or unexpected key is an error.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from ..files.checkpoints import read_checkpoint
from .image_proj import IMAGE_EMBEDS, PENULTIMATE, projection_from_state_dict

IP_ADAPTER = "IP-Adapter"
MIP_ADAPTER = "MIP-Adapter"
FAMILIES = {768: "SD1.5", 1024: "SD2.x", 2048: "SDXL"}
_FAMILY_IDS = {"SD1.5": "sd15", "SD2.x": "sd21", "SDXL": "sdxl"}
# CLIP vision towers by the width of each output
_CLIP_MODELS = {IMAGE_EMBEDS: {768: "ViT-L", 1024: "ViT-H", 1280: "ViT-bigG"},
                PENULTIMATE: {1024: "ViT-L", 1280: "ViT-H", 1664: "ViT-bigG"}}
_CLIP_FILES = {"ViT-H": "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors",
               "ViT-bigG": "CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors",
               "ViT-L": "a CLIP ViT-L/14 vision model"}
_OUTPUT_WORDS = {IMAGE_EMBEDS: "image embeds", PENULTIMATE: "penultimate states"}
_BLOCK_ORDER = {"input": 0, "output": 1, "middle": 2}


class AdapterLayer(NamedTuple):
    """The weights of one cross-attention layer (CPU, in the checkpoint's floating-point precision)."""
    to_k_ip: torch.Tensor          # [C, ctx]
    to_v_ip: torch.Tensor          # [C, ctx]
    gate: torch.Tensor | None      # [C] (MIP's text_to_weight) or None

    @property
    def width(self) -> int:
        return self.to_k_ip.shape[0]


# --------------------------------------------------------------------------- the adapter

class ImagePromptAdapter:
    """A loaded IP-Adapter / MIP-Adapter: its image projection and per-layer weights."""

    def __init__(self, *, kind: str, variant: str, family: str, context_dim: int, tokens: int,
                 clip_output: str, clip_width: int, default_scale: float, image_proj: nn.Module,
                 projection: str, layers: list, name: str):
        self.kind = kind
        self.variant = variant
        self.family = family
        self.context_dim = context_dim
        self.tokens = tokens
        self.clip_output = clip_output
        self.clip_width = clip_width
        self.default_scale = default_scale
        self.image_proj = image_proj
        self.projection = projection          # "linear" | "resampler" | "mlp"
        self.layers = layers
        self.name = name

    def __repr__(self) -> str:
        return f"<ImagePromptAdapter '{self.name}': {self.describe()}>"

    @property
    def clip_model(self) -> str:
        """The CLIP vision tower whose output has this adapter's width, e.g. ``"ViT-H"``."""
        return _clip_model(self.clip_output, self.clip_width)

    def describe(self) -> str:
        kind = {"linear": "", "resampler": " plus", "mlp": " full face"}[self.projection]
        proj = {"linear": "linear projection", "resampler": "Resampler", "mlp": "MLP"}[self.projection]
        if self.projection == "mlp":
            tokens = "one token per CLIP token"
        else:
            tokens = f"{self.tokens} tokens"
        gate = "learned gate" if self.layers and self.layers[0].gate is not None else "no gate"
        return (f"{self.kind}, {self.family}{kind} ({proj}, {tokens} from {self.clip_model} "
                f"{_OUTPUT_WORDS[self.clip_output]}, width {self.clip_width}), "
                f"{len(self.layers)} cross-attention layers, {gate}")

    def project(self, clip_features: torch.Tensor) -> torch.Tensor:
        """CLIP vision output -> image-prompt tokens ``[B, tokens, ctx]`` (float32), computed on
        the device of ``image_proj``. ``image_embeds`` adapters take ``[B, E]``; the others take
        ``penultimate_hidden_states`` ``[B, N, E]`` (the full-face MLP returns ``N`` tokens)."""
        if not torch.is_tensor(clip_features):
            raise ValueError(f"clip_vision: expected a tensor of CLIP vision {self.clip_output}, "
                             f"got {type(clip_features).__name__}")
        want = 2 if self.clip_output == IMAGE_EMBEDS else 3
        shape = "[batch, width]" if want == 2 else "[batch, tokens, width]"
        if clip_features.ndim != want:
            raise ValueError(f"clip_vision: the {self.variant} adapter '{self.name}' reads CLIP vision "
                             f"{self.clip_output} shaped {shape}; got a tensor of shape "
                             f"{tuple(clip_features.shape)}")
        width = clip_features.shape[-1]
        if width != self.clip_width:
            have = _CLIP_MODELS[self.clip_output].get(width)
            have = f" ({have})" if have else ""
            raise ValueError(
                f"clip_vision: the {self.variant} adapter '{self.name}' needs CLIP vision "
                f"{_OUTPUT_WORDS[self.clip_output]} {self.clip_width} wide ({self.clip_model}), but "
                f"this CLIP vision model gives {width}{have}. Load the {self.clip_model} CLIP vision "
                f"model ({_CLIP_FILES.get(self.clip_model, 'the matching CLIP vision model')}).")
        param = next(self.image_proj.parameters())
        with torch.no_grad():
            out = self.image_proj(clip_features.to(param.device, torch.float32))
        return out.float()

    def layer_keys(self, blocks: dict) -> dict:
        """``{comfy_key: n}``: which adapter layer serves each ComfyUI cross-attention block.

        ``blocks`` maps ``(block_name, block_id, block_index)`` to ``(inner_dim, context_dim)`` of
        that block's attn2. Keys are put in IP-Adapter processor order (input blocks, output
        blocks, middle block; by id, then index) and numbered ``0..L-1``; the model must have the
        adapter's context width, exactly ``L`` cross-attention blocks, and layer ``n``'s width."""
        if not blocks:
            raise ValueError("model: no cross-attention blocks found; IP-Adapter needs an "
                             "SD1.x/SD2.x/SDXL-style UNet model")
        bad = [k for k in blocks if not (isinstance(k, tuple) and len(k) == 3 and k[0] in _BLOCK_ORDER)]
        if bad:
            raise ValueError(f"model: cannot order cross-attention blocks {bad[:3]}; expected keys "
                             f"(block_name, block_id, block_index) with input/output/middle names")
        contexts = sorted({int(ctx) for _, ctx in blocks.values()})
        if contexts != [self.context_dim]:
            model_ctx = contexts[0] if len(contexts) == 1 else contexts
            model_family = FAMILIES.get(contexts[0], "an unknown family") if len(contexts) == 1 \
                else "mixed widths"
            raise ValueError(
                f"ipadapter: '{self.name}' is an {self.family} adapter ({self.context_dim}-wide text "
                f"conditioning) on a model with {model_ctx}-wide ({model_family}) conditioning; load "
                f"the adapter for your model family")
        ordered = sorted(blocks, key=lambda k: (_BLOCK_ORDER[k[0]], k[1], k[2]))
        if len(ordered) != len(self.layers):
            raise ValueError(
                f"ipadapter: '{self.name}' has weights for {len(self.layers)} cross-attention layers, "
                f"but the model has {len(ordered)} ({_count_blocks(ordered)}); this adapter was made "
                f"for another UNet layout (an {self.family} adapter fits the standard {self.family} "
                f"UNet)")
        wrong = [(key, n, int(blocks[key][0]), layer.width)
                 for n, (key, layer) in enumerate(zip(ordered, self.layers))
                 if int(blocks[key][0]) != layer.width]
        if wrong:
            listed = "; ".join(f"{k} is {have} wide, layer {n} ({2 * n + 1}.to_k_ip) {want}"
                               for k, n, have, want in wrong[:4])
            more = f" and {len(wrong) - 4} more" if len(wrong) > 4 else ""
            raise ValueError(f"ipadapter: '{self.name}' does not fit this model's cross-attention "
                             f"widths: {listed}{more}")
        return {key: n for n, key in enumerate(ordered)}


def _count_blocks(keys) -> str:
    counts: dict = {}
    for name, _, _ in keys:
        counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{counts[n]} {n}" for n in _BLOCK_ORDER if n in counts)


def _clip_model(output: str, width: int) -> str:
    return _CLIP_MODELS[output].get(width, f"a {width}-wide CLIP")


# --------------------------------------------------------------------------- reading files

def load_adapter(path) -> ImagePromptAdapter:
    """Read an IP-Adapter / MIP-Adapter file (``.safetensors``, or a ``.bin``/``.pt``/``.pth``
    PyTorch checkpoint read with ``weights_only=True``, through ``files.checkpoints``) and
    recognise it."""
    path = Path(path)
    sd = read_checkpoint(path, error=_ipadapter_error, redo="Download it again.",
                         kind="an IP-Adapter checkpoint")
    return adapter_from_state_dict(sd, path.name)


def _ipadapter_error(message: str) -> ValueError:
    return ValueError(f"ipadapter: {message}")


# --------------------------------------------------------------------------- recognition

def adapter_from_state_dict(sd: dict, name: str = "adapter") -> ImagePromptAdapter:
    """Recognise and build an adapter from a checkpoint dictionary: nested
    ``{"image_proj": {...}, "ip_adapter": {...}}`` or flat with ``image_proj.``/``ip_adapter.``
    key prefixes (``adapter_modules`` is accepted for ``ip_adapter``)."""
    proj_sd, ip_sd = _split_parts(sd, name)
    _refuse_faceid(proj_sd, ip_sd, name)
    layers, ctx = _read_layers(ip_sd, name)
    family = FAMILIES.get(ctx)
    if family is None:
        raise ValueError(f"ipadapter: '{name}' has {ctx}-wide context projections; IP-Adapters exist "
                         f"for SD1.5 (768), SD2.x (1024) and SDXL (2048) models")
    image_proj, projection, tokens, clip_output, clip_width, out_dim = projection_from_state_dict(proj_sd, name)
    if out_dim != ctx:
        raise ValueError(f"ipadapter: '{name}' is inconsistent: its image projection makes "
                         f"{out_dim}-wide tokens but its layers read {ctx}-wide context")
    gated = layers[0].gate is not None
    kind = MIP_ADAPTER if gated else IP_ADAPTER
    default_scale = (0.65 if projection == "resampler" else 0.75) if gated else 1.0
    return ImagePromptAdapter(
        kind=kind, variant=_variant_id(family, projection, clip_output, clip_width, gated),
        family=family, context_dim=ctx, tokens=tokens, clip_output=clip_output,
        clip_width=clip_width, default_scale=default_scale, image_proj=image_proj,
        projection=projection, layers=layers, name=name)


def _variant_id(family: str, projection: str, clip_output: str, clip_width: int, gated: bool) -> str:
    """Short ids after the official file names: ``sd15``, ``sd15_plus``, ``sd15_full_face``,
    ``sdxl``, ``sdxl_vit-h``, ``sdxl_plus_vit-h``, ``mip_sdxl``, ``mip_sdxl_plus``; a CLIP tower
    other than the one the family's official file uses is appended (``sd15_vit-G``)."""
    clip = _CLIP_MODELS[clip_output].get(clip_width, f"clip{clip_width}")
    suffix = {"ViT-H": "vit-h", "ViT-bigG": "vit-G", "ViT-L": "vit-l"}.get(clip, clip)
    base = _FAMILY_IDS[family] + {"linear": "", "resampler": "_plus", "mlp": "_full_face"}[projection]
    if gated:
        usual = "ViT-bigG" if projection == "linear" else "ViT-H"
        return "mip_" + base + ("" if clip == usual else "_" + suffix)
    if family == "SDXL":
        if projection == "linear":
            return base + ("" if clip == "ViT-bigG" else "_" + suffix)
        return base + "_" + suffix           # sdxl_plus_vit-h: the official SDXL plus files
    return base + ("" if clip == "ViT-H" else "_" + suffix)


def _split_parts(sd, name: str) -> tuple[dict, dict]:
    if not isinstance(sd, dict):
        raise ValueError(f"ipadapter: '{name}' is not an IP-Adapter checkpoint: it holds a "
                         f"{type(sd).__name__}, not a dictionary of tensors")
    if any(isinstance(sd.get(k), dict) for k in ("image_proj", "ip_adapter", "adapter_modules")):
        proj = sd.get("image_proj") or {}
        ip = sd.get("ip_adapter") or sd.get("adapter_modules") or {}
    else:
        proj, ip = {}, {}
        for k, v in sd.items():
            for prefix, part in (("image_proj.", proj), ("ip_adapter.", ip), ("adapter_modules.", ip)):
                if isinstance(k, str) and k.startswith(prefix):
                    part[k[len(prefix):]] = v
                    break
    if not proj and not ip:
        keys = ", ".join(str(k) for k in list(sd)[:5]) or "none"
        raise ValueError(f"ipadapter: '{name}' is not an IP-Adapter checkpoint: it has no "
                         f"'image_proj' or 'ip_adapter' weights (its first keys: {keys})")
    missing = [p for p, d in (("image_proj (the image projection)", proj),
                              ("ip_adapter (the per-layer to_k_ip/to_v_ip weights)", ip)) if not d]
    if missing:
        raise ValueError(f"ipadapter: '{name}' is incomplete: it has no {' and no '.join(missing)} "
                         f"part")
    for part in (proj, ip):
        for k, v in part.items():
            if not torch.is_tensor(v):
                raise ValueError(f"ipadapter: '{name}' is not an IP-Adapter checkpoint: '{k}' holds "
                                 f"a {type(v).__name__}, not a tensor")
    # The image projection is small and runs once per image: float32. The layer weights (about
    # 350M values for SDXL) stay in the file's precision; they are used once, in float32, when an
    # Apply node projects the image-prompt tokens.
    as32 = lambda d: {str(k): v.detach().to("cpu", torch.float32) for k, v in d.items()}
    floating = lambda d: {str(k): v.detach().to("cpu") if v.is_floating_point() else v.detach().to("cpu", torch.float32)
                          for k, v in d.items()}
    return as32(proj), floating(ip)


def _refuse_faceid(proj: dict, ip: dict, name: str) -> None:
    """FaceID checkpoints project insightface identity embeddings (and most add LoRA weights to
    the UNet's own attention); they are recognised by the keys cubiq's loader also uses."""
    if any("lora" in k for k in ip):
        what = "FaceID Plus" if any(k.startswith("perceiver_resampler.") for k in proj) else "FaceID"
    elif any(k.startswith("perceiver_resampler.") for k in proj):
        what = "FaceID Plus"
    elif "proj.2.weight" in proj and "proj.3.weight" not in proj and "norm.weight" in proj:
        what = "FaceID (or FaceID Portrait)"
    else:
        return
    raise ValueError(f"ipadapter: '{name}' is an IP-Adapter {what} checkpoint; FaceID variants "
                     f"read insightface face embeddings, which this pack does not compute, so they "
                     f"are not supported. Use an IP-Adapter (base, light, plus, plus-face, full-face) "
                     f"or a MIP-Adapter file.")


_LAYER_KEY = re.compile(r"^(\d+)\.(to_k_ip|to_v_ip|text_to_weight)\.weight$")


def _read_layers(ip: dict, name: str) -> tuple[list, int]:
    """Per-layer weights from keys ``{2n+1}.to_k_ip.weight`` etc.; every layer 0..L-1 must be
    complete, and either every layer or none has a MIP gate."""
    found: dict[int, dict[str, torch.Tensor]] = {}
    unexpected = []
    for k, v in ip.items():
        m = _LAYER_KEY.match(k)
        if m:
            found.setdefault(int(m.group(1)), {})[m.group(2)] = v
        else:
            unexpected.append(k)
    if unexpected:
        raise ValueError(f"ipadapter: '{name}' is not a plain IP-Adapter or MIP-Adapter checkpoint: "
                         f"its ip_adapter part has unexpected keys "
                         f"({', '.join(sorted(unexpected)[:5])}{', ...' if len(unexpected) > 5 else ''})")
    even = sorted(i for i in found if i % 2 == 0)
    if even:
        raise ValueError(f"ipadapter: '{name}' has image key/value weights under even processor "
                         f"numbers ({', '.join(map(str, even[:5]))}), which are self-attention "
                         f"layers; it is not an IP-Adapter checkpoint of a known layout")
    count = (max(found) + 1) // 2
    gated = any("text_to_weight" in parts for parts in found.values())
    needed = ("to_k_ip", "to_v_ip") + (("text_to_weight",) if gated else ())
    missing = [f"{2 * n + 1}.{part}.weight (layer {n})" for n in range(count)
               for part in needed if part not in found.get(2 * n + 1, {})]
    if missing:
        more = f" and {len(missing) - 6} more" if len(missing) > 6 else ""
        raise ValueError(f"ipadapter: '{name}' is incomplete: of its {count} cross-attention layers, "
                         f"these weights are missing: {', '.join(missing[:6])}{more}. The file is "
                         f"damaged or not a complete {'MIP-Adapter' if gated else 'IP-Adapter'} "
                         f"checkpoint")
    layers, ctx = [], None
    for n in range(count):
        parts = found[2 * n + 1]
        k, v = parts["to_k_ip"], parts["to_v_ip"]
        if k.ndim != 2 or v.shape != k.shape:
            raise ValueError(f"ipadapter: '{name}' layer {n}: to_k_ip {tuple(k.shape)} and to_v_ip "
                             f"{tuple(v.shape)} must both be [width, context]")
        if ctx is None:
            ctx = k.shape[1]
        elif k.shape[1] != ctx:
            raise ValueError(f"ipadapter: '{name}' layer {n} reads {k.shape[1]}-wide context but "
                             f"layer 0 reads {ctx}-wide")
        gate = parts.get("text_to_weight")
        if gate is not None:
            if tuple(gate.shape) != (1, k.shape[0]):
                raise ValueError(f"ipadapter: '{name}' layer {n}: text_to_weight is "
                                 f"{tuple(gate.shape)}, expected (1, {k.shape[0]})")
            gate = gate.reshape(-1)
        layers.append(AdapterLayer(k, v, gate))
    return layers, ctx


__all__ = ["AdapterLayer", "ImagePromptAdapter", "load_adapter", "adapter_from_state_dict",
           "FAMILIES", "IP_ADAPTER", "MIP_ADAPTER"]
