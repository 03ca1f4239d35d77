"""The Detect-and-Compare nodes inside a real ComfyUI, with a tiny random OWLv2 (transformers' own
classes) and a tiny random DreamSim folder in the release layout: the folder lists, the missing-folder
message, the score against the metric computed directly, the count gate, the annotated image and the
matrices. Skipped without ComfyUI (set COMFYUI_PATH) or transformers."""
from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
import torch

from comfy_sampling import load_image
from pack_paths import PACK_ROOT
from scorer_checks import check_cancel_mid_scoring, check_model_management

INPUTS = PACK_ROOT / "workflows" / "inputs"
NAMES = ("PersonalizeDetectCompareLoader", "PersonalizeDetectCompareSubject", "PersonalizeDetectCompare")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    pytest.importorskip("transformers")
    import comfy_host
    comfy_host.init_nodes_with_pack()
    mod = importlib.import_module("personalize_pack.nodes.detect_compare")
    import folder_paths
    from tiny_dreamsim import build_tiny_dreamsim
    from tiny_owl import build_tiny_owlv2
    d = tmp_path_factory.mktemp("dc_models") / "personalize_eval"
    build_tiny_owlv2(d / "owlv2-base-patch16-ensemble")
    build_tiny_dreamsim(d / "dreamsim")
    folder_paths.add_model_folder_path("personalize_eval", str(d))
    return d, mod


def node(name):
    import nodes
    return nodes.NODE_CLASS_MAPPINGS[name]


def photo(name, size=96):
    return load_image(INPUTS / name, size)


def subjects():
    s = node("PersonalizeDetectCompareSubject")
    chain = s.execute("cat", torch.cat([photo("personalize_cat_04.jpg"), photo("personalize_mip_1_cat.jpg")])).result[0]
    return s.execute("dog", torch.cat([photo("personalize_dog6_02.jpg"), photo("personalize_mip_3_dog.jpg")]),
                     chain).result[0]


def test_registered_with_tooltips_and_folders(env):
    import nodes
    for name in NAMES:
        assert name in nodes.NODE_CLASS_MAPPINGS, f"{name} is not registered in nodes/__init__.py"
        schema = nodes.NODE_CLASS_MAPPINGS[name].GET_SCHEMA()
        assert schema.category == "personalize/metrics" and schema.description
        assert all(i.tooltip for i in schema.inputs), [i.id for i in schema.inputs if not i.tooltip]
    req = node("PersonalizeDetectCompareLoader").INPUT_TYPES()["required"]
    assert "owlv2-base-patch16-ensemble" in req["detector"][1]["options"]
    assert "dreamsim" in req["embedder"][1]["options"]


def test_missing_folders_are_named(env):
    loader = node("PersonalizeDetectCompareLoader")
    msg = loader.validate_inputs(detector="owlv3", embedder="dreamsim")
    assert "detector: no folder 'owlv3'" in msg and "huggingface.co/google/owlv2-base-patch16-ensemble" in msg
    msg = loader.validate_inputs(detector="owlv2-base-patch16-ensemble", embedder="nope")
    assert "embedder: no folder 'nope'" in msg and "dreamsim_ensemble_checkpoint.zip" in msg
    assert loader.validate_inputs(detector="owlv2-base-patch16-ensemble", embedder="dreamsim") is True
    with pytest.raises(FileNotFoundError, match="embedder: no folder '../dreamsim'"):
        loader.execute("owlv2-base-patch16-ensemble", "../dreamsim")


