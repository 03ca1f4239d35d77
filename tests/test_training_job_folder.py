"""training/job_folder.py (the job folder's writer and reader, one format), training/dataset.py (the
nodes' data checks), training/report.py (loss curve, previews) and runner.run_with_progress, without
ComfyUI: a stand-in CLIP, VAE and ModelPatcher carry the tensors."""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from personalize_pack.training import job_folder as jf
from personalize_pack.training.dataset import (DatasetSubject, check_segmix_dataset, dataset_from_inputs,
                                               infusion_data_from_inputs)
from personalize_pack.training.report import loss_curve_image, preview_images, preview_picture
from personalize_pack.training.runner import run_with_progress
from personalize_pack.training.segmix import TEMPLATE, cover_resize


class StandInClip:
    """``tokenize`` / ``encode_from_tokens`` as a ComfyUI CLIP has them; the encoding of a text is a
    function of its length, so the reader's tensors can be matched to the texts."""

    def __init__(self, pooled: bool = True):
        self.pooled = pooled

    def tokenize(self, text):
        return {"l": text}

    def encode_from_tokens(self, tokens, return_pooled=False):
        n = float(len(tokens["l"]))
        cond = torch.full((1, 77, 8), n, dtype=torch.float16)
        return cond, (torch.full((1, 8), -n) if self.pooled else None)


def subjects():
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(2, 16, 16)
    masks[:, 4:12, 4:12] = 1
    data = dataset_from_inputs(torch.rand(2, 16, 16, 3, generator=g), masks, "olis cat", "a photo of {}\nthe {}")
    return dataset_from_inputs(torch.rand(1, 16, 16, 4, generator=g), masks[:1], "hta dog", "a photo of {}", "dog",
                               data)


# ====================================================================================== dataset

def test_dataset_subjects_and_captions():
    data = subjects()
    assert [s.identifier for s in data] == ["olis", "dog"] and all(isinstance(s, DatasetSubject) for s in data)
    assert data[0].captions == ("a photo of olis cat", "the olis cat") and data[1].captions == ("a photo of hta dog",)
    assert data[1].images.shape == (1, 16, 16, 3) and data[0].masks.dtype == torch.float32
    check_segmix_dataset(data, 0.3)
    with pytest.raises(ValueError, match="segmix_prob"):
        check_segmix_dataset(data[:1], 0.3)
    check_segmix_dataset(data[:1], 0.0)
    with pytest.raises(ValueError, match="dataset: connect"):
        check_segmix_dataset((), 0.0)


def test_dataset_refuses_bad_inputs():
    img, m = torch.rand(2, 8, 8, 3), torch.ones(2, 8, 8)
    with pytest.raises(ValueError, match="images: expected"):
        dataset_from_inputs(img[0], m, "olis cat", "")
    with pytest.raises(ValueError, match="masks: 3 masks for 2 images"):
        dataset_from_inputs(img, torch.ones(3, 8, 8), "olis cat", "")
    with pytest.raises(ValueError, match="empty"):
        dataset_from_inputs(img, torch.zeros(2, 8, 8), "olis cat", "")
    with pytest.raises(ValueError, match="captions: 3 lines for 2 images"):
        dataset_from_inputs(img, m, "olis cat", "a\nb\nc")
    one = dataset_from_inputs(img, m, "olis cat", "")
    with pytest.raises(ValueError, match="identifier: 'olis' is already"):
        dataset_from_inputs(img, m, "olis dog", "", "", one)


