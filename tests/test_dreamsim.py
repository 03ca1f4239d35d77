"""DreamSim's ensemble embedder (metrics/dreamsim.py): the CLIP-as-DINO layout against open_clip's own
VisionTransformer, the LoRA merge against peft's unmerged sum, the DINO feature taken before the final
norm, DreamSim's normalisation, and the files' errors. (It was also checked against the dreamsim 0.2.1
package on random weights in the release layout: 1e-7.)"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from personalize_pack.metrics import dreamsim as ds
from personalize_pack.metrics.models import DINO_B16_FILE, EvalModelError
from personalize_pack.metrics.scores import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD
from tiny_dreamsim import build_tiny_dreamsim

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_dreamsim(tmp_path_factory.mktemp("dreamsim"))


def photos():
    from pack_paths import PACK_ROOT
    root = PACK_ROOT / "workflows" / "inputs"
    files = sorted(p for p in root.iterdir() if p.suffix == ".jpg")[:3]
    return [torch.from_numpy(np.asarray(Image.open(p).convert("RGB").resize((96, 64))).copy()).float() / 255
            for p in files]


def norm(x, mean, std):
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def test_normalize_embedding_centres_first_then_scales():
    e = torch.tensor([[1.0, 2.0, 6.0], [0.5, -1.0, 3.0]])
    got = ds.normalize_embedding(e)
    c = e - e.mean(1, keepdim=True)
    torch.testing.assert_close(got, c / c.norm(dim=1, keepdim=True))
    assert torch.allclose(got.mean(1), torch.zeros(2), atol=1e-7)
    assert torch.allclose(got.norm(dim=1), torch.ones(2))
    other = F.normalize(e, dim=1)
    assert not torch.allclose(got, other - other.mean(1, keepdim=True))      # the order matters


def test_preprocess_is_pils_bicubic_224_and_to_tensor():
    img = photos()[0]
    x = ds.preprocess([img])
    pil = Image.fromarray((img.numpy() * 255).round().astype(np.uint8)).resize((224, 224), Image.BICUBIC)
    want = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).float() / 255
    assert x.shape == (1, 3, 224, 224)
    torch.testing.assert_close(x[0], want)
    torch.testing.assert_close(ds.preprocess(img[None]), x)
    with pytest.raises(ValueError, match="images"):
        ds.preprocess([])
    with pytest.raises(ValueError, match="images"):
        ds.preprocess(torch.zeros(4, 4))


def test_embedding_is_the_three_features_concatenated_and_normalised(tiny):
    m = ds.load_dreamsim(tiny)
    imgs = photos()
    got = m.embed(imgs)
    assert got.shape == (3, 64 + 32 + 32) and got.dtype == torch.float32
    x = ds.preprocess(imgs)
    with torch.no_grad():
        # DINO: the CLS token of the last block's output, before the final norm (DreamSim's hook)
        t = m.dino.patch_embed(norm(x, IMAGENET_MEAN, IMAGENET_STD))
        t = torch.cat([m.dino.cls_token.expand(3, -1, -1), t], 1) + m.dino.pos_embed
        for blk in m.dino.blocks:
            t = blk(t)
        d = t[:, 0]
        xc = norm(x, CLIP_MEAN, CLIP_STD)
        c = m.clip(xc) @ m.clip_proj
        o = m.open_clip(xc) @ m.open_clip_proj
    raw = torch.cat([d, c, o], 1)
    raw = raw - raw.mean(1, keepdim=True)
    torch.testing.assert_close(got, raw / raw.norm(dim=1, keepdim=True), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(d, m.dino(norm(x, IMAGENET_MEAN, IMAGENET_STD)), atol=1e-3)   # not after the norm
    # batch size does not change the rows
    torch.testing.assert_close(m.embed(imgs, batch=1), got, atol=1e-6, rtol=1e-5)


class UnmergedLora(nn.Module):
    """peft's LoRA forward: base(x) + scale * B(A(x)) (dropout off in eval)."""

    def __init__(self, base, a, b, scale):
        super().__init__()
        self.base, self.a, self.b, self.scale = base, a, b, scale

    def forward(self, x):
        return self.base(x) + self.scale * F.linear(F.linear(x, self.a), self.b)


