"""The embedder chosen by folder (metrics/embedders.py): DINOv2 (MuDI's D&C-DINO: the mean of the last
hidden state over every token) from a tiny random Hugging Face folder, against the model called
directly on the processor's input and an independent preprocessing; DreamSim for its folder; errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from personalize_pack.metrics import embedders as emb
from personalize_pack.metrics.dreamsim import DreamSimEnsemble
from personalize_pack.metrics.models import EvalModelError
from personalize_pack.metrics.scores import IMAGENET_MEAN, IMAGENET_STD
from tiny_dreamsim import build_tiny_dreamsim

transformers = pytest.importorskip("transformers")


def build_tiny_dinov2(folder):
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model
    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       patch_size=14, image_size=56)
    Dinov2Model(cfg).save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56},
                      image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD), do_convert_rgb=True,
                      resample=3).save_pretrained(folder)
    return folder


def photos():
    from pack_paths import PACK_ROOT
    files = ["personalize_cat_04.jpg", "personalize_dog6_02.jpg"]
    return [torch.from_numpy(np.asarray(Image.open(PACK_ROOT / "workflows" / "inputs" / f).convert("RGB")
                                        .resize((90, 70))).copy()).float() / 255 for f in files]


def test_dinov2_is_the_mean_of_the_last_hidden_state(tmp_path):
    d = build_tiny_dinov2(tmp_path / "dinov2-base")
    e = emb.load_embedder(d)
    assert isinstance(e, emb.DinoV2Embedder)
    imgs = photos()
    got = e.embed(imgs)
    assert got.shape == (2, 32)
    # independent preprocessing: 8-bit image, shorter side 64 (PIL bicubic), centre crop 56, ImageNet norm
    xs = []
    for img in imgs:
        pil = Image.fromarray((img.numpy() * 255).round().astype(np.uint8))
        w, h = pil.size
        s = 64 / min(w, h)
        pil = pil.resize((int(round(w * s)) if w > h else 64, 64 if w > h else int(round(h * s))), Image.BICUBIC)
        w, h = pil.size
        left, top = (w - 56) // 2, (h - 56) // 2
        a = np.asarray(pil.crop((left, top, left + 56, top + 56))).astype(np.float32) / 255
        xs.append((torch.from_numpy(a) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD))
    x = torch.stack(xs).permute(0, 3, 1, 2)
    with torch.no_grad():
        want = e.model(pixel_values=x).last_hidden_state.mean(dim=1)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(e.embed(torch.stack([imgs[0], imgs[0]])), got[[0, 0]], atol=1e-5, rtol=1e-5)


def test_folder_dispatch_and_errors(tmp_path):
    assert isinstance(emb.load_embedder(build_tiny_dreamsim(tmp_path / "dreamsim")), DreamSimEnsemble)
    with pytest.raises(EvalModelError, match="does not exist"):
        emb.load_embedder(tmp_path / "nope")
    other = tmp_path / "owl"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "owlv2"}))
    with pytest.raises(EvalModelError, match="holds a 'owlv2' model"):
        emb.load_embedder(other)
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.json").write_text(json.dumps({"model_type": "dinov2"}))
    with pytest.raises(EvalModelError, match="no model.safetensors"):
        emb.load_embedder(half)
