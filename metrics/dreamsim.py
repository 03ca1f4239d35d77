"""DreamSim's "ensemble" image embedding (v0.2.0 checkpoint), the embedder of MuDI's Detect-and-Compare
(docs/metrics.md §3.2), written in torch over the ViT of ``metrics/models.py`` and loaded from the
user's DreamSim folder. Pure torch and PIL; no ComfyUI, no dreamsim/peft/timm import.

What the dreamsim package (0.2.1, ``dreamsim(pretrained=True)``) computes, read from its code:

* three ViT-B/16 backbones in DINO's module layout, at 224 px, each on the same resized image
  (``Resize((224, 224), BICUBIC)`` of the PIL image, then ``ToTensor``) with its own normalisation:
  - DINO ViT-B/16 (ImageNet mean/std): the CLS token of the **last block's output, before the final
    norm** (a forward hook on block 11), 768-d;
  - OpenAI CLIP ViT-B/16 (CLIP mean/std, QuickGELU, LayerNorm eps 1e-5, ``ln_pre`` as ``pos_drop``):
    the CLS token after the final norm times ``proj``, 512-d;
  - OpenCLIP ViT-B/16 (laion400m; CLIP mean/std, GELU, eps 1e-5, ``ln_pre``): the same, 512-d;
* LoRA (peft, ``r`` 16, ``lora_alpha`` 0.5, on every block's ``qkv``) on all three; merged here into
  the weights once at load time (``W + alpha/r · B A``; peft's unmerged forward is the same sum);
* the 1792-d concatenation, centred by its own element mean and then divided by its norm
  (``normalize_embedding``: centring first, then the norm).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from ..files.checkpoints import read_checkpoint
from .detect_compare import image_to_pil
from .models import (DINO_B16_FILE, DREAMSIM_FOLDER, DinoViT, EvalModelError, dino_config_from_state_dict,
                     download_hint, read_state_dict)
from .scores import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD

IMAGE_SIZE = 224
DINO_FULL_FILE = "dino_vitb16_pretrain.pth"            # DINO's full training checkpoint, in DreamSim's zip
CLIP_FILE = "clip_vitb16_pretrain.pth.tar"
OPEN_CLIP_FILE = "open_clip_vitb16_pretrain.pth.tar"
LORA_FOLDER = "ensemble_lora"
# backbone order of the ensemble (``extractor_list`` indices in the LoRA file)
BACKBONES = ("dino_vitb16", "clip_vitb16", "open_clip_vitb16")
EMBED_DIM = 768 + 512 + 512


def normalize_embedding(e: torch.Tensor) -> torch.Tensor:
    """DreamSim's ``normalize_embeds``: subtract each row's element mean, then divide by the row norm."""
    e = e - e.mean(dim=-1, keepdim=True)
    return e / e.norm(dim=-1, keepdim=True)


def preprocess(images) -> torch.Tensor:
    """``[N, 3, 224, 224]`` in 0..1 from a list of ``[H, W, 3]`` images or an ``[N, H, W, 3]`` batch:
    PIL's bicubic resize to 224×224 (not aspect-preserving) and ``ToTensor``, as DreamSim's preprocess."""
    if isinstance(images, torch.Tensor):
        if images.dim() == 3:
            images = images.unsqueeze(0)
        if images.dim() != 4:
            raise ValueError(f"images: expected [N, H, W, 3] or a list of [H, W, 3], got {tuple(images.shape)}")
        images = list(images)
    if len(images) == 0:
        raise ValueError("images: nothing to embed")
    out = []
    for img in images:
        pil = image_to_pil(img[..., :3]).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).float() / 255.0)
    return torch.stack(out)


def _normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


class DreamSimEnsemble(nn.Module):
    """The three backbones and the two CLIP projections; ``embed`` gives the normalised 1792-d rows."""

    def __init__(self, dino: DinoViT, clip: DinoViT, clip_proj: torch.Tensor, open_clip: DinoViT,
                 open_clip_proj: torch.Tensor):
        super().__init__()
        self.dino, self.clip, self.open_clip = dino, clip, open_clip
        self.clip_proj = nn.Parameter(clip_proj.detach().float().clone(), requires_grad=False)
        self.open_clip_proj = nn.Parameter(open_clip_proj.detach().float().clone(), requires_grad=False)

    @property
    def device(self) -> torch.device:
        return self.clip_proj.device

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The raw 1792-d concatenation for ``x`` ``[N, 3, 224, 224]`` in 0..1."""
        d = self.dino.tokens(_normalise(x, IMAGENET_MEAN, IMAGENET_STD))[:, 0]
        xc = _normalise(x, CLIP_MEAN, CLIP_STD)
        c = self.clip(xc) @ self.clip_proj
        o = self.open_clip(xc) @ self.open_clip_proj
        return torch.cat([d, c, o], dim=-1)

    @torch.no_grad()
    def embed(self, images, batch: int = 16) -> torch.Tensor:
        """``[N, 1792]`` float32 CPU embeddings (centred, unit norm) of a list of ``[H, W, 3]`` images or
        an ``[N, H, W, 3]`` batch, in 0..1."""
        x = preprocess(images)
        rows = [normalize_embedding(self.features(x[i:i + batch].to(self.device)).float()).cpu()
                for i in range(0, x.shape[0], batch)]
        return torch.cat(rows)


