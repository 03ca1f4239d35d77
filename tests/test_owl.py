"""The OWLv2 detector of Detect-and-Compare (metrics/owl.py) on a tiny random OWLv2 saved in the Hub
folder layout: detections against an independent post-processing of the raw model outputs, thresholds,
image layouts, non-square images, load errors and input checks."""
from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("transformers", reason="the OWLv2 detector needs transformers (pip install transformers)")

from personalize_pack.metrics.detect_compare import Detection
from personalize_pack.metrics.models import EvalModelError
from personalize_pack.metrics.owl import OWL_FOLDER, OwlDetector, image_to_pil, load_owlv2
from tiny_owl import IMAGE_SIZE, PATCH, build_tiny_owlv2

from pack_paths import PACK_ROOT

PHOTO = PACK_ROOT / "workflows" / "inputs" / "personalize_dog6_02.jpg"   # DreamBench dog6, shipped
QUERIES = ["dog", "monster toy"]
N_PATCHES = (IMAGE_SIZE // PATCH) ** 2


def photo(h: int, w: int) -> torch.Tensor:
    """The DreamBench dog photo resized to ``w`` x ``h`` as a ComfyUI image ``[H, W, 3]``."""
    im = Image.open(PHOTO).convert("RGB").resize((w, h), Image.BICUBIC)
    return torch.from_numpy(np.asarray(im).astype("float32") / 255.0)


@pytest.fixture(scope="module")
def owl_dir(tmp_path_factory):
    return build_tiny_owlv2(tmp_path_factory.mktemp("owl") / OWL_FOLDER)


@pytest.fixture(scope="module")
def detector(owl_dir):
    return load_owlv2(owl_dir)


def raw_outputs(detector, image: torch.Tensor, queries):
    """The model's logits ``[P, Q]`` and boxes ``[P, 4]`` (cx, cy, w, h relative to the padded square),
    from the tokenizer and image processor called directly."""
    pil = image_to_pil(image)
    tokens = detector.processor.tokenizer(list(queries), padding="max_length", return_tensors="pt")
    pixels = detector.processor.image_processor(pil, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = detector.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                             pixel_values=pixels)
    return out.logits[0].double(), out.pred_boxes[0].double()


def expected_detections(logits, boxes, threshold: float, side: float):
    """Post-processing written out: score = sigmoid(max logit over queries), label = its query, every
    patch above the threshold in patch order, corners = centre -/+ half size, times ``side`` (the side
    of the square the image was padded to, in pixels)."""
    best, labels = logits.max(dim=-1)
    scores = torch.sigmoid(best)
    cx, cy, w, h = boxes.unbind(-1)
    corners = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1) * side
    keep = scores > threshold
    return corners[keep], scores[keep], labels[keep]


def as_tensors(dets: list[Detection]):
    boxes = torch.tensor([d.box for d in dets], dtype=torch.float64).reshape(-1, 4)
    scores = torch.tensor([d.score for d in dets], dtype=torch.float64)
    labels = torch.tensor([d.label for d in dets], dtype=torch.long)
    return boxes, scores, labels


