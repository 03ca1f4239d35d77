"""The evaluation nodes inside a real ComfyUI: the personalize_eval folder, Evaluation Model Loader,
CLIP Score and DINO Score on the shipped photos with tiny random models, and the missing-file message.
Skipped without ComfyUI (set COMFYUI_PATH); the CLIP parts also without open_clip."""
from __future__ import annotations

import importlib
import math

import pytest
import torch

from comfy_sampling import load_image
from scorer_checks import check_cancel_mid_scoring, check_model_management
from pack_paths import PACK_ROOT
from tiny_scorers import OPEN_CLIP_ERROR, TINY_CLIP_ARCH, register_tiny_clip, save_tiny_clip, tiny_dino

needs_open_clip = pytest.mark.skipif(OPEN_CLIP_ERROR is not None,
                                     reason=f"open_clip cannot be imported ({OPEN_CLIP_ERROR}); "
                                            f"pip install open_clip_torch")
INPUTS = PACK_ROOT / "workflows" / "inputs"
NAMES = ("PersonalizeEvalModelLoader", "PersonalizeCLIPScore", "PersonalizeDINOScore")


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory):
    import comfy_host
    comfy_host.init_nodes_with_pack()
    scores = importlib.import_module("personalize_pack.nodes.scores")     # registers the folder
    import folder_paths
    d = tmp_path_factory.mktemp("eval_models") / "personalize_eval"
    d.mkdir()
    torch.save(tiny_dino().state_dict(), d / "tiny_dino.pth")
    if OPEN_CLIP_ERROR is None:
        register_tiny_clip(d.parent)
        save_tiny_clip(d / "tiny_clip.safetensors")
    folder_paths.add_model_folder_path("personalize_eval", str(d))
    return d, scores


def node_class(eval_dir, name):
    import nodes
    if name in nodes.NODE_CLASS_MAPPINGS:
        return nodes.NODE_CLASS_MAPPINGS[name]
    return next(c for c in eval_dir[1].NODES if c.GET_SCHEMA().node_id == name)


def photos(*names, size=96):
    return torch.cat([load_image(INPUTS / n, size) for n in names])


def test_nodes_are_registered_with_tooltips(eval_dir):
    import folder_paths
    import nodes
    assert str(eval_dir[0]) in folder_paths.get_folder_paths("personalize_eval")
    missing = [n for n in NAMES if n not in nodes.NODE_CLASS_MAPPINGS]
    assert not missing, f"not registered in nodes/__init__.py: {missing}"
    for name in NAMES:
        schema = nodes.NODE_CLASS_MAPPINGS[name].GET_SCHEMA()
        assert schema.category == "personalize/metrics" and schema.description
        assert all(i.tooltip for i in schema.inputs), [i.id for i in schema.inputs if not i.tooltip]


def test_dino_score_on_the_shipped_photos(eval_dir):
    loader = node_class(eval_dir, "PersonalizeEvalModelLoader")
    options = loader.INPUT_TYPES()["required"]["model_name"][1]["options"]
    assert "tiny_dino.pth" in options
    model = loader.execute("dino", "tiny_dino.pth", "").result[0]
    gen = photos("personalize_cat_04.jpg", "personalize_dog6_02.jpg")
    ref = photos("personalize_mip_1_cat.jpg")
    score, report = node_class(eval_dir, "PersonalizeDINOScore").execute(model, gen, ref).result
    assert -1.0 <= score <= 1.0 and "2x1" in report
    same, _ = node_class(eval_dir, "PersonalizeDINOScore").execute(model, ref, ref).result
    assert same == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="eval_model: expected a DINO model"):
        node_class(eval_dir, "PersonalizeDINOScore").execute(object(), gen, ref)


@needs_open_clip
def test_clip_score_on_the_shipped_photos(eval_dir):
    loader = node_class(eval_dir, "PersonalizeEvalModelLoader")
    model = loader.execute("clip", "tiny_clip.safetensors", TINY_CLIP_ARCH).result[0]
    node = node_class(eval_dir, "PersonalizeCLIPScore")
    gen = photos("personalize_cat_04.jpg", "personalize_dog6_02.jpg")
    ref = photos("personalize_mip_1_cat.jpg", "personalize_astronaut.jpg")
    ct, ci, report = node.execute(model, gen, "a cat\na dog", ref).result
    assert 0.0 <= ct <= 2.5 and -1.0 <= ci <= 1.0 and "2x2" in report and "a dog" in report
    ct1, ci1, report1 = node.execute(model, gen, "a photo of a pet").result
    assert math.isnan(ci1) and "no reference_images" in report1
    with pytest.raises(ValueError, match="3 prompt lines for 2 images"):
        node.execute(model, gen, "a\nb\nc")
    with pytest.raises(Exception, match="tiny_dino.pth is not an open_clip CLIP state dict"):
        loader.execute("clip", "tiny_dino.pth", TINY_CLIP_ARCH)


