"""Tiny random evaluation models for the scorer tests: a small DINO ViT in the pack's own class, and a
small open_clip CLIP architecture (registered with open_clip under its own name) built from open_clip's
own classes and saved as a state dict. ``OPEN_CLIP_ERROR`` says why open_clip cannot be imported, or is
None."""
from __future__ import annotations

import json

import torch

from personalize_pack.metrics import models as em

try:
    import open_clip
    OPEN_CLIP_ERROR = None
except Exception as exc:
    OPEN_CLIP_ERROR = f"{type(exc).__name__}: {exc}"

TINY_CLIP_ARCH = "Personalize-Tiny-CLIP-test"
TINY_CLIP_CFG = {"embed_dim": 16, "quick_gelu": True,
                 "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def tiny_dino(seed=0) -> em.DinoViT:
    torch.manual_seed(seed)
    m = em.DinoViT(em.DinoConfig(embed_dim=128, depth=2, heads=2, patch_size=16, image_size=32))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.1)
    return m.eval()


def register_tiny_clip(folder) -> None:
    """Registers the tiny architecture with open_clip (its public add_model_config)."""
    cfg = folder / f"{TINY_CLIP_ARCH}.json"
    if not cfg.exists():
        cfg.write_text(json.dumps(TINY_CLIP_CFG))
    if TINY_CLIP_ARCH not in open_clip.list_models():
        open_clip.add_model_config(cfg)


def save_tiny_clip(path, seed=0):
    """A random open_clip.model.CLIP built from open_clip's own classes, saved as a state dict."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    torch.manual_seed(seed)
    model = CLIP(embed_dim=16, vision_cfg=CLIPVisionCfg(**TINY_CLIP_CFG["vision_cfg"]),
                 text_cfg=CLIPTextCfg(**TINY_CLIP_CFG["text_cfg"]), quick_gelu=True)
    with torch.no_grad():                           # spread the embeddings so the cosines differ
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    sd = model.state_dict()
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, path)
    return model.eval()
