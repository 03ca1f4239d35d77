"""A tiny random DreamSim folder in the release's layout (the files ``dreamsim(pretrained=True)`` reads,
with the DINO backbone where torch.hub caches it), for the tests and the benchmark: three 224 px ViTs
of width ``width`` in DINO's key layout, the CLIP projections and a peft-style LoRA on every ``qkv``."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from personalize_pack.metrics import dreamsim as ds
from personalize_pack.metrics.models import DINO_B16_FILE, DinoConfig, DinoViT


def random_vit(seed: int, width: int = 64, depth: int = 1, pre_norm: bool = False, **kw) -> DinoViT:
    g = torch.Generator().manual_seed(seed)
    m = DinoViT(DinoConfig(embed_dim=width, depth=depth, heads=max(1, width // 64), patch_size=16, image_size=224,
                           pre_norm=pre_norm, **kw))
    with torch.no_grad():
        for name, p in m.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            is_norm = "norm" in name or name.startswith("pos_drop")
            p.copy_((1 + 0.1 * noise if name.endswith("weight") else 0.1 * noise) if is_norm else 0.05 * noise)
    return m.eval()


def lora_state(backbones, rank: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, m in enumerate(backbones):
        for j, blk in enumerate(m.blocks):
            w = blk.attn.qkv.weight
            key = f"base_model.model.extractor_list.{i}.model.blocks.{j}.attn.qkv"
            out[f"{key}.lora_A.weight"] = 0.3 * torch.randn(rank, w.shape[1], generator=g)
            out[f"{key}.lora_B.weight"] = 0.3 * torch.randn(w.shape[0], rank, generator=g)
    return out


def build_tiny_dreamsim(folder, width: int = 64, depth: int = 1, rank: int = 4, alpha: float = 2.0,
                        seed: int = 0, dino_in: str = "checkpoints") -> Path:
    """Writes the folder; ``dino_in`` = "checkpoints" (torch.hub's cache), "folder" or "teacher" (only the
    full DINO checkpoint with a teacher backbone). Returns the folder."""
    folder = Path(folder)
    (folder / ds.LORA_FOLDER).mkdir(parents=True, exist_ok=True)
    dino = random_vit(seed, width, depth)
    clip = random_vit(seed + 1, width, depth, pre_norm=True, act="quick_gelu", eps=1e-5)
    oclip = random_vit(seed + 2, width, depth, pre_norm=True, eps=1e-5)
    g = torch.Generator().manual_seed(seed + 3)
    sd = dino.state_dict()
    if dino_in == "checkpoints":
        (folder / "checkpoints").mkdir(exist_ok=True)
        torch.save(sd, folder / "checkpoints" / DINO_B16_FILE)
    elif dino_in == "folder":
        torch.save(sd, folder / DINO_B16_FILE)
    head = {"module.head.mlp.0.weight": torch.randn(8, width, generator=g)}
    teacher = {"backbone." + k: v for k, v in sd.items()} if dino_in == "teacher" else {}
    torch.save({"student": head, "teacher": teacher}, folder / ds.DINO_FULL_FILE)
    for m, name in ((clip, ds.CLIP_FILE), (oclip, ds.OPEN_CLIP_FILE)):
        state = dict(m.state_dict())
        state["proj"] = 0.1 * torch.randn(width, 32, generator=g)
        torch.save({"state_dict": state}, folder / name)
    cfg = {"r": rank, "lora_alpha": alpha, "lora_dropout": 0.3, "bias": "none", "target_modules": ["qkv"],
           "peft_type": "LORA"}
    (folder / ds.LORA_FOLDER / "adapter_config.json").write_text(json.dumps(cfg))
    from safetensors.torch import save_file
    save_file(lora_state([dino, clip, oclip], rank, seed + 4), str(folder / ds.LORA_FOLDER / "adapter_model.safetensors"))
    return folder
