"""The evaluation models (metrics/models.py): the DINO ViT's official key layout, saving and strict
reloading, tiny random open_clip CLIP models built from open_clip's own classes, CLIP-T / CLIP-I / DINO
against an independent computation from the same embeddings, and bad files."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from personalize_pack.metrics import models as em
from personalize_pack.metrics.scores import clip_preprocess, clip_t, dino_preprocess, pairwise_mean_cosine

from tiny_scorers import OPEN_CLIP_ERROR, TINY_CLIP_ARCH, register_tiny_clip, save_tiny_clip, tiny_dino

needs_open_clip = pytest.mark.skipif(OPEN_CLIP_ERROR is not None,
                                     reason=f"open_clip cannot be imported ({OPEN_CLIP_ERROR}); "
                                            f"pip install open_clip_torch (tools/run_tests.sh installs it)")


def official_dino_vits16_shapes() -> dict[str, tuple]:
    """Every tensor of dino_deitsmall16_pretrain.pth (facebookresearch/dino vision_transformer.py,
    vit_small: 384 wide, 12 blocks, 16 px patches, 224 px), written out by hand."""
    d, h = 384, 1536
    shapes = {"cls_token": (1, 1, d), "pos_embed": (1, 197, d), "patch_embed.proj.weight": (d, 3, 16, 16),
              "patch_embed.proj.bias": (d,), "norm.weight": (d,), "norm.bias": (d,)}
    for i in range(12):
        b = f"blocks.{i}."
        shapes.update({b + "norm1.weight": (d,), b + "norm1.bias": (d,), b + "attn.qkv.weight": (3 * d, d),
                       b + "attn.qkv.bias": (3 * d,), b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
                       b + "norm2.weight": (d,), b + "norm2.bias": (d,), b + "mlp.fc1.weight": (h, d),
                       b + "mlp.fc1.bias": (h,), b + "mlp.fc2.weight": (d, h), b + "mlp.fc2.bias": (d,)})
    return shapes


def images(n, seed, h=40, w=56):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, h, w, 3, generator=g)


# ---------------------------------------------------------------------------------------- DINO

def test_dino_vits16_has_the_official_keys_and_shapes():
    got = {k: tuple(v.shape) for k, v in em.DinoViT().state_dict().items()}
    assert got == official_dino_vits16_shapes()
    cfg = em.dino_config_from_state_dict({k: torch.empty(s) for k, s in official_dino_vits16_shapes().items()})
    assert cfg == em.DinoConfig()                 # 384 wide, 12 blocks, 6 heads, 16 px, 224 px


def test_dino_forward_is_the_cls_token_after_the_final_norm():
    m = tiny_dino()
    x = torch.randn(2, 3, 32, 32)
    # independent forward: the official block order written out with explicit attention
    t = m.patch_embed.proj(x).flatten(2).transpose(1, 2)
    t = torch.cat([m.cls_token.expand(2, -1, -1), t], 1) + m.pos_embed
    for blk in m.blocks:
        y = F.layer_norm(t, (128,), blk.norm1.weight, blk.norm1.bias, 1e-6)
        q, k, v = blk.attn.qkv(y).reshape(2, t.shape[1], 3, 2, 64).permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-2, -1)) * 64 ** -0.5).softmax(-1)
        t = t + blk.attn.proj((a @ v).transpose(1, 2).reshape(2, -1, 128))
        y = F.layer_norm(t, (128,), blk.norm2.weight, blk.norm2.bias, 1e-6)
        t = t + blk.mlp.fc2(F.gelu(blk.mlp.fc1(y)))
    want = F.layer_norm(t, (128,), m.norm.weight, m.norm.bias, 1e-6)[:, 0]
    torch.testing.assert_close(m(x), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fmt", ["pth", "safetensors", "nested"])
def test_dino_save_reload_and_score(tmp_path, fmt):
    m = tiny_dino()
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    if fmt == "safetensors":
        from safetensors.torch import save_file
        path = tmp_path / "dino.safetensors"
        save_file(sd, str(path))
    else:
        path = tmp_path / "dino.pth"
        torch.save({"teacher": {"backbone." + k: v for k, v in sd.items()}} if fmt == "nested" else sd, path)
    loaded = em.load_dino(path)
    assert loaded.config == m.config
    gen, ref = images(3, 1), images(2, 2, 64, 48)
    g = em.dino_embeds(loaded, gen)
    r = em.dino_embeds(loaded, ref)
    # independent: preprocess (256 / 224), resize to the tiny model's 32 px, the original module
    def emb(x):
        x = F.interpolate(dino_preprocess(x), size=(32, 32), mode="bicubic", align_corners=False)
        return m(x)
    with torch.no_grad():
        ge, re = emb(gen), emb(ref)
    torch.testing.assert_close(g, ge, atol=1e-5, rtol=1e-5)
    want = sum(F.cosine_similarity(a, b, dim=0).item() for a in ge for b in re) / 6
    assert float(pairwise_mean_cosine(g, r)) == pytest.approx(want, abs=1e-5)


def test_dino_errors_name_the_file(tmp_path):
    with pytest.raises(em.EvalModelError, match="does not exist.*dino_deitsmall16_pretrain.pth"):
        em.load_dino(tmp_path / "nope.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(em.EvalModelError, match="empty.pth is empty"):
        em.load_dino(tmp_path / "empty.pth")
    (tmp_path / "page.pth").write_bytes(b"<!DOCTYPE html><html>login</html>")
    with pytest.raises(em.EvalModelError, match="page.pth is not a PyTorch.*web page"):
        em.load_dino(tmp_path / "page.pth")
    torch.save({"visual.conv1.weight": torch.zeros(2, 3, 4, 4)}, tmp_path / "clip.pth")
    with pytest.raises(em.EvalModelError, match="clip.pth is not a DINO ViT checkpoint.*cls_token"):
        em.load_dino(tmp_path / "clip.pth")
    sd = tiny_dino().state_dict()
    sd["blocks.0.extra"] = torch.zeros(1)
    torch.save(sd, tmp_path / "extra.pth")
    with pytest.raises(em.EvalModelError, match="extra.pth does not match the DINO ViT layout"):
        em.load_dino(tmp_path / "extra.pth")
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "pickled.pth")
    with pytest.raises(em.EvalModelError, match="pickled.pth holds pickled Python objects"):
        em.load_dino(tmp_path / "pickled.pth")
    data = (tmp_path / "extra.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(em.EvalModelError, match="cut.pth is damaged"):
        em.load_dino(tmp_path / "cut.pth")


# ---------------------------------------------------------------------------------------- CLIP

@needs_open_clip
@pytest.mark.parametrize("name", ["tiny_clip.bin", "tiny_clip.safetensors"])
def test_clip_t_and_clip_i_match_an_independent_computation(tmp_path, name):
    import open_clip
    register_tiny_clip(tmp_path)
    ref_model = save_tiny_clip(tmp_path / name)
    clip = em.load_clip(tmp_path / name, TINY_CLIP_ARCH)
    assert clip.image_size == 32 and clip.arch == TINY_CLIP_ARCH
    gen, ref = images(3, 3), images(2, 4, 50, 30)
    prompts = ["a photo of a dog", "a cat on a sofa", "a red barn " * 40]      # the last one is truncated
    g = em.clip_image_embeds(clip, gen)
    t = em.clip_text_embeds(clip, prompts)
    r = em.clip_image_embeds(clip, ref)
    tokenizer = open_clip.get_tokenizer(TINY_CLIP_ARCH)
    with torch.no_grad():
        ge = ref_model.encode_image(clip_preprocess(gen, 32))
        te = ref_model.encode_text(tokenizer(prompts))
        re = ref_model.encode_image(clip_preprocess(ref, 32))
    torch.testing.assert_close(g, ge, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(t, te, atol=1e-5, rtol=1e-5)
    want_t = [2.5 * max(0.0, F.cosine_similarity(a, b, dim=0).item()) for a, b in zip(ge, te)]
    assert clip_t(g, t).tolist() == pytest.approx(want_t, abs=1e-5)
    want_i = sum(F.cosine_similarity(a, b, dim=0).item() for a in ge for b in re) / 6
    assert float(pairwise_mean_cosine(g, r)) == pytest.approx(want_i, abs=1e-5)
    assert not math.isclose(want_i, 1.0)


@needs_open_clip
def test_clip_errors(tmp_path):
    register_tiny_clip(tmp_path)
    with pytest.raises(em.EvalModelError, match="does not exist.*open_clip_pytorch_model.bin"):
        em.load_clip(tmp_path / "nope.bin", TINY_CLIP_ARCH)
    with pytest.raises(em.EvalModelError, match="'No-Such-Arch' is not an open_clip model name"):
        em.load_clip(tmp_path / "nope.bin", "No-Such-Arch")
    torch.save(tiny_dino().state_dict(), tmp_path / "dino.pth")
    with pytest.raises(em.EvalModelError, match="dino.pth is not an open_clip CLIP state dict"):
        em.load_clip(tmp_path / "dino.pth", TINY_CLIP_ARCH)
    save_tiny_clip(tmp_path / "tiny.bin")
    with pytest.raises(em.EvalModelError, match="tiny.bin does not match the open_clip architecture ViT-B-32"):
        em.load_clip(tmp_path / "tiny.bin", "ViT-B-32-quickgelu")


def test_missing_open_clip_says_what_to_install(monkeypatch):
    import builtins
    real = builtins.__import__

    def fake(name, *a, **kw):
        if name == "open_clip":
            raise ImportError("No module named 'open_clip'")
        return real(name, *a, **kw)
    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(ImportError, match="pip install open_clip_torch"):
        em.load_clip("whatever.bin")