def test_score_equals_the_metric_computed_directly(env):
    models = node("PersonalizeDetectCompareLoader").execute("owlv2-base-patch16-ensemble", "dreamsim").result[0]
    subs = subjects()
    gen = torch.cat([photo("personalize_mip_2_cat.jpg", 128), photo("personalize_dog6_02.jpg", 128)])
    # a threshold that keeps exactly two boxes of the first image, so the count gate passes there
    all_boxes = models.detector.detect(gen[0], ["cat", "dog"], 0.0)
    top = sorted((d.score for d in all_boxes), reverse=True)
    threshold = (top[1] + top[2]) / 2
    score, annotated, report, matrices, _ = node("PersonalizeDetectCompare").execute(models, gen, subs, threshold).result
    # independent: boxes from the detector, crops embedded, cosines and the spectral norm in numpy
    refs = [models.embedder.embed(list(s.images)).double().numpy() for s in subs]
    per_image = []
    for img in gen:
        dets = models.detector.detect(img, ["cat", "dog"], threshold)
        if len(dets) != 2:
            per_image.append(0.0)
            continue
        from personalize_pack.metrics.detect_compare import crop_boxes
        boxes = models.embedder.embed(crop_boxes(img, [d.box for d in dets])).double().numpy()
        cos = lambda a, b: a @ b.T / np.linalg.norm(a, axis=1)[:, None] / np.linalg.norm(b, axis=1)[None]
        g = np.array([[cos(refs[i], refs[j]).mean() for j in range(2)] for i in range(2)])
        a = np.stack([cos(boxes, refs[i]).mean(1) for i in range(2)], 1)
        first = int(np.argmax(a[:, 0]))
        rows = a[[first, 1 - first]]
        per_image.append(1 - np.linalg.norm(rows - g, ord=2))
    assert per_image[0] != 0.0
    assert score == pytest.approx(float(np.mean(per_image)), abs=1e-5)
    info = json.loads(matrices)
    assert info["subjects"] == ["cat", "dog"] and len(info["images"]) == 2
    assert info["images"][0]["score"] == pytest.approx(per_image[0], abs=1e-5)
    assert len(info["images"][0]["boxes"]) == 2 and sorted(info["images"][0]["matched_box_per_subject"]) == [0, 1]
    np.testing.assert_allclose(info["ground_truth"], np.array([[np.mean(refs[i] @ refs[j].T) for j in range(2)]
                                                               for i in range(2)]), atol=1e-5)
    assert annotated.shape == gen.shape and not torch.equal(annotated, gen)   # boxes drawn
    assert "2 box(es)" in report.splitlines()[1]
    # threshold 1 keeps no box: every image scores 0 and the images come back with only the caption
    s0, a0, r0, _, b0 = node("PersonalizeDetectCompare").execute(models, gen, subs, 1.0).result
    assert s0 == 0.0 and "0 boxes detected for 2 subjects" in r0 and b0 == [[], []]


def test_bad_input(env):
    models = node("PersonalizeDetectCompareLoader").execute("owlv2-base-patch16-ensemble", "dreamsim").result[0]
    dcn = node("PersonalizeDetectCompare")
    gen = photo("personalize_cat_04.jpg")
    with pytest.raises(ValueError, match="dc_models"):
        dcn.execute(object(), gen, subjects(), 0.4)
    with pytest.raises(ValueError, match="subjects: connect"):
        dcn.execute(models, gen, (), 0.4)
    with pytest.raises(ValueError, match="images: expected a ComfyUI IMAGE"):
        dcn.execute(models, gen[0], subjects(), 0.4)
    s = node("PersonalizeDetectCompareSubject")
    with pytest.raises(ValueError, match="name: give the subject's name"):
        s.execute("  ", gen)
    with pytest.raises(ValueError, match="'cat' is already a subject"):
        s.execute("cat", gen, s.execute("cat", gen).result[0])


# --- the boxes as ComfyUI's BOUNDING_BOX, and their round trip through SAM Mask and core nodes ----------

def detected(models, gen, threshold=0.0):
    return node("PersonalizeDetectCompare").execute(models, gen, subjects(), threshold).result


def test_boxes_output_is_cores_bounding_box_per_image(env):
    from comfy_api.latest import io
    models = node("PersonalizeDetectCompareLoader").execute("owlv2-base-patch16-ensemble", "dreamsim").result[0]
    outputs = node("PersonalizeDetectCompare").GET_SCHEMA().outputs
    assert outputs[-1].get_io_type() == io.BoundingBox.io_type == "BOUNDING_BOX" and outputs[-1].tooltip
    assert [o.get_io_type() for o in outputs[:4]] == ["FLOAT", "IMAGE", "STRING", "STRING"]   # old links keep
    gen = torch.cat([photo("personalize_mip_2_cat.jpg", 128), photo("personalize_dog6_02.jpg", 128)])
    threshold = 0.1
    *_, matrices, bboxes = detected(models, gen, threshold)
    assert isinstance(bboxes, list) and len(bboxes) == 2
    for img, frame in zip(gen, bboxes):
        want = models.detector.detect(img, ["cat", "dog"], threshold)
        assert len(frame) == len(want) > 0
        for box, d in zip(frame, want):
            x0, y0, x1, y1 = d.box
            assert box == pytest.approx({"x": x0, "y": y0, "width": x1 - x0, "height": y1 - y0,
                                         "label": ["cat", "dog"][d.label], "score": d.score})
    assert [len(i["boxes"]) for i in json.loads(matrices)["images"]] == [len(f) for f in bboxes]


