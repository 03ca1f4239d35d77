"""The SAM nodes inside a real ComfyUI: registration, the sams model folder, running the nodes with a
tiny random SAM (segment_anything's own classes, no download), bad inputs, progress and Cancel, SAM
masks feeding both attention techniques, and the shipped FreeMix example workflow run headless.
Skipped without ComfyUI (set COMFYUI_PATH) or without segment_anything."""
from __future__ import annotations

import asyncio
import importlib.util
import json
import shutil
import sys

import numpy as np
import pytest
import torch

from comfy_sampling import encode, load_image, ref_node, sample
from pack_paths import PACK_ROOT, comfyui_root
from tiny_models import TINY_SD15
from workflow_helpers import workflow_file

ROOT = comfyui_root()
try:
    import segment_anything  # noqa: F401
    SAM_ERROR = None
except Exception as exc:
    SAM_ERROR = f"{type(exc).__name__}: {exc}"

pytestmark = [
    pytest.mark.skipif(SAM_ERROR is not None, reason=f"segment_anything cannot be imported ({SAM_ERROR}); "
                                                     f"pip install segment-anything torchvision"),
]

WORKFLOW = workflow_file("personalize_freemix_structure_appearance")
INPUTS = PACK_ROOT / "workflows" / "inputs"
SAM_FILE = "sam_vit_b_01ec64.pth"      # the name the example workflow uses; holds the tiny SAM here


def _load_tool(name, filename):
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, PACK_ROOT / "tools" / filename)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="module")
def sams_dir(tmp_path_factory):
    """ComfyUI with the pack loaded, and a temporary ``sams`` folder holding the tiny SAM."""
    import comfy_host
    comfy_host.init_nodes_with_pack()
    import folder_paths
    from tiny_sam import save_tiny_sam
    d = tmp_path_factory.mktemp("sam_models") / "sams"
    save_tiny_sam(d / "tiny_sam.pth")
    folder_paths.add_model_folder_path("sams", str(d))
    return d


def node_class(name):
    import nodes
    return nodes.NODE_CLASS_MAPPINGS[name]


def load_sam(name="tiny_sam.pth", device="auto"):
    return node_class("PersonalizeSAMModelLoader").execute(name, device).result[0]


def run_mask(sam, image, **kw):
    args = dict(mode="box", points="", negative_points="", box="", units="pixels", multimask="auto", threshold=0.0,
                grid=4, min_confidence=0.88)
    args.update(kw)
    return node_class("PersonalizeSAMMask").execute(sam, image, **args).result[0]


def photo(name, size):
    return load_image(INPUTS / name, size)


# --- registration and the model folder ----------------------------------------------------------

def test_nodes_register_with_tooltips_and_the_sams_folder(sams_dir):
    import folder_paths
    assert "sams" in folder_paths.folder_names_and_paths
    assert str(sams_dir) in folder_paths.get_folder_paths("sams")
    for name, display in (("PersonalizeSAMModelLoader", "SAM Model Loader (Personalize)"),
                          ("PersonalizeSAMMask", "SAM Mask (Personalize)")):
        cls = node_class(name)
        schema = cls.GET_SCHEMA()
        assert schema.display_name == display and schema.category == "personalize/masks" and schema.description
        assert all(i.tooltip for i in schema.inputs), [i.id for i in schema.inputs if not i.tooltip]
    options = node_class("PersonalizeSAMModelLoader").INPUT_TYPES()["required"]["model_name"][1]["options"]
    assert "tiny_sam.pth" in options
    assert list(node_class("PersonalizeSAMMask").RETURN_TYPES) == ["MASK"]