def test_infusion_data_is_resized_and_checked():
    word, imgs, masks = infusion_data_from_inputs(torch.rand(2, 24, 32, 3), None, " cat ", 16)
    assert word == "cat" and imgs.shape == (2, 16, 16, 3) and masks.shape == (2, 16, 16)
    assert torch.equal(masks, torch.ones(2, 16, 16))
    # each soft mask divided by its own maximum, as infusion/dataset.py's ``mask / mask.max()``
    soft = torch.zeros(2, 24, 32)
    soft[0, 4:20, 8:24] = 0.4
    soft[0, 10:14, 14:18] = 0.5
    soft[1] = torch.linspace(0.0, 0.25, 32)
    _, _, norm = infusion_data_from_inputs(torch.rand(2, 24, 32, 3), soft, "cat", 24)
    raw = torch.stack([cover_resize(soft[i, ..., None], 24)[..., 0] for i in range(2)])
    assert torch.allclose(norm, raw / raw.flatten(1).amax(1)[:, None, None])
    assert [float(norm[i].max()) for i in range(2)] == [1.0, 1.0] and float(norm[0, 5, 9]) == pytest.approx(0.8)
    with pytest.raises(ValueError, match=r"masks: the mask of image 1, 2 of 2 is empty"):
        infusion_data_from_inputs(torch.rand(2, 24, 32, 3), torch.zeros(1, 24, 32), "cat", 16)
    with pytest.raises(ValueError, match="concept_word"):
        infusion_data_from_inputs(torch.rand(1, 8, 8, 3), None, "  ", 16)
    with pytest.raises(ValueError, match="masks: 1 masks of 4x4 for 1 images of 8x8"):
        infusion_data_from_inputs(torch.rand(1, 8, 8, 3), torch.ones(1, 4, 4), "cat", 16)
    with pytest.raises(ValueError, match="images"):
        infusion_data_from_inputs(torch.rand(8, 8, 3), None, "cat", 16)


# the official templates and the concept word's index in each (zwl666666/infusion, infusion/dataset.py)
OFFICIAL_INFUSION_TEMPLATES = {"a photo of a {}": 4, "a good photo of a {}": 5, "the photo of a {}": 4,
                               "a good photo of the {}": 5, "image of a {}": 3, "image of the {}": 3,
                               "A photograph of {}": 3, "A {} shown in a photo ": 1, "A photo of {}": 3, "A {}": 1,
                               "{}": 0}


def test_infusion_templates_are_the_official_eleven():
    assert jf.INFUSION_TEMPLATES == tuple(OFFICIAL_INFUSION_TEMPLATES)
    # the official index is the word's place among the space-separated words
    for t, idx in OFFICIAL_INFUSION_TEMPLATES.items():
        assert t.format("cat").split().index("cat") == idx


# ====================================================================================== job folder

def test_segmix_data_round_trip(tmp_path):
    data = subjects()
    jf.write_segmix_data(data, StandInClip(), str(tmp_path), TEMPLATE, "  a photo of olis cat  ", 7)
    tensors, meta = jf.read_data(tmp_path)
    pairs = [TEMPLATE.format("olis cat", "hta dog"), TEMPLATE.format("hta dog", "olis cat")]
    assert meta["captions"] == ["a photo of olis cat", "the olis cat", "a photo of hta dog", *pairs]
    assert meta["phrases"] == {"olis": "olis cat", "dog": "hta dog"}
    assert [im["identifier"] for im in meta["images"]] == ["olis", "olis", "dog"]
    assert meta["validation"] == {"prompt": "a photo of olis cat", "seed": 7}
    for k, (s, i) in enumerate(((0, 0), (0, 1), (1, 0))):
        assert torch.equal(tensors[f"image.{k}"], data[s].images[i]) and torch.equal(tensors[f"mask.{k}"], data[s].masks[i])
    for i, text in enumerate(meta["captions"]):
        assert tensors[f"cond.{i}"].dtype == torch.float32 and float(tensors[f"cond.{i}"][0, 0, 0]) == len(text)
        assert float(tensors[f"pooled.{i}"][0, 0]) == -len(text)
    assert float(tensors["val_cond.0"][0, 0, 0]) == len("a photo of olis cat") and float(tensors["val_cond.1"].max()) == 0
    jf.write_segmix_data(data, StandInClip(pooled=False), str(tmp_path), TEMPLATE, "", 0)
    tensors, meta = jf.read_data(tmp_path)
    assert "validation" not in meta and not [k for k in tensors if "pooled" in k or k.startswith("val_")]


