"""The evaluation models of docs/metrics.md §3.1, loaded from local files: CLIP through open_clip_torch
(imported lazily) and DINO-v1 ViT-S/16, a ViT written here with the parameter names of the official
checkpoint (``dino_deitsmall16_pretrain.pth``), so that file loads with strict keys. Pure torch; no
ComfyUI import.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..files.checkpoints import read_checkpoint
from .scores import clip_preprocess, dino_preprocess

DINO_FILE = "dino_deitsmall16_pretrain.pth"
DINO_URL = "https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth"
CLIP_FILE = "open_clip_pytorch_model.bin"
CLIP_SAFETENSORS_FILE = "open_clip_model.safetensors"
CLIP_REPO = "https://huggingface.co/timm/vit_base_patch32_clip_224.openai"
# OpenAI's ViT-B/32 was trained with QuickGELU; open_clip's plain "ViT-B-32" uses nn.GELU, which loads
# the same weights without complaint but gives different embeddings.
CLIP_ARCH = "ViT-B-32-quickgelu"
OPEN_CLIP_HINT = "pip install open_clip_torch (in ComfyUI's Python)"


class EvalModelError(ValueError):
    """A missing, damaged or wrong evaluation model file (the message names the file)."""


DREAMSIM_FOLDER = "dreamsim"
DREAMSIM_URL = ("https://github.com/ssundaram21/dreamsim/releases/download/v0.2.0-checkpoints/"
                "dreamsim_ensemble_checkpoint.zip")
DINO_B16_FILE = "dino_vitbase16_pretrain.pth"
DINO_B16_URL = "https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth"


def download_hint(kind: str) -> str:
    if kind == "dino":
        return f"the DINO ViT-S/16 file is {DINO_FILE} ({DINO_URL})"
    if kind == "dreamsim":
        return (f"DreamSim's ensemble is the folder {DREAMSIM_FOLDER}/ holding the unzipped {DREAMSIM_URL} "
                f"(clip_vitb16_pretrain.pth.tar, open_clip_vitb16_pretrain.pth.tar, ensemble_lora/) plus DINO's "
                f"ViT-B/16 backbone {DINO_B16_FILE} ({DINO_B16_URL}), where a dreamsim run caches it "
                f"({DREAMSIM_FOLDER}/checkpoints/) or directly in {DREAMSIM_FOLDER}/")
    return (f"the CLIP file is {CLIP_FILE} or {CLIP_SAFETENSORS_FILE} from {CLIP_REPO} (OpenAI ViT-B/32 in "
            f"open_clip's format; architecture {CLIP_ARCH})")


def read_state_dict(path: str | os.PathLike, kind: str) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file or a ``.pth``/``.bin`` read with
    ``torch.load(weights_only=True)`` (``files.checkpoints.read_checkpoint``); a nested
    ``state_dict``/``model``/``teacher`` dict and a ``module.``/``backbone.`` prefix are unwrapped.
    Every failure is an ``EvalModelError`` naming the file."""
    name = os.path.basename(os.fspath(path))
    hint = download_hint(kind)
    obj = read_checkpoint(path, EvalModelError, hint)
    for key in ("state_dict", "model", "teacher"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise EvalModelError(f"{name} is not a state dict of tensors (got {type(obj).__name__}). {hint}")
    prefixes = ("module.", "backbone.")
    for p in prefixes:
        if all(k.startswith(p) for k in obj):
            obj = {k[len(p):]: v for k, v in obj.items()}
    return obj


# --------------------------------------------------------------------------------------- DINO
class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's activation, ``x * sigmoid(1.702 x)``."""
    return x * torch.sigmoid(1.702 * x)


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str = "gelu"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = quick_gelu if act == "quick_gelu" else F.gelu

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, act: str = "gelu", eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio), act)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _PatchEmbed(nn.Module):
    def __init__(self, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


@dataclass(frozen=True)
class DinoConfig:
    embed_dim: int = 384
    depth: int = 12
    heads: int = 6
    patch_size: int = 16
    image_size: int = 224
    mlp_ratio: float = 4.0
    # DreamSim's CLIP / OpenCLIP backbones in DINO's layout: QuickGELU (OpenAI CLIP), LayerNorm eps
    # 1e-5 and CLIP's ``ln_pre`` stored as ``pos_drop`` (a LayerNorm instead of the dropout)
    act: str = "gelu"
    eps: float = 1e-6
    pre_norm: bool = False


class DinoViT(nn.Module):
    """DINO-v1 ViT (pre-norm blocks, LayerNorm eps 1e-6, qkv bias, exact GELU); ``forward`` returns the
    CLS token after the final norm (384-d for ViT-S/16). Parameter names match the official file.
    ``tokens`` gives every token after the last block, before the final norm."""

    def __init__(self, config: DinoConfig = DinoConfig()):
        super().__init__()
        c = self.config = config
        tokens = (c.image_size // c.patch_size) ** 2 + 1
        self.patch_embed = _PatchEmbed(c.embed_dim, c.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, c.embed_dim))
        self.pos_drop = nn.LayerNorm(c.embed_dim, eps=c.eps) if c.pre_norm else nn.Identity()
        self.blocks = nn.ModuleList(_Block(c.embed_dim, c.heads, c.mlp_ratio, c.act, c.eps) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.embed_dim, eps=c.eps)
        self.extras: dict = {}        # what the node keeps with the model (ComfyUI's model patcher)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.config.image_size,) * 2:
            raise ValueError(f"the ViT expects {self.config.image_size}px inputs, got {tuple(x.shape[-2:])}")
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.pos_drop(x)
        for blk in self.blocks:
            x = blk(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.tokens(x))[:, 0]


def dino_config_from_state_dict(sd: dict[str, torch.Tensor], name: str = "checkpoint", kind: str = "dino",
                                **overrides) -> DinoConfig:
    """The ViT's size read from the tensors (heads: width / 64, as in DINO's ViT-T/S/B); ``pre_norm``
    when the file has a ``pos_drop`` LayerNorm. ``overrides`` set the other fields (act, eps)."""
    need = ("cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight")
    missing = [k for k in need if k not in sd]
    if missing:
        sample = ", ".join(sorted(sd)[:4])
        raise EvalModelError(f"{name} is not a DINO ViT checkpoint: no {', '.join(missing)} (its keys "
                             f"start {sample}). {download_hint(kind)}")
    dim = sd["cls_token"].shape[-1]
    patch = sd["patch_embed.proj.weight"].shape[-1]
    depth = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    grid = round((sd["pos_embed"].shape[1] - 1) ** 0.5)
    hidden = sd.get("blocks.0.mlp.fc1.weight", torch.empty(dim * 4, dim)).shape[0]
    return DinoConfig(embed_dim=dim, depth=depth, heads=max(1, dim // 64), patch_size=patch,
                      image_size=grid * patch, mlp_ratio=hidden / dim, pre_norm="pos_drop.weight" in sd,
                      **overrides)


def load_dino(path: str | os.PathLike) -> DinoViT:
    name = os.path.basename(os.fspath(path))
    sd = read_state_dict(path, "dino")
    sd = {k: v for k, v in sd.items() if not k.startswith("head.")}     # the identity head (or a probe)
    model = DinoViT(dino_config_from_state_dict(sd, name))
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise EvalModelError(f"{name} does not match the DINO ViT layout: {str(exc).splitlines()[-1].strip()}. "
                             f"{download_hint('dino')}") from None
    return model.eval().float()


# --------------------------------------------------------------------------------------- CLIP
def import_open_clip():
    try:
        import open_clip
    except ImportError as exc:
        raise ImportError(f"the CLIP score needs open_clip ({exc}); {OPEN_CLIP_HINT}") from None
    return open_clip


@dataclass
class ClipModel:
    model: nn.Module
    tokenizer: object
    arch: str
    image_size: int = 224
    extras: dict = field(default_factory=dict)


def load_clip(path: str | os.PathLike, arch: str = CLIP_ARCH) -> ClipModel:
    """An open_clip model of architecture ``arch`` (a name open_clip knows, e.g. ViT-B-32-quickgelu)
    with the state dict of ``path`` loaded strictly."""
    open_clip = import_open_clip()
    name = os.path.basename(os.fspath(path))
    arch = arch.strip()
    if arch not in open_clip.list_models():
        raise EvalModelError(f"architecture {arch!r} is not an open_clip model name (e.g. {CLIP_ARCH}, ViT-B-16, "
                             f"ViT-L-14-quickgelu)")
    sd = read_state_dict(path, "clip")
    if not any(k.startswith("visual.") for k in sd):
        raise EvalModelError(f"{name} is not an open_clip CLIP state dict (no visual.* tensors; its keys "
                             f"start {', '.join(sorted(sd)[:4])}). {download_hint('clip')}")
    model = open_clip.create_model(arch, pretrained=None)
    if "logit_scale" in sd and sd["logit_scale"].ndim != model.logit_scale.ndim:
        sd["logit_scale"] = sd["logit_scale"].reshape(model.logit_scale.shape)
    for key in ("input_resolution", "context_length", "vocab_size"):
        sd.pop(key, None)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise EvalModelError(f"{name} does not match the open_clip architecture {arch}: "
                             f"{str(exc).splitlines()[-1].strip()[:300]}. Pick the architecture the file was "
                             f"trained as; {download_hint('clip')}") from None
    size = getattr(model.visual, "image_size", 224)
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    return ClipModel(model.eval().float(), open_clip.get_tokenizer(arch), arch, size)


# ----------------------------------------------------------------------------- embeddings
Hook = Callable[..., None] | None


def _batched(fn, x: torch.Tensor, device, batch: int, check_interrupt: Hook = None, progress: Hook = None):
    """``fn`` over ``x`` in batches; ``check_interrupt()`` runs before each batch (ComfyUI's Cancel) and
    ``progress(n)`` after it, with ``n`` the images done so far."""
    out = []
    for i in range(0, x.shape[0], batch):
        if check_interrupt is not None:
            check_interrupt()
        out.append(fn(x[i:i + batch].to(device)).float().cpu())
        if progress is not None:
            progress(min(i + batch, x.shape[0]))
    return torch.cat(out)


@torch.no_grad()
def clip_image_embeds(clip: ClipModel, images: torch.Tensor, device="cpu", batch: int = 16,
                      check_interrupt: Hook = None, progress: Hook = None) -> torch.Tensor:
    """``[N, d]`` image embeddings of ComfyUI IMAGE ``[N, H, W, 3]`` (CLIP preprocessing, §3.1)."""
    return _batched(clip.model.encode_image, clip_preprocess(images, clip.image_size), device, batch,
                    check_interrupt, progress)


@torch.no_grad()
def clip_text_embeds(clip: ClipModel, texts: list[str], device="cpu") -> torch.Tensor:
    """``[N, d]`` text embeddings (open_clip's tokenizer truncates to the context length, like
    ``clip.tokenize(truncate=True)``)."""
    return clip.model.encode_text(clip.tokenizer(texts).to(device)).float().cpu()


@torch.no_grad()
def dino_embeds(model: DinoViT, images: torch.Tensor, device="cpu", batch: int = 16, check_interrupt: Hook = None,
                progress: Hook = None) -> torch.Tensor:
    """``[N, 384]`` DINO CLS embeddings of ComfyUI IMAGE ``[N, H, W, 3]`` (DINO preprocessing, §3.1)."""
    x = dino_preprocess(images)
    if model.config.image_size != 224:
        x = F.interpolate(x, size=(model.config.image_size,) * 2, mode="bicubic", align_corners=False)
    return _batched(model, x, device, batch, check_interrupt, progress)
