"""Segment Anything (SAM) checkpoints: the official files, reading and checking a checkpoint, detecting
its layout from the weights' shapes, and building the network with ``segment_anything``'s own model
classes.

Pure torch; ``segment_anything`` is imported inside the functions that build the network, so this
module imports without it. The file is read through ``files.checkpoints`` (tensors only). Nothing here
imports ComfyUI.
"""
from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field

import torch

from ..files.checkpoints import flat_state_dict, read_checkpoint

# ---------------------------------------------------------------------------------------------
# The official checkpoints
# ---------------------------------------------------------------------------------------------

DOWNLOAD_BASE = "https://dl.fbaipublicfiles.com/segment_anything/"
OFFICIAL = {  # variant: (file name, image encoder embed dim, depth, heads, global-attention blocks)
    "vit_b": ("sam_vit_b_01ec64.pth", 768, 12, 12, (2, 5, 8, 11)),
    "vit_l": ("sam_vit_l_0b3195.pth", 1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": ("sam_vit_h_4b8939.pth", 1280, 32, 16, (7, 15, 23, 31)),
}
OFFICIAL_FILES = tuple(v[0] for v in OFFICIAL.values())
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
DECODER_HEADS = 8          # every SAM's mask decoder; not visible in the weights' shapes


class SamFileError(ValueError):
    """A SAM checkpoint that cannot be used; the message says why and what to do."""


def install_hint() -> str:
    exe = sys.executable or "python"
    return (f"install it into ComfyUI's Python environment: `\"{exe}\" -m pip install segment-anything` "
            f"(ComfyUI portable: `python_embeded\\python.exe -m pip install segment-anything`), then restart "
            f"ComfyUI")


def download_hint(folder: str = "ComfyUI/models/sams") -> str:
    files = ", ".join(f"{name} ({DOWNLOAD_BASE}{name})" for name, *_ in OFFICIAL.values())
    return f"download an official Segment Anything checkpoint into {folder}: {files}"


def import_sam_modeling():
    """``segment_anything.modeling``, or an ImportError that says what to install."""
    try:
        import segment_anything.modeling as modeling
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] == "segment_anything":
            raise ImportError("The SAM nodes need the segment-anything package, which is not installed; "
                              + install_hint()) from None
        raise ImportError(f"segment-anything is installed but could not be imported ({exc}); it needs "
                          f"torchvision matching your torch. " + install_hint()) from exc
    except Exception as exc:  # e.g. torchvision built for another torch: "operator torchvision::nms does not exist"
        raise ImportError(f"segment-anything is installed but could not be imported ({type(exc).__name__}: "
                          f"{exc}); it imports torchvision, which must match your torch version") from exc
    return modeling


# ---------------------------------------------------------------------------------------------
# Reading a checkpoint
# ---------------------------------------------------------------------------------------------

def read_state_dict(path: str | os.PathLike) -> dict:
    """The tensors of a SAM ``.pth`` / ``.pt`` or ``.safetensors`` file (``files.checkpoints.read_checkpoint``:
    weights_only, memory-mapped); every failure is a ``SamFileError`` naming the file."""
    return read_checkpoint(path, SamFileError, f"Download it again ({download_hint()}).",
                           missing_prefix="SAM checkpoint ", get=download_hint())


def unwrap_state_dict(obj, name: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The flat ``{key: tensor}`` of a SAM checkpoint: accepts a state dict, one nested under
    ``model`` / ``state_dict``, and a ``module.`` prefix (DataParallel)."""
    sd = flat_state_dict(obj, ("model", "state_dict", "module"))
    if sd is None:
        raise SamFileError(f"{name} is not a state dict of tensors (got {type(obj).__name__}); use an official "
                           f"SAM checkpoint ({', '.join(OFFICIAL_FILES)})")
    return sd


# ---------------------------------------------------------------------------------------------
# Detecting the layout from the shapes
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SamConfig:
    """Everything needed to build the network, read from the weights' shapes."""
    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    window_size: int
    patch_size: int
    img_size: int
    mlp_ratio: float
    prompt_dim: int
    mask_in_chans: int
    decoder_depth: int
    decoder_mlp_dim: int
    num_multimask_outputs: int
    iou_head_depth: int
    iou_head_hidden_dim: int
    decoder_heads: int = DECODER_HEADS
    variant: str = "custom"

    @property
    def label(self) -> str:
        if self.variant != "custom":
            return f"SAM {self.variant.replace('_', '-').upper().replace('VIT', 'ViT')}"
        return (f"custom SAM (embed {self.embed_dim}, depth {self.depth}, {self.num_heads} heads, "
                f"input {self.img_size} px)")


def _shape(sd, key, name):
    if key not in sd:
        raise SamFileError(f"{name}: not a complete SAM checkpoint: key {key!r} is missing")
    return tuple(sd[key].shape)


def _indices(sd, prefix):
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in sd for m in [pat.match(k)] if m})