# ----------------------------------------------------------------------------------- loading
def _require(path: Path, what: str) -> Path:
    if not path.is_file():
        raise EvalModelError(f"{path} is missing ({what}). {download_hint('dreamsim')}")
    return path


def _dino_backbone_state(folder: Path) -> dict[str, torch.Tensor]:
    """DINO ViT-B/16's backbone: the released file (torch.hub's cache in ``checkpoints/`` after a dreamsim
    run, or the folder itself), else the teacher backbone of the full checkpoint in DreamSim's zip (DINO
    released its teacher's backbone as the pretrained weights)."""
    for cand in (folder / "checkpoints" / DINO_B16_FILE, folder / DINO_B16_FILE):
        if cand.is_file():
            sd = read_state_dict(cand, "dreamsim")
            return {k: v for k, v in sd.items() if not k.startswith("head.")}
    full = folder / DINO_FULL_FILE
    if full.is_file():
        obj = read_checkpoint(full, EvalModelError, download_hint("dreamsim"))
        teacher = obj.get("teacher") if isinstance(obj, dict) else None
        if isinstance(teacher, dict):
            out = {}
            for k, v in teacher.items():
                k = k[len("module."):] if k.startswith("module.") else k
                if k.startswith("backbone.") and isinstance(v, torch.Tensor):
                    out[k[len("backbone."):]] = v
            if out:
                return out
        raise EvalModelError(f"{full} holds no DINO teacher backbone, and {DINO_B16_FILE} is not in {folder} "
                             f"or {folder / 'checkpoints'}. {download_hint('dreamsim')}")
    raise EvalModelError(f"DINO ViT-B/16 is missing: {DINO_B16_FILE} is not in {folder / 'checkpoints'} or "
                         f"{folder}. {download_hint('dreamsim')}")


def _build_vit(sd: dict[str, torch.Tensor], name: str, **overrides) -> DinoViT:
    model = DinoViT(dino_config_from_state_dict(sd, name, "dreamsim", **overrides))
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise EvalModelError(f"{name} does not match DreamSim's ViT layout: "
                             f"{str(exc).splitlines()[-1].strip()[:300]}. {download_hint('dreamsim')}") from None
    return model


def _clip_backbone_from_state(sd: dict, name: str, act: str) -> tuple[DinoViT, torch.Tensor]:
    """A CLIP tower in DINO's layout (``ln_pre`` as ``pos_drop``, LayerNorm eps 1e-5) and its ``proj``."""
    sd = dict(sd)
    proj = sd.pop("proj", None)
    if proj is None or proj.dim() != 2:
        raise EvalModelError(f"{name} has no 2-d 'proj' tensor (DreamSim's CLIP-as-DINO files carry the "
                             f"CLIP projection). {download_hint('dreamsim')}")
    model = _build_vit(sd, name, act=act, eps=1e-5)
    if proj.shape[0] != model.config.embed_dim:
        raise EvalModelError(f"{name}: proj is {tuple(proj.shape)}, expected ({model.config.embed_dim}, d)")
    return model, proj


def _clip_backbone(path: Path, act: str) -> tuple[DinoViT, torch.Tensor]:
    return _clip_backbone_from_state(read_state_dict(path, "dreamsim"), path.name, act)


LORA_KEY = re.compile(r"(?:^|\.)extractor_list\.(\d+)\.model\.(.+)\.lora_([AB])(?:\.[A-Za-z_]+)?\.weight$")