def assert_same(dets, expected):
    boxes, scores, labels = as_tensors(dets)
    e_boxes, e_scores, e_labels = expected
    assert labels.tolist() == e_labels.tolist()
    torch.testing.assert_close(scores, e_scores, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(boxes, e_boxes, atol=1e-4, rtol=1e-5)


# ---------------------------------------------------------------------------------- loading
def test_load_gives_float32_eval_model(detector, owl_dir):
    assert isinstance(detector, OwlDetector)
    assert detector.name == OWL_FOLDER
    assert not detector.model.training
    assert all(p.dtype == torch.float32 for p in detector.model.parameters())
    assert detector.model.config.model_type == "owlv2"
    assert detector.to("cpu") is detector and detector.device.type == "cpu"


# -------------------------------------------------------------------------------- detection
def test_detect_matches_independent_post_processing(detector):
    image = photo(96, 96)
    threshold = 0.5
    dets = detector.detect(image, QUERIES, threshold)
    logits, boxes = raw_outputs(detector, image, QUERIES)
    expected = expected_detections(logits, boxes, threshold, 96.0)
    assert 0 < len(dets) < N_PATCHES, "the threshold should keep some boxes and drop others"
    assert all(isinstance(d, Detection) and len(d.box) == 4 for d in dets)
    assert_same(dets, expected)
    assert {d.label for d in dets} == {0, 1}
    assert all(d.score > threshold for d in dets)


def test_threshold_zero_keeps_every_patch_and_one_keeps_none(detector):
    image = photo(80, 80)
    queries = ["dog", "monster toy", "can"]
    everything = detector.detect(image, queries, 0.0)
    assert len(everything) == N_PATCHES
    logits, boxes = raw_outputs(detector, image, queries)
    assert_same(everything, expected_detections(logits, boxes, 0.0, 80.0))
    assert [d.label for d in everything] == logits.argmax(dim=-1).tolist()
    assert {d.label for d in everything} <= {0, 1, 2}
    # pixel coordinates of an 80 x 80 image: box centres lie near the patch grid of that image
    b = torch.tensor([d.box for d in everything])
    centres = (b[:, :2] + b[:, 2:]) / 2
    assert float(centres.min()) > 0 and float(centres.max()) <= 80 + 1e-3
    assert detector.detect(image, queries, 1.0) == []


def test_default_threshold_is_demo_value(detector):
    image = photo(64, 64)
    assert detector.detect(image, QUERIES) == detector.detect(image, QUERIES, 0.4)


def test_batch_layout_gives_same_result(detector):
    image = photo(72, 72)
    assert detector.detect(image, QUERIES, 0.3) == detector.detect(image[None], QUERIES, 0.3)


def test_non_square_image_boxes_scale_by_padded_side(detector):
    """The processor pads to a square at the bottom/right; transformers >= 4.41 scales both coordinates
    by max(H, W), which gives pixels of the unpadded image (4.40 fails here)."""
    h, w = 64, 112
    image = photo(h, w)
    dets = detector.detect(image, QUERIES, 0.0)
    logits, boxes = raw_outputs(detector, image, QUERIES)
    assert_same(dets, expected_detections(logits, boxes, 0.0, float(max(h, w))))
    # not the (x * W, y * H) scaling of transformers < 4.41
    got = as_tensors(dets)[0]
    cx, cy, bw, bh = boxes.unbind(-1)
    y_by_height = torch.stack([cy - bh / 2, cy + bh / 2], dim=-1) * h
    assert not torch.allclose(got[:, [1, 3]], y_by_height, atol=1e-3)
    # the padding sits below the image: the processed rows under it are one constant per channel
    pixels = detector.processor.image_processor(image_to_pil(image), return_tensors="pt")["pixel_values"][0]
    pad_from = int(np.ceil(IMAGE_SIZE * h / w)) + 2
    below = pixels[:, pad_from:]
    assert float((below - below[:, :1, :1]).abs().max()) < 1e-5
    above = pixels[:, : IMAGE_SIZE * h // w - 2]
    assert float(above.std()) > 0.05
    # and a tall image works too
    tall = detector.detect(photo(90, 50), QUERIES, 0.0)
    assert len(tall) == N_PATCHES


def test_queries_go_to_the_processor_as_mudi_sends_them(detector):
    """One flat list of strings for the one PIL image, as MuDI's ``processor(text=queries, images=img)``."""
    calls = []

    class Recording:
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, *args, **kwargs):
            calls.append((args, kwargs))
            return self.inner(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    spy = OwlDetector(detector.model, Recording(detector.processor), "spy")
    image = photo(48, 40)
    assert spy.detect(image, tuple(QUERIES), 0.2) == detector.detect(image, QUERIES, 0.2)
    (args, kwargs), = calls
    assert args == ()
    assert kwargs["text"] == QUERIES and type(kwargs["text"]) is list
    assert isinstance(kwargs["images"], Image.Image) and kwargs["images"].mode == "RGB"
    assert kwargs["images"].size == (40, 48)
    assert kwargs["return_tensors"] == "pt"


def test_image_to_pil_rounds_to_uint8():
    image = torch.tensor([[[0.0, 0.5, 1.0], [0.2, 1.5, -0.3]]])
    pixels = np.asarray(image_to_pil(image))
    assert pixels.dtype == np.uint8 and pixels.shape == (1, 2, 3)
    assert pixels.tolist() == [[[0, 128, 255], [51, 255, 0]]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_detect_on_cuda_matches_cpu(owl_dir):
    cpu = load_owlv2(owl_dir)
    gpu = load_owlv2(owl_dir).to("cuda")
    image = photo(96, 96)
    a, b = cpu.detect(image, QUERIES, 0.0), gpu.detect(image, QUERIES, 0.0)
    assert gpu.device.type == "cuda"
    assert [d.label for d in a] == [d.label for d in b]
    torch.testing.assert_close(as_tensors(b)[0], as_tensors(a)[0], atol=1e-2, rtol=1e-3)
    torch.testing.assert_close(as_tensors(b)[1], as_tensors(a)[1], atol=1e-3, rtol=1e-3)


# ------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("queries, match", [
    ([], "queries: no subject names"),
    (["dog", "  "], "queries: name 2"),
    (["dog", ""], "queries: name 2"),
    ("dog", "queries: expected a list"),
    (["dog", 3], "queries: name 2"),
    (["monster " * 20], "queries: name 1 .* tokens"),
])
def test_bad_queries(detector, queries, match):
    with pytest.raises(ValueError, match=match):
        detector.detect(photo(32, 32), queries, 0.4)


@pytest.mark.parametrize("shape", [(32, 32), (32, 32, 4), (2, 32, 32, 3), (1, 3, 32, 32), (0, 32, 3)])
def test_bad_image_shape(detector, shape):
    with pytest.raises(ValueError, match="image"):
        detector.detect(torch.rand(shape), QUERIES, 0.4)


def test_bad_image_values(detector):
    with pytest.raises(ValueError, match="image"):
        detector.detect(torch.full((16, 16, 3), float("nan")), QUERIES, 0.4)
    with pytest.raises(ValueError, match="image"):
        detector.detect(torch.zeros(16, 16, 3, dtype=torch.uint8), QUERIES, 0.4)
    with pytest.raises(ValueError, match="image"):
        detector.detect(np.zeros((16, 16, 3), dtype=np.float32), QUERIES, 0.4)


@pytest.mark.parametrize("threshold", [-0.01, 1.01, float("nan"), "0.4", None, True])
def test_bad_threshold(detector, threshold):
    with pytest.raises(ValueError, match="threshold"):
        detector.detect(photo(32, 32), QUERIES, threshold)


# ------------------------------------------------------------------------------ load errors
@pytest.fixture
def copy_dir(owl_dir, tmp_path):
    def make():
        d = tmp_path / OWL_FOLDER
        shutil.copytree(owl_dir, d)
        return d
    return make


def test_missing_folder(tmp_path):
    d = tmp_path / "nowhere" / OWL_FOLDER
    with pytest.raises(EvalModelError, match="does not exist") as info:
        load_owlv2(d)
    msg = str(info.value)
    assert str(d) in msg
    assert "https://huggingface.co/google/owlv2-base-patch16-ensemble" in msg
    assert f"models/personalize_eval/{OWL_FOLDER}" in msg


@pytest.mark.parametrize("remove, named", [
    (["config.json"], "config.json"),
    (["model.safetensors"], "model.safetensors or pytorch_model.bin"),
    (["preprocessor_config.json"], "preprocessor_config.json"),
    (["tokenizer_config.json"], "tokenizer_config.json"),
    (["tokenizer.json", "vocab.json", "merges.txt"], "tokenizer.json (or vocab.json and merges.txt)"),
    (["tokenizer.json", "merges.txt"], "tokenizer.json (or vocab.json and merges.txt)"),
])
def test_missing_file(copy_dir, remove, named):
    d = copy_dir()
    for name in remove:
        (d / name).unlink(missing_ok=True)   # transformers 4.x's slow CLIPTokenizer writes no tokenizer.json
    with pytest.raises(EvalModelError) as info:
        load_owlv2(d)
    msg = str(info.value)
    assert str(d) in msg and named in msg
    assert "https://huggingface.co/google/owlv2-base-patch16-ensemble" in msg


def test_every_missing_file_is_named(copy_dir):
    d = copy_dir()
    for p in d.iterdir():
        p.unlink()
    with pytest.raises(EvalModelError) as info:
        load_owlv2(d)
    for named in ("config.json", "model.safetensors", "preprocessor_config.json", "tokenizer_config.json",
                  "tokenizer.json"):
        assert named in str(info.value)


def test_slow_tokenizer_files_alone_load(copy_dir, detector):
    """The Hub folder also has vocab.json + merges.txt; without tokenizer.json they are enough."""
    d = copy_dir()
    (d / "tokenizer.json").unlink(missing_ok=True)
    other = load_owlv2(d)
    image = photo(64, 64)
    assert other.detect(image, QUERIES, 0.0) == detector.detect(image, QUERIES, 0.0)


def test_processor_saved_by_transformers_5_loads(copy_dir, detector):
    """transformers 5's ``Owlv2Processor.save_pretrained`` keeps the image processor in
    processor_config.json instead of preprocessor_config.json."""
    d = copy_dir()
    (d / "preprocessor_config.json").unlink()
    detector.processor.save_pretrained(str(d))
    if not (d / "processor_config.json").is_file():
        pytest.skip("this transformers version saves preprocessor_config.json")
    (d / "preprocessor_config.json").unlink(missing_ok=True)
    image = photo(64, 64)
    assert load_owlv2(d).detect(image, QUERIES, 0.0) == detector.detect(image, QUERIES, 0.0)


@pytest.mark.parametrize("model_type", ["owlvit", "clip", None])
def test_wrong_model_type(copy_dir, model_type):
    d = copy_dir()
    config = json.loads((d / "config.json").read_text())
    if model_type is None:
        del config["model_type"]
    else:
        config["model_type"] = model_type
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(EvalModelError, match="not an OWLv2 detector") as info:
        load_owlv2(d)
    assert str(d / "config.json") in str(info.value) and repr(model_type) in str(info.value)


def test_damaged_config(copy_dir):
    d = copy_dir()
    (d / "config.json").write_text("{not json")
    with pytest.raises(EvalModelError, match="config.json is not a readable JSON"):
        load_owlv2(d)


def test_incomplete_weights(copy_dir):
    from safetensors.torch import load_file, save_file
    d = copy_dir()
    sd = load_file(str(d / "model.safetensors"))
    dropped = [k for k in sd if "class_head" in k]
    assert dropped
    save_file({k: v for k, v in sd.items() if k not in dropped}, str(d / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(EvalModelError, match="model.safetensors lacks") as info:
        load_owlv2(d)
    assert "class_head" in str(info.value)


def test_damaged_weights(copy_dir):
    d = copy_dir()
    (d / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(EvalModelError, match="model.safetensors does not load"):
        load_owlv2(d)


def test_transformers_missing(owl_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match="pip install transformers"):
        load_owlv2(owl_dir)