def test_model_and_vae_round_trip(tmp_path, monkeypatch):
    loaded = []
    fake_mm = types.SimpleNamespace(load_models_gpu=lambda models, force_patch_weights: loaded.append(models))
    monkeypatch.setitem(sys.modules, "comfy", types.ModuleType("comfy"))
    monkeypatch.setitem(sys.modules, "comfy.model_management", fake_mm)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.Conv2d(3, 2, 3))
    patcher = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=net))
    fingerprint = jf.write_model(patcher, str(tmp_path))
    assert loaded == [[patcher]]
    sd = jf.read_tensors(tmp_path / jf.MODEL_FILE)
    assert sd.keys() == net.state_dict().keys() and all(torch.equal(sd[k], v) for k, v in net.state_dict().items())
    assert fingerprint == jf.model_fingerprint(sd) == jf.model_fingerprint(dict(reversed(list(sd.items()))))
    with torch.no_grad():
        net[0].bias.add_(1.0)
    assert jf.write_model(patcher, str(tmp_path)) != fingerprint
    assert jf.model_fingerprint({**sd, "extra": torch.zeros(1)}) != fingerprint
    jf.write_vae(types.SimpleNamespace(first_stage_model=nn.Linear(2, 2)), str(tmp_path))
    assert set(jf.read_tensors(tmp_path / jf.VAE_FILE)) == {"weight", "bias"}
    assert jf.load_vae(tmp_path / "no_such_job", torch.device("cpu")) is None
    with pytest.raises(FileNotFoundError, match="the job folder lacks data.safetensors"):
        jf.read_data(tmp_path / "no_such_job")


def test_config_round_trip(tmp_path):
    config = {"kind": "toy", "output": str(tmp_path / "o.safetensors"), "state_dir": str(tmp_path / "s"), "steps": 3,
              "seed": 1, "device": "cuda:1"}
    jf.write_config(str(tmp_path), config)
    assert json.loads((tmp_path / jf.CONFIG_FILE).read_text()) == config
    assert jf.load_config(tmp_path) == {**jf.DEFAULTS, **config}
    jf.write_config(str(tmp_path), {**config, "steps": 0})
    with pytest.raises(jf.ConfigError, match="steps must be an integer >= 1"):
        jf.load_config(tmp_path)


# ====================================================================================== report

def test_loss_curve_and_previews(tmp_path):
    curve = loss_curve_image([1.0, float("nan"), 0.5, 0.25])
    assert curve.shape == (1, 320, 640, 3) and float(curve.min()) < 0.5 and float(curve.max()) == 1.0
    assert torch.equal(loss_curve_image([]), loss_curve_image([float("inf")]))
    assert loss_curve_image([2.0], width=200, height=100).shape == (1, 100, 200, 3)
    assert torch.equal(preview_images([]), torch.zeros(1, 64, 64, 3))
    paths = []
    for i, size in enumerate(((8, 6), (8, 6), (4, 4))):
        p = tmp_path / f"p{i}.png"
        (Image.new("L", size, 200) if i == 1 else Image.new("RGB", size, (200, 200, 200))).save(p)   # a grey
        paths.append(str(p))
    batch = preview_images(paths)
    assert batch.shape == (2, 6, 8, 3) and torch.allclose(batch, torch.full_like(batch, 200 / 255))
    assert preview_picture(paths[1]).mode == "RGB"


def test_run_with_progress_reports_steps_and_previews(tmp_path):
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    jf.write_config(str(job_dir), {"kind": "toy", "output": str(tmp_path / "toy.safetensors"),
                                   "state_dir": str(tmp_path / "state"), "steps": 4, "seed": 0, "checkpoint_every": 2,
                                   "validate_every": 2, "threads": 1, "batch": 4, "samples": 8})
    seen = []
    result = run_with_progress(job_dir, lambda step, preview: seen.append((step, preview)))
    previews = [Path(p).name for _, p in seen if p is not None]
    assert [s for s, p in seen if p is None] == [0, 1, 2, 3, 4] and previews == ["preview_000002.png",
                                                                                  "preview_000004.png"]
    assert [Path(p).name for p in result["preview_paths"]] == previews and result["steps"] == 4