def test_missing_model_file_says_what_to_download_and_where(sams_dir):
    loader = node_class("PersonalizeSAMModelLoader")
    assert loader.validate_inputs("tiny_sam.pth") is True
    msg = loader.validate_inputs(SAM_FILE)
    assert isinstance(msg, str) and str(sams_dir) in msg
    assert "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth" in msg
    with pytest.raises(FileNotFoundError, match="model_name: 'missing.pth' is not in the sams folder"):
        loader.execute("missing.pth", "auto")
    # through ComfyUI's own prompt validation: the node's message, not "value not in list"
    import execution
    prompt = {"1": {"class_type": "PersonalizeSAMModelLoader", "inputs": {"model_name": "missing.pth", "device": "auto"}},
              "2": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
              "3": {"class_type": "PersonalizeSAMMask", "inputs": {"sam": ["1", 0], "image": ["2", 0], "mode": "box",
                                                                   "points": "", "negative_points": "", "box": "1,1,4,4",
                                                                   "units": "pixels", "multimask": "auto",
                                                                   "threshold": 0.0, "grid": 8, "min_confidence": 0.88}},
              "4": {"class_type": "MaskPreview", "inputs": {"mask": ["3", 0]}}}
    ok, _, _, node_errors = asyncio.run(execution.validate_prompt("p1", prompt, None))
    details = json.dumps(node_errors)
    assert not ok and "custom_validation_failed" in details and "value_not_in_list" not in details
    assert "missing.pth" in details and str(sams_dir) in details and "sam_vit_b_01ec64.pth" in details