def detect_config(sd: dict[str, torch.Tensor], name: str = "checkpoint") -> SamConfig:
    """Read the SAM layout from a state dict's key names and shapes. The official ViT-B/L/H
    (embed dim 768/1024/1280, depth 12/24/32, 1024 px input) are recognised by name; any other
    consistent ``segment_anything`` layout (e.g. a tiny test model) loads as ``custom``. Other model
    kinds (SAM 2, SAM-HQ, MobileSAM, Hugging Face transformers SAM, non-SAM files) are errors that
    say what the file is."""
    keys = list(sd)
    sample = ", ".join(keys[:3])
    use = f"use an official SAM checkpoint ({', '.join(OFFICIAL_FILES)})"
    if any(k.startswith(("image_encoder.trunk.", "sam_mask_decoder.", "memory_encoder.")) for k in keys):
        raise SamFileError(f"{name} is a SAM 2 checkpoint; these nodes run the original Segment Anything: {use}")
    if any(k.startswith("mask_decoder.hf_") for k in keys):
        raise SamFileError(f"{name} is a SAM-HQ checkpoint, which these nodes do not run: {use}")
    if any(k.startswith(("vision_encoder.", "sam.vision_encoder.")) for k in keys):
        raise SamFileError(f"{name} is a Hugging Face transformers SAM (different key names): {use}")
    if not any(k.startswith("image_encoder.") for k in keys) or not any(k.startswith("mask_decoder.") for k in keys):
        raise SamFileError(f"{name} is not a Segment Anything checkpoint (no image_encoder.* / mask_decoder.* "
                           f"weights; its first keys are {sample}): {use}")
    if "image_encoder.patch_embed.proj.weight" not in sd:
        kind = "MobileSAM (TinyViT encoder)" if any(k.startswith("image_encoder.layers.") for k in keys) \
            else "a SAM with another image encoder"
        raise SamFileError(f"{name} looks like {kind}, which these nodes do not run: {use}")

    E, cin, P, P2 = _shape(sd, "image_encoder.patch_embed.proj.weight", name)
    if cin != 3 or P != P2:
        raise SamFileError(f"{name}: unexpected patch embedding {(E, cin, P, P2)}: {use}")
    pos = _shape(sd, "image_encoder.pos_embed", name)
    if len(pos) != 4 or pos[1] != pos[2] or pos[3] != E:
        raise SamFileError(f"{name}: unexpected position embedding {pos}: {use}")
    grid = pos[1]
    blocks = _indices(sd, "image_encoder.blocks.")
    if not blocks or blocks != list(range(len(blocks))):
        raise SamFileError(f"{name}: the image encoder's blocks are missing or not numbered 0..N-1: {use}")
    head_dim, globals_, window = None, [], 0
    for i in blocks:
        rel = f"image_encoder.blocks.{i}.attn.rel_pos_h"
        if rel not in sd:
            raise SamFileError(f"{name}: block {i} has no relative position table ({rel}); {use}")
        n, hd = sd[rel].shape
        head_dim = head_dim or hd
        if n == 2 * grid - 1:
            globals_.append(i)
        else:
            window = window or (n + 1) // 2
    if E % head_dim:
        raise SamFileError(f"{name}: head size {head_dim} does not divide the embed dim {E}: {use}")
    mlp = _shape(sd, "image_encoder.blocks.0.mlp.lin1.weight", name)[0]
    prompt_dim = _shape(sd, "image_encoder.neck.0.weight", name)[0]
    dec_layers = _indices(sd, "mask_decoder.transformer.layers.")
    if not dec_layers:
        raise SamFileError(f"{name}: the mask decoder's transformer layers are missing: {use}")
    n_tokens = _shape(sd, "mask_decoder.mask_tokens.weight", name)[0]
    iou_layers = _indices(sd, "mask_decoder.iou_prediction_head.layers.")
    cfg = SamConfig(
        embed_dim=E, depth=len(blocks), num_heads=E // head_dim, global_attn_indexes=tuple(globals_),
        window_size=window, patch_size=P, img_size=grid * P, mlp_ratio=mlp / E, prompt_dim=prompt_dim,
        mask_in_chans=_shape(sd, "prompt_encoder.mask_downscaling.3.weight", name)[0],
        decoder_depth=len(dec_layers),
        decoder_mlp_dim=_shape(sd, "mask_decoder.transformer.layers.0.mlp.lin1.weight", name)[0],
        num_multimask_outputs=n_tokens - 1, iou_head_depth=len(iou_layers),
        iou_head_hidden_dim=_shape(sd, "mask_decoder.iou_prediction_head.layers.0.weight", name)[0])
    for variant, (_, e, d, h, g) in OFFICIAL.items():
        if (E, len(blocks), grid * P) == (e, d, 1024):
            if (cfg.num_heads, cfg.global_attn_indexes) != (h, g):
                raise SamFileError(f"{name}: embed dim {E} and depth {d} are SAM {variant}'s, but its attention "
                                   f"layout ({cfg.num_heads} heads, global blocks {cfg.global_attn_indexes}) is "
                                   f"not: {use}")
            cfg = SamConfig(**{**cfg.__dict__, "variant": variant})
    return cfg