def test_missing_file_message_names_the_folder_and_files(eval_dir):
    loader = node_class(eval_dir, "PersonalizeEvalModelLoader")
    assert loader.validate_inputs("dino", "tiny_dino.pth", "") is True
    msg = loader.validate_inputs("dino", "dino_deitsmall16_pretrain.pth", "")
    assert isinstance(msg, str) and str(eval_dir[0]) in msg and "dino_deitsmall16_pretrain.pth" in msg
    assert "open_clip_pytorch_model.bin" in msg
    with pytest.raises(FileNotFoundError, match="model_name: 'missing.pth' is not in the personalize_eval folder"):
        loader.execute("dino", "missing.pth", "")


# --- ComfyUI's model management, progress and Cancel --------------------------------------------------

def test_dino_score_loads_through_model_management_with_progress_and_cancel(eval_dir):
    model = node_class(eval_dir, "PersonalizeEvalModelLoader").execute("dino", "tiny_dino.pth", "").result[0]
    node = node_class(eval_dir, "PersonalizeDINOScore")
    gen = photos("personalize_cat_04.jpg", "personalize_dog6_02.jpg", "personalize_mip_2_cat.jpg")
    ref = photos("personalize_mip_1_cat.jpg", "personalize_astronaut.jpg")
    total = check_model_management(model, lambda m: m.extras["patcher"],
                                   lambda: node.execute(model, gen, ref).result[0])
    assert total == 5                                                      # 3 images + 2 references
    check_cancel_mid_scoring(lambda: node.execute(model, gen, ref))


@needs_open_clip
def test_clip_score_loads_through_model_management_with_progress_and_cancel(eval_dir):
    model = node_class(eval_dir, "PersonalizeEvalModelLoader").execute("clip", "tiny_clip.safetensors",
                                                                       TINY_CLIP_ARCH).result[0]
    node = node_class(eval_dir, "PersonalizeCLIPScore")
    gen = photos("personalize_cat_04.jpg", "personalize_dog6_02.jpg")
    ref = photos("personalize_mip_1_cat.jpg")
    total = check_model_management(model, lambda m: m.extras["patcher"],
                                   lambda: node.execute(model, gen, "a pet", ref).result[:2])
    assert total == 3
    check_cancel_mid_scoring(lambda: node.execute(model, gen, "a pet", ref))


def test_a_scorer_moved_outside_model_management_is_loaded_again(eval_dir, monkeypatch):
    """Another node may move the same model with ``.to()`` behind ComfyUI's back (it then still counts as
    loaded): the scorer notices its weights are not on the load device and has ComfyUI unload and load
    it again. On this CPU-only machine the move is simulated by the device check."""
    import comfy.model_management as mm
    model = node_class(eval_dir, "PersonalizeEvalModelLoader").execute("dino", "tiny_dino.pth", "").result[0]
    node = node_class(eval_dir, "PersonalizeDINOScore")
    # the copy of the pack ComfyUI loaded (its node classes' package)
    model_files = importlib.import_module(node.__module__.rsplit(".", 1)[0] + ".model_files")
    gen, ref = photos("personalize_cat_04.jpg"), photos("personalize_mip_1_cat.jpg")
    want = node.execute(model, gen, ref).result[0]
    calls, seen = [], iter([False])
    real_unload = mm.unload_model_and_clones
    monkeypatch.setattr(model_files, "on_device", lambda net, dev: next(seen, True))
    monkeypatch.setattr(mm, "unload_model_and_clones", lambda p, *a, **k: (calls.append(p), real_unload(p, *a, **k)))
    assert node.execute(model, gen, ref).result[0] == want
    patcher = model.extras["patcher"]
    assert calls == [patcher] and patcher in [lm.model for lm in mm.current_loaded_models]
    assert model_files.on_device(model, patcher.load_device)        # the real check on the real weights