def test_wrong_kind_and_truncated_files_in_the_folder(sams_dir):
    (sams_dir / "page.pth").write_bytes(b"<!DOCTYPE html><html>404</html>")
    data = (sams_dir / "tiny_sam.pth").read_bytes()
    (sams_dir / "cut.pth").write_bytes(data[: len(data) // 3])
    try:
        with pytest.raises(ValueError, match="page.pth is not a PyTorch .* web page"):
            load_sam("page.pth")
        with pytest.raises(ValueError, match=r"cut.pth is damaged or incomplete \(a truncated download\?\)"):
            load_sam("cut.pth")
    finally:
        (sams_dir / "page.pth").unlink()
        (sams_dir / "cut.pth").unlink()


# --- running the nodes --------------------------------------------------------------------------

def test_mask_node_on_a_batch_with_progress(sams_dir):
    import comfy.utils
    sam = load_sam()
    assert sam.config.img_size == 64 and sam.extras["device"] == "auto"
    images = torch.cat([photo("personalize_dog6_02.jpg", 96), photo("personalize_cat_04.jpg", 96)])
    calls = []
    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, *a, **k: calls.append((value, total)))
    try:
        for mode, kw in (("box", dict(box="10,0,86,96")), ("points", dict(points="48,50", negative_points="2,2")),
                         ("points + box", dict(points="0.5,0.5", box="0.1,0,0.9,1", units="fractions"))):
            calls.clear()
            mask = run_mask(sam, images, mode=mode, **kw)
            assert mask.shape == (2, 96, 96) and mask.dtype == torch.float32
            assert set(mask.unique().tolist()) <= {0.0, 1.0}
            assert calls[-1] == (2, 2) and len(calls) == 2
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
    # the batch is the same as the images one at a time
    one = run_mask(sam, images[1:], box="10,0,86,96")
    assert torch.equal(one[0], run_mask(sam, images, box="10,0,86,96")[1])
    # a non-square image keeps its size
    wide = photo("personalize_dog6_02.jpg", 64)[:, 8:56]
    assert run_mask(sam, wide, box="0,0,64,48").shape == (1, 48, 64)
    # the cpu device choice
    assert run_mask(load_sam(device="cpu"), images[:1], box="10,0,86,96").shape == (1, 96, 96)


def test_bad_inputs_name_the_input(sams_dir):
    sam = load_sam()
    image = photo("personalize_dog6_02.jpg", 64)
    with pytest.raises(ValueError, match=r"box: \(0, 0, 100, 64\) lies outside the 64x64 image"):
        run_mask(sam, image, box="0,0,100,64")
    with pytest.raises(ValueError, match="box: mode 'box' needs a box"):
        run_mask(sam, image, box="")
    with pytest.raises(ValueError, match="points: could not read"):
        run_mask(sam, image, mode="points", points="left eye")
    with pytest.raises(ValueError, match="negative_points: point .* lies outside"):
        run_mask(sam, image, mode="points", points="3,3", negative_points="3,300")
    with pytest.raises(ValueError, match="image: expected a ComfyUI IMAGE"):
        run_mask(sam, image[0], box="1,1,5,5")
    with pytest.raises(ValueError, match="sam: expected a model from SAM Model Loader"):
        run_mask("not a model", image, box="1,1,5,5")
    with pytest.raises(ValueError, match="mode 'largest object': SAM found no confident object"):
        run_mask(sam, image, mode="largest object")          # a random SAM is never confident


def test_cancel_stops_between_images(sams_dir):
    import comfy.model_management as mm
    sam = load_sam()
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            run_mask(sam, photo("personalize_dog6_02.jpg", 64), box="1,1,60,60")
    finally:
        mm.interrupt_current_processing(False)


# --- prompts from other nodes: core's BOUNDING_BOX and SAM3-style JSON points ---------------------------

def test_boxes_and_points_from_core_nodes_steer_the_mask(sams_dir):
    from comfy_extras.nodes_images import BoundingBox as PrimitiveBoundingBox
    sam = load_sam()
    images = torch.cat([photo("personalize_dog6_02.jpg", 96), photo("personalize_cat_04.jpg", 96)])
    box = PrimitiveBoundingBox.execute(x=10, y=4, width=60, height=80).result[0]          # core's node
    by_socket = run_mask(sam, images, bboxes=box)
    assert torch.equal(by_socket, run_mask(sam, images, box="10,4,70,84"))               # the same box typed
    other = run_mask(sam, images, bboxes={"x": 40, "y": 40, "width": 50, "height": 50})
    assert not torch.equal(other, by_socket)                                             # the box steers it
    # per-image boxes: each image its own
    per = run_mask(sam, images, bboxes=[[box], [{"x": 40, "y": 40, "width": 50, "height": 50}]])
    assert torch.equal(per[0], by_socket[0]) and torch.equal(per[1], other[1])
    # points as core SAM3 Detect takes them replace the points text; units does not apply to them
    pts = json.dumps([{"x": 48, "y": 50}])
    neg = json.dumps([{"x": 2, "y": 2}])
    got = run_mask(sam, images, mode="points", points="0.1,0.1", units="fractions", positive_coords=pts,
                   negative_coords=neg)
    assert torch.equal(got, run_mask(sam, images, mode="points", points="48,50", negative_points="2,2"))
    with pytest.raises(ValueError, match="bboxes: boxes are connected but mode 'points' uses no box"):
        run_mask(sam, images, mode="points", points="3,3", bboxes=box)
    with pytest.raises(ValueError, match=r"bboxes: 3 lists of boxes \(one per image\) for 2 images"):
        run_mask(sam, images, bboxes=[[box], [box], [box]])
    with pytest.raises(ValueError, match="positive_coords: '48,50' is not JSON"):
        run_mask(sam, images, mode="points", positive_coords="48,50")


def test_graph_links_core_boxes_into_sam_mask(sams_dir):
    """ComfyUI's own validation accepts BOUNDING_BOX links from core's Bounding Box node and from
    Detect-and-Compare into SAM Mask's bboxes, and a STRING into positive_coords."""
    import execution
    prompt = {
        "1": {"class_type": "PersonalizeSAMModelLoader", "inputs": {"model_name": "tiny_sam.pth", "device": "cpu"}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
        "3": {"class_type": "PrimitiveBoundingBox", "inputs": {"x": 4, "y": 4, "width": 40, "height": 40}},
        "4": {"class_type": "PrimitiveString", "inputs": {"value": '[{"x": 20, "y": 20}]'}},
        "5": {"class_type": "PersonalizeSAMMask", "inputs": {
            "sam": ["1", 0], "image": ["2", 0], "mode": "points + box", "points": "", "negative_points": "",
            "box": "", "units": "pixels", "multimask": "auto", "threshold": 0.0, "grid": 4, "min_confidence": 0.88,
            "bboxes": ["3", 0], "positive_coords": ["4", 0]}},
        "6": {"class_type": "MaskToImage", "inputs": {"mask": ["5", 0]}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
    }
    ok, error, outputs, node_errors = asyncio.run(execution.validate_prompt("t", prompt, None))
    assert ok and not node_errors, (error, node_errors)
    # the Detect-and-Compare output that feeds bboxes is a BOUNDING_BOX socket
    dc = node_class("PersonalizeDetectCompare")
    assert dc.RETURN_TYPES[4] == "BOUNDING_BOX" == node_class("PersonalizeSAMMask").INPUT_TYPES()["optional"]["bboxes"][0]
    prompt["3"] = {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}}
    ok, _, _, node_errors = asyncio.run(execution.validate_prompt("t", prompt, None))
    assert not ok or node_errors                            # an IMAGE is not accepted where a box goes


def test_sam_masks_drive_both_techniques(sams_dir, sd15):
    from personalize_pack.nodes.attention import DisentangleMixingAttentionNode, MultiReferenceAttentionNode
    model, clip, vae = sd15
    sam = load_sam()
    dog, cat = photo("personalize_dog6_02.jpg", 64), photo("personalize_cat_04.jpg", 64)
    dog_mask = run_mask(sam, dog, box="10,0,54,64")
    cat_mask = run_mask(sam, cat, mode="points + box", points="28,38", box="11,3,52,64")
    assert dog_mask.sum() > 0 and cat_mask.sum() > 0
    enc = ref_node()
    dog_ref = enc.execute(dog, vae, dog_mask, encode(clip, "a dog"), None, 3.0, 0.5, False, 64).result[0]
    cat_ref = enc.execute(cat, vae, cat_mask, encode(clip, "a cat"), None, 3.0, 0.5, False, 64).result[0]
    assert torch.equal(dog_ref[0].mask, (dog_mask[0] >= 0.5).float())
    prompt = "a photo of a dog in the grass"
    pos, neg = encode(clip, prompt), encode(clip, "blurry")
    plain = sample(model, pos, neg, steps=3)
    mrsa = MultiReferenceAttentionNode.execute(model, cat_ref + dog_ref, "SD1.5 FreeCustom (output 6-11)", "", 0.0,
                                               1.0, 1.0, 0).result[0]
    dmsa = DisentangleMixingAttentionNode.execute(model, dog_ref, cat_ref, clip, prompt, "dog", "SD1.5 FreeMix",
                                                  appearance_start=0.3).result[0]
    for patched in (mrsa, dmsa):
        out = sample(patched, pos, neg, steps=3)
        assert torch.isfinite(out).all() and (out - plain).abs().max() > 1e-3


# --- the shipped FreeMix workflow -----------------------------------------------------------------

def test_freemix_workflow_is_reproduced_by_the_generator(sams_dir, tmp_path):
    rw = _load_tool("personalize_run_workflow", "run_workflow.py")   # puts tools/ on sys.path
    from workflows import recipes, thumbnails
    import nodes
    types = sorted({n["type"] for n in json.loads(WORKFLOW.read_text())["nodes"]} - {"Note"})
    schemas = rw.live_schemas(types)
    assert recipes.freemix_workflow(schemas, nodes.NODE_CLASS_MAPPINGS) == json.loads(WORKFLOW.read_text())
    thumbnails.thumbnail_freemix(tmp_path / "card.jpg")
    assert (tmp_path / "card.jpg").read_bytes() == WORKFLOW.with_suffix(".jpg").read_bytes()


def test_freemix_workflow_converts_with_the_live_schemas(sams_dir):
    rw = _load_tool("personalize_run_workflow", "run_workflow.py")
    wf = json.loads(WORKFLOW.read_text())
    prompt = rw.ui_to_api(wf, rw.live_schemas({n["type"] for n in wf["nodes"]}))
    by_title = {n["_meta"]["title"]: n for n in prompt.values()}
    assert by_title["SAM Model Loader (ViT-B)"]["inputs"] == {"model_name": SAM_FILE, "device": "auto"}
    dog, cat = by_title["SAM mask: dog (box)"]["inputs"], by_title["SAM mask: cat (points + box)"]["inputs"]
    assert (dog["mode"], dog["box"]) == ("box", "80,0,420,512")
    assert (cat["mode"], cat["points"], cat["box"]) == ("points + box", "225,300", "88,28,412,512")
    dmsa = next(n for n in prompt.values() if n["class_type"] == "PersonalizeDisentangleMixingAttention")["inputs"]
    assert (dmsa["prompt"], dmsa["blend_word"], dmsa["preset"]) == ("a photo of a dog in the grass", "dog",
                                                                    "SD1.5 FreeMix")
    ks = by_title["KSampler (DDIM, as FreeMix)"]["inputs"]
    dmsa_id = next(k for k, n in prompt.items() if n["class_type"] == "PersonalizeDisentangleMixingAttention")
    assert "Prompt" not in by_title and ks["positive"] == [dmsa_id, 1]    # the prompt is written once
    assert {k: ks[k] for k in ("seed", "steps", "cfg", "sampler_name", "scheduler")} == \
        {"seed": 500, "steps": 50, "cfg": 7.5, "sampler_name": "ddim", "scheduler": "ddim_uniform"}
    assert by_title["Negative prompt (FreeCustom)"]["inputs"]["text"].startswith("lowres, bad anatomy")
    ref_titles = {n["_meta"]["title"]: n for n in prompt.values() if n["class_type"] == "PersonalizeReferenceEncode"}
    s_id = next(k for k, n in prompt.items() if n["_meta"]["title"] == "Reference Encode: structure (dog)")
    assert dmsa["structure"] == [s_id, 0]
    assert ref_titles["Reference Encode: structure (dog)"]["inputs"]["mask"][0] == next(
        k for k, n in prompt.items() if n["_meta"]["title"] == "SAM mask: dog (box)")
    # the SAM nodes' prompts lie inside the shipped 512x512 images
    from personalize_pack.references import sam as S
    for inputs in (dog, cat):
        S.make_prompts(inputs["mode"], inputs["points"], inputs["negative_points"], inputs["box"], 512, 512)


def test_freemix_workflow_runs_headless(sams_dir, tiny_sd15_path, tmp_path):
    from PIL import Image
    from tiny_sam import save_tiny_sam
    rw = _load_tool("personalize_run_workflow", "run_workflow.py")
    models = tmp_path / "models"
    (models / "checkpoints").mkdir(parents=True)
    try:
        (models / "checkpoints" / TINY_SD15).symlink_to(tiny_sd15_path)
    except OSError:
        shutil.copyfile(tiny_sd15_path, models / "checkpoints" / TINY_SD15)
    save_tiny_sam(models / "sams" / SAM_FILE)
    lines = []
    out_dir, in_dir = tmp_path / "out", tmp_path / "in"
    outputs = rw.run_workflow(WORKFLOW, ROOT, output_dir=out_dir, models_dir=models, input_dir=in_dir,
                              log=lines.append,
                              overrides={"CheckpointLoaderSimple.ckpt_name": TINY_SD15,
                                         "EmptyLatentImage.width": 64, "EmptyLatentImage.height": 64,
                                         "KSampler.steps": 3, "PersonalizeReferenceEncode.resolution": 64})
    assert sorted(p.name for p in in_dir.iterdir()) == ["personalize_cat_04.jpg", "personalize_dog6_02.jpg"]
    assert sum("PersonalizeSAMMask" in line for line in lines) == 2
    images = [item for out in outputs.values() for item in out.get("images", []) if item.get("type") == "output"]
    assert len(images) == 1
    path = out_dir / images[0].get("subfolder", "") / images[0]["filename"]
    assert path.name.startswith("personalize_freemix")
    with Image.open(path) as im:
        assert im.size == (64, 64) and "workflow" in im.info
        pixels = np.asarray(im.convert("RGB"), dtype=np.float32)
    assert np.isfinite(pixels).all() and pixels.std() > 1.0