def build_network(cfg: SamConfig, device="cpu"):
    """A ``segment_anything.modeling.Sam`` with the layout of ``cfg`` (the same constructor arguments as
    ``segment_anything.build_sam``), on ``device`` (``"meta"`` builds it without memory)."""
    from functools import partial
    m = import_sam_modeling()
    S = cfg.img_size // cfg.patch_size
    with torch.device(device):
        net = m.Sam(
            image_encoder=m.ImageEncoderViT(
                depth=cfg.depth, embed_dim=cfg.embed_dim, img_size=cfg.img_size, mlp_ratio=cfg.mlp_ratio,
                norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=cfg.num_heads,
                patch_size=cfg.patch_size, qkv_bias=True, use_rel_pos=True,
                global_attn_indexes=cfg.global_attn_indexes, window_size=cfg.window_size,
                out_chans=cfg.prompt_dim),
            prompt_encoder=m.PromptEncoder(
                embed_dim=cfg.prompt_dim, image_embedding_size=(S, S),
                input_image_size=(cfg.img_size, cfg.img_size), mask_in_chans=cfg.mask_in_chans),
            mask_decoder=m.MaskDecoder(
                num_multimask_outputs=cfg.num_multimask_outputs,
                transformer=m.TwoWayTransformer(depth=cfg.decoder_depth, embedding_dim=cfg.prompt_dim,
                                                mlp_dim=cfg.decoder_mlp_dim, num_heads=cfg.decoder_heads),
                transformer_dim=cfg.prompt_dim, iou_head_depth=cfg.iou_head_depth,
                iou_head_hidden_dim=cfg.iou_head_hidden_dim),
            pixel_mean=list(PIXEL_MEAN), pixel_std=list(PIXEL_STD))
    return net.eval()


@dataclass
class SamModel:
    """A loaded SAM: the ``segment_anything`` network and what was read about it."""
    net: torch.nn.Module
    config: SamConfig
    name: str = "sam"
    path: str | None = None
    extras: dict = field(default_factory=dict)   # room for the host (e.g. ComfyUI's model patcher)

    @property
    def img_size(self) -> int:
        return self.config.img_size

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device


def load_sam(path: str | os.PathLike) -> SamModel:
    """Read, check and build a SAM checkpoint on the CPU. The network is built on the meta device and
    takes the file's tensors as its parameters (memory-mapped for ``.pth`` files), so loading is quick
    and the weights are read from disk when first used."""
    path = os.fspath(path)
    name = os.path.basename(path)
    sd = unwrap_state_dict(read_state_dict(path), name)
    cfg = detect_config(sd, name)
    net = build_network(cfg, "meta")
    try:
        result = net.load_state_dict(sd, strict=False, assign=True)
    except RuntimeError as exc:          # shapes that contradict each other
        raise SamFileError(f"{name} does not fit the {cfg.label} layout its shapes suggest "
                           f"({str(exc).splitlines()[-1].strip()}); {download_hint()}") from None
    missing = [k for k in result.missing_keys if not k.startswith(("pixel_mean", "pixel_std"))]
    if missing or result.unexpected_keys:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if result.unexpected_keys:
            parts.append(f"{len(result.unexpected_keys)} unexpected (e.g. {', '.join(result.unexpected_keys[:3])})")
        raise SamFileError(f"{name} does not match the {cfg.label} layout its shapes suggest: keys "
                           f"{'; '.join(parts)}. The file is incomplete or not an official SAM checkpoint; "
                           f"{download_hint()}")
    for buf, values in (("pixel_mean", PIXEL_MEAN), ("pixel_std", PIXEL_STD)):
        net.register_buffer(buf, torch.tensor(values).view(-1, 1, 1), persistent=False)
    left = [n for n, t in [*net.named_parameters(), *net.named_buffers()] if t.is_meta]
    if left:
        raise SamFileError(f"{name}: weights {left[:3]} were not in the file; {download_hint()}")
    if any(p.dtype != torch.float32 for p in net.parameters()):
        net = net.float()
    net.requires_grad_(False)
    return SamModel(net=net.eval(), config=cfg, name=name, path=path)