def read_lora(folder: Path) -> tuple[dict, dict]:
    """``(config, {(backbone index, module path): (A, B)})`` from a peft adapter folder
    (``adapter_config.json`` and ``adapter_model.safetensors`` or ``adapter_model.bin``)."""
    cfg_path = _require(folder / "adapter_config.json", "the LoRA's configuration")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        raise EvalModelError(f"{cfg_path} is not readable JSON ({exc}). {download_hint('dreamsim')}") from None
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)) or cfg[key] <= 0:
            raise EvalModelError(f"{cfg_path}: '{key}' must be a positive number, got {cfg.get(key)!r}")
    weights = next((p for p in (folder / "adapter_model.safetensors", folder / "adapter_model.bin") if p.is_file()),
                   None)
    if weights is None:
        raise EvalModelError(f"{folder} has no adapter_model.safetensors or adapter_model.bin (the LoRA weights). "
                             f"{download_hint('dreamsim')}")
    sd = read_state_dict(weights, "dreamsim")
    pairs: dict = {}
    for k, v in sd.items():
        m = LORA_KEY.search(k)
        if m is None:
            raise EvalModelError(f"{weights.name}: unexpected key {k!r} (expected peft LoRA keys "
                                 f"'...extractor_list.<i>.model.<module>.lora_A/B.weight')")
        pairs.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = v
    out = {}
    for (i, path), ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise EvalModelError(f"{weights.name}: {path} of backbone {i} has lora_{''.join(ab)} without its pair")
        out[(i, path)] = (ab["A"], ab["B"])
    if not out:
        raise EvalModelError(f"{weights.name} holds no LoRA weights")
    return cfg, out


@torch.no_grad()
def merge_lora(backbones: list[nn.Module], cfg: dict, pairs: dict) -> int:
    """Adds ``scale · B @ A`` to each targeted Linear weight (``scale = lora_alpha / r``, or ``/ sqrt(r)``
    with ``use_rslora``); returns the number of merged layers."""
    r = cfg["r"]
    scale = cfg["lora_alpha"] / (r ** 0.5 if cfg.get("use_rslora") else r)
    for (i, path), (a, b) in sorted(pairs.items()):
        if i >= len(backbones):
            raise EvalModelError(f"LoRA names backbone {i}; the ensemble has {len(backbones)}")
        try:
            module = backbones[i].get_submodule(path)
        except AttributeError:
            module = None
        if not isinstance(module, nn.Linear):
            raise EvalModelError(f"LoRA targets {path!r} of {BACKBONES[i]}, which is not a Linear layer there")
        w = module.weight
        if a.shape != (a.shape[0], w.shape[1]) or b.shape != (w.shape[0], a.shape[0]):
            raise EvalModelError(f"LoRA of {BACKBONES[i]}.{path}: A {tuple(a.shape)} and B {tuple(b.shape)} do not "
                                 f"fit the weight {tuple(w.shape)}")
        w += scale * (b.double() @ a.double()).to(w.dtype)
    return len(pairs)


def load_dreamsim(folder: str | os.PathLike) -> DreamSimEnsemble:
    """The DreamSim ensemble from the user's folder (``models/personalize_eval/dreamsim``), LoRA merged,
    eval mode, float32, on the CPU. Every missing or wrong file is an ``EvalModelError`` naming it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EvalModelError(f"the DreamSim folder {folder} does not exist. {download_hint('dreamsim')}")
    dino = _build_vit(_dino_backbone_state(folder), DINO_B16_FILE)
    clip, clip_proj = _clip_backbone(_require(folder / CLIP_FILE, "DreamSim's CLIP ViT-B/16"), "quick_gelu")
    oclip, oclip_proj = _clip_backbone(_require(folder / OPEN_CLIP_FILE, "DreamSim's OpenCLIP ViT-B/16"), "gelu")
    lora = folder / LORA_FOLDER
    if not lora.is_dir():
        raise EvalModelError(f"{lora} is missing (DreamSim's LoRA). {download_hint('dreamsim')}")
    cfg, pairs = read_lora(lora)
    merge_lora([dino, clip, oclip], cfg, pairs)
    return DreamSimEnsemble(dino, clip, clip_proj, oclip, oclip_proj).eval().float()


__all__ = ["DREAMSIM_FOLDER", "DreamSimEnsemble", "load_dreamsim", "normalize_embedding", "preprocess"]