def test_lora_merge_equals_the_unmerged_sum(tiny, tmp_path):
    merged = ds.load_dreamsim(tiny)
    # the same folder without a LoRA effect: zero B
    plain_dir = tmp_path / "plain"
    shutil.copytree(tiny, plain_dir)
    from safetensors.torch import load_file, save_file
    lora_file = plain_dir / ds.LORA_FOLDER / "adapter_model.safetensors"
    sd = load_file(str(lora_file))
    save_file({k: (torch.zeros_like(v) if ".lora_B." in k else v) for k, v in sd.items()}, str(lora_file))
    plain = ds.load_dreamsim(plain_dir)
    cfg = json.loads((tiny / ds.LORA_FOLDER / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    for i, backbone in enumerate((plain.dino, plain.clip, plain.open_clip)):
        for j, blk in enumerate(backbone.blocks):
            key = f"base_model.model.extractor_list.{i}.model.blocks.{j}.attn.qkv"
            blk.attn.qkv = UnmergedLora(blk.attn.qkv, sd[key + ".lora_A.weight"], sd[key + ".lora_B.weight"], scale)
    imgs = photos()
    torch.testing.assert_close(merged.embed(imgs), plain.embed(imgs), atol=1e-5, rtol=1e-5)
    without = ds.load_dreamsim(plain_dir).embed(imgs)
    assert (merged.embed(imgs) - without).abs().max() > 1e-3                # the LoRA changes the embedding


def test_rslora_scale():
    lin = nn.Linear(4, 6)
    a, b = torch.randn(2, 4), torch.randn(6, 2)
    w0 = lin.weight.detach().clone()
    holder = nn.Module()
    holder.add_module("q", lin)
    ds.merge_lora([holder], {"r": 2, "lora_alpha": 3.0, "use_rslora": True}, {(0, "q"): (a, b)})
    torch.testing.assert_close(lin.weight.detach(), w0 + 3.0 / 2 ** 0.5 * (b @ a))


def test_clip_as_dino_layout_matches_open_clip():
    """DreamSim's CLIP files are open_clip's visual tower in DINO's names: conv1 → patch_embed (no bias),
    class/positional embeddings, ln_pre → pos_drop, in_proj → qkv, out_proj → proj, c_fc/c_proj → fc1/fc2,
    ln_post → norm, and ``proj`` beside. A tiny open_clip tower converted that way must embed alike."""
    open_clip = pytest.importorskip("open_clip")
    from open_clip.transformer import VisionTransformer
    for quick in (True, False):
        torch.manual_seed(1)
        act = open_clip.transformer.QuickGELU if quick else nn.GELU
        vt = VisionTransformer(image_size=224, patch_size=16, width=128, layers=2, heads=2, mlp_ratio=4.0,
                               output_dim=32, act_layer=act).eval()
        with torch.no_grad():
            for p in vt.parameters():
                p.add_(0.05 * torch.randn_like(p))
        s = vt.state_dict()
        sd = {"patch_embed.proj.weight": s["conv1.weight"], "patch_embed.proj.bias": torch.zeros(128),
              "cls_token": s["class_embedding"].view(1, 1, -1), "pos_embed": s["positional_embedding"][None],
              "pos_drop.weight": s["ln_pre.weight"], "pos_drop.bias": s["ln_pre.bias"],
              "norm.weight": s["ln_post.weight"], "norm.bias": s["ln_post.bias"]}
        for j in range(2):
            o, n = f"transformer.resblocks.{j}.", f"blocks.{j}."
            for a, b in (("ln_1", "norm1"), ("ln_2", "norm2"), ("attn.out_proj", "attn.proj"),
                         ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                sd[n + b + ".weight"], sd[n + b + ".bias"] = s[o + a + ".weight"], s[o + a + ".bias"]
            sd[n + "attn.qkv.weight"], sd[n + "attn.qkv.bias"] = s[o + "attn.in_proj_weight"], s[o + "attn.in_proj_bias"]
        ours, proj = ds._clip_backbone_from_state({**sd, "proj": s["proj"]}, "tiny", "quick_gelu" if quick else "gelu")
        x = torch.randn(2, 3, 224, 224)
        with torch.no_grad():
            torch.testing.assert_close(ours(x) @ proj, vt(x), atol=1e-4, rtol=1e-4)


def test_dino_backbone_locations(tmp_path):
    imgs = photos()[:1]
    ref = ds.load_dreamsim(build_tiny_dreamsim(tmp_path / "a", dino_in="checkpoints")).embed(imgs)
    for where in ("folder", "teacher"):
        got = ds.load_dreamsim(build_tiny_dreamsim(tmp_path / where, dino_in=where)).embed(imgs)
        torch.testing.assert_close(got, ref)


def test_missing_and_wrong_files(tiny, tmp_path):
    with pytest.raises(EvalModelError, match="does not exist.*dreamsim_ensemble_checkpoint.zip"):
        ds.load_dreamsim(tmp_path / "nope")
    for rel, pattern in ((ds.CLIP_FILE, "clip_vitb16_pretrain.pth.tar is missing"),
                         (ds.OPEN_CLIP_FILE, "open_clip_vitb16_pretrain.pth.tar is missing"),
                         (ds.LORA_FOLDER, "ensemble_lora is missing"),
                         (f"{ds.LORA_FOLDER}/adapter_config.json", "adapter_config.json is missing"),
                         (f"{ds.LORA_FOLDER}/adapter_model.safetensors", "no adapter_model.safetensors or "
                                                                          "adapter_model.bin"),
                         ("checkpoints", f"{DINO_B16_FILE}")):
        d = tmp_path / rel.replace("/", "_")
        shutil.copytree(tiny, d)
        target = d / rel
        shutil.rmtree(target) if target.is_dir() else target.unlink()
        with pytest.raises(EvalModelError, match=pattern):
            ds.load_dreamsim(d)
    # a LoRA aimed at a module that is not a Linear layer, and a LoRA of the wrong rank
    d = tmp_path / "badlora"
    shutil.copytree(tiny, d)
    from safetensors.torch import load_file, save_file
    f = d / ds.LORA_FOLDER / "adapter_model.safetensors"
    sd = load_file(str(f))
    save_file({k.replace("attn.qkv", "norm1"): v for k, v in sd.items()}, str(f))
    with pytest.raises(EvalModelError, match="not a Linear layer"):
        ds.load_dreamsim(d)
    save_file({k: (v[:, :-1].contiguous() if ".lora_A." in k else v) for k, v in sd.items()}, str(f))
    with pytest.raises(EvalModelError, match="do not fit the weight"):
        ds.load_dreamsim(d)
    save_file({k: v for k, v in sd.items() if ".lora_B." not in k}, str(f))
    with pytest.raises(EvalModelError, match="without its pair"):
        ds.load_dreamsim(d)
    # a CLIP file without its projection
    d = tmp_path / "noproj"
    shutil.copytree(tiny, d)
    obj = torch.load(d / ds.CLIP_FILE)
    obj["state_dict"].pop("proj")
    torch.save(obj, d / ds.CLIP_FILE)
    with pytest.raises(EvalModelError, match="no 2-d 'proj'"):
        ds.load_dreamsim(d)