def test_boxes_round_trip_through_sam_mask_and_cores_draw_bboxes(env):
    pytest.importorskip("segment_anything")
    import folder_paths
    from comfy_extras.nodes_rtdetr import DrawBBoxes
    from tiny_sam import save_tiny_sam
    sams = env[0].parent / "sams"
    save_tiny_sam(sams / "tiny_sam.pth")
    folder_paths.add_model_folder_path("sams", str(sams))
    sam = node("PersonalizeSAMModelLoader").execute("tiny_sam.pth", "cpu").result[0]
    models = node("PersonalizeDetectCompareLoader").execute("owlv2-base-patch16-ensemble", "dreamsim").result[0]
    gen = torch.cat([photo("personalize_mip_2_cat.jpg", 128), photo("personalize_dog6_02.jpg", 128)])
    *_, bboxes = detected(models, gen, 0.1)
    # keep two boxes per image: the image's own best two (different on the two images)
    picked = [sorted(frame, key=lambda b: -b["score"])[:2] for frame in bboxes]
    assert picked[0] != picked[1]
    sam_args = dict(mode="box", points="", negative_points="", box="", units="pixels", multimask="auto",
                    threshold=0.0, grid=4, min_confidence=0.88)
    masks = node("PersonalizeSAMMask").execute(sam, gen, bboxes=picked, **sam_args).result[0]
    assert masks.shape == (2, 128, 128)
    for i in range(2):
        # the same as typing each box (clipped to the picture) into the box text, the masks united
        want = torch.zeros(128, 128)
        for b in picked[i]:
            x0, y0 = max(b["x"], 0.0), max(b["y"], 0.0)
            x1, y1 = min(b["x"] + b["width"], 128.0), min(b["y"] + b["height"], 128.0)
            one = node("PersonalizeSAMMask").execute(sam, gen[i:i + 1], **dict(sam_args, box=f"{x0},{y0},{x1},{y1}"))
            want = torch.maximum(want, one.result[0][0])
        assert torch.equal(masks[i], want)
    # the boxes steer the mask: image 1 with image 2's boxes gets another mask
    swapped = node("PersonalizeSAMMask").execute(sam, gen, bboxes=picked[::-1], **sam_args).result[0]
    assert not torch.equal(swapped[0], masks[0])
    # an image with no box gets an empty mask; core's consumer draws the same boxes
    empty = node("PersonalizeSAMMask").execute(sam, gen, bboxes=[picked[0], []], **sam_args).result[0]
    assert torch.equal(empty[0], masks[0]) and float(empty[1].sum()) == 0.0
    drawn = DrawBBoxes.execute(bboxes=picked, image=gen).result[0]
    assert drawn.shape == gen.shape and not torch.allclose(drawn, gen)


def test_loads_through_model_management_with_progress_and_cancel(env):
    models = node("PersonalizeDetectCompareLoader").execute("owlv2-base-patch16-ensemble", "dreamsim").result[0]
    gen = torch.cat([photo("personalize_mip_2_cat.jpg", 64), photo("personalize_dog6_02.jpg", 64)])
    subs = subjects()
    run = lambda: node("PersonalizeDetectCompare").execute(models, gen, subs, 0.1).result[0]
    assert check_model_management(models, lambda m: m.extras["patcher"], run) == 2
    # the detector and the embedder both sit in the one patcher ComfyUI loads
    held = models.extras["patcher"].model.scorer
    assert held["detector"] is models.detector.model and held["embedder"] is models.embedder
    check_cancel_mid_scoring(run)
