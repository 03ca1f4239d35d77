"""The headless workflow runner (tools/run_workflow.py) and the shipped example workflow.

Unit tests convert the shipped UI-format workflow (and variants of it) with hand-written schemas,
without ComfyUI. The integration test runs the workflow in a real ComfyUI on a tiny random SD1.5
checkpoint at 64 px."""
from __future__ import annotations

import copy
import importlib.util
import json
import sys

import numpy as np
import pytest

from pack_paths import PACK_ROOT, comfyui_root
from tiny_models import TINY_SD15

WORKFLOW = PACK_ROOT / "workflows" / "personalize_freecustom_multi_reference.json"


def _load_runner():
    if "personalize_run_workflow" in sys.modules:
        return sys.modules["personalize_run_workflow"]
    spec = importlib.util.spec_from_file_location("personalize_run_workflow", PACK_ROOT / "tools" / "run_workflow.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


rw = _load_runner()

FLOAT = lambda default: ("FLOAT", {"default": default, "min": 0.0, "max": 100.0})  # noqa: E731
SCHEMAS = {
    "CheckpointLoaderSimple": {"required": {"ckpt_name": (["v1-5-pruned-emaonly.safetensors"], {})}},
    "CLIPTextEncode": {"required": {"text": ("STRING", {"multiline": True}), "clip": ("CLIP", {})}},
    "LoadImage": {"required": {"image": (["example.png"], {"image_upload": True})}},
    "ImageToMask": {"required": {"image": ("IMAGE", {}),
                                 "channel": ("COMBO", {"options": ["red", "green", "blue", "alpha"]})}},
    "PersonalizeReferenceEncode": {
        "required": {"image": ("IMAGE", {}), "vae": ("VAE", {}), "weight": FLOAT(3.0),
                     "mask_threshold": FLOAT(0.5), "soft_mask": ("BOOLEAN", {"default": False}),
                     "resolution": ("INT", {"default": 512})},
        "optional": {"mask": ("MASK", {}), "caption": ("CONDITIONING", {}),
                     "references": ("PERSONALIZE_REFERENCE", {})}},
    "PersonalizeMultiReferenceAttention": {
        "required": {"model": ("MODEL", {}), "references": ("PERSONALIZE_REFERENCE", {}),
                     "layers": ("COMBO", {"options": ["SD1.5 FreeCustom (output 6-11)", "custom"]}),
                     "custom_blocks": ("STRING", {"default": "output:6-11"}),
                     "start_percent": FLOAT(0.0), "end_percent": FLOAT(1.0), "style_fidelity": FLOAT(1.0),
                     "seed": ("INT", {"default": 0, "control_after_generate": False})}},
    "EmptyLatentImage": {"required": {"width": ("INT", {"default": 512}), "height": ("INT", {"default": 512}),
                                      "batch_size": ("INT", {"default": 1})}},
    "KSampler": {"required": {"model": ("MODEL", {}),
                              "seed": ("INT", {"default": 0, "control_after_generate": True}),
                              "steps": ("INT", {"default": 20}), "cfg": FLOAT(8.0),
                              "sampler_name": (["euler", "ddim"], {}),
                              "scheduler": (["normal", "ddim_uniform"], {}),
                              "positive": ("CONDITIONING", {}), "negative": ("CONDITIONING", {}),
                              "latent_image": ("LATENT", {}), "denoise": FLOAT(1.0)}},
    "VAEDecode": {"required": {"samples": ("LATENT", {}), "vae": ("VAE", {})}},
    "SaveImage": {"required": {"images": ("IMAGE", {}), "filename_prefix": ("STRING", {"default": "ComfyUI"})},
                  "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}},
}


@pytest.fixture
def workflow():
    return json.loads(WORKFLOW.read_text(encoding="utf-8"))


def node_by_title(wf, title):
    return next(n for n in wf["nodes"] if n.get("title") == title)


def node_by_type(wf, class_type):
    return next(n for n in wf["nodes"] if n["type"] == class_type)


def api_by_title(prompt, title):
    return next(n for n in prompt.values() if n["_meta"]["title"] == title)


def api_by_type(prompt, class_type):
    return next(n for n in prompt.values() if n["class_type"] == class_type)


def add_node(wf, type_, inputs=(), outputs=(), widgets=None, mode=0):
    wf["last_node_id"] += 1
    node = {"id": wf["last_node_id"], "type": type_, "pos": [0, 0], "size": [200, 60], "flags": {}, "order": 0,
            "mode": mode, "inputs": [dict(i) for i in inputs], "outputs": [dict(o, links=[]) for o in outputs],
            "properties": {}, "widgets_values": widgets if widgets is not None else []}
    wf["nodes"].append(node)
    return node


def relink(wf, link_id, origin, origin_slot):
    """Point an existing link at another origin slot."""
    link = next(lk for lk in wf["links"] if lk[0] == link_id)
    for n in wf["nodes"]:
        for out in n.get("outputs", []):
            if link_id in (out.get("links") or []):
                out["links"].remove(link_id)
    link[1], link[2] = origin["id"], origin_slot
    origin["outputs"][origin_slot]["links"].append(link_id)


def add_link(wf, origin, origin_slot, target, target_slot, type_):
    wf["last_link_id"] += 1
    link_id = wf["last_link_id"]
    wf["links"].append([link_id, origin["id"], origin_slot, target["id"], target_slot, type_])
    origin["outputs"][origin_slot]["links"].append(link_id)
    target["inputs"][target_slot]["link"] = link_id
    return link_id


# --- the shipped workflow --------------------------------------------------------------------

def assert_ui_format(workflow, path, model_folders=("models/checkpoints",)):
    """The keys, links and node fields the frontend needs, a Note naming the model folders, and the
    thumbnail beside the workflow."""
    for key in ("last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra", "version"):
        assert key in workflow
    ids = {n["id"] for n in workflow["nodes"]}
    assert workflow["last_node_id"] == max(ids) and workflow["last_link_id"] == max(lk[0] for lk in workflow["links"])
    for link_id, src, src_slot, dst, dst_slot, typ in workflow["links"]:
        source = next(n for n in workflow["nodes"] if n["id"] == src)
        target = next(n for n in workflow["nodes"] if n["id"] == dst)
        assert link_id in source["outputs"][src_slot]["links"]
        assert target["inputs"][dst_slot]["link"] == link_id
        assert source["outputs"][src_slot]["type"] == typ
        assert target["inputs"][dst_slot]["type"] in (typ, "*")          # "*": an input that takes any type
    for n in workflow["nodes"]:
        assert {"pos", "size", "mode", "order", "widgets_values"} <= set(n)
    assert any(n["type"] == "Note" and all(f in n["widgets_values"][0] for f in model_folders)
               for n in workflow["nodes"])
    assert path.with_suffix(".jpg").is_file()


def test_shipped_workflow_is_ui_format(workflow):
    assert_ui_format(workflow, WORKFLOW)


def test_shipped_workflow_converts(workflow):
    prompt = rw.ui_to_api(workflow, SCHEMAS)
    assert len(prompt) == len(workflow["nodes"]) - 1                      # the Note is dropped
    assert all(n["class_type"] != "Note" for n in prompt.values())

    ckpt_id = str(node_by_type(workflow, "CheckpointLoaderSimple")["id"])
    assert api_by_type(prompt, "CheckpointLoaderSimple")["inputs"] == {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}
    assert api_by_title(prompt, "Prompt")["inputs"] == {"text": "a cat and a dog sitting together on a sofa",
                                                         "clip": [ckpt_id, 1]}
    assert api_by_title(prompt, "Negative prompt (FreeCustom)")["inputs"]["text"].startswith("lowres, bad anatomy")

    # LoadImage: the upload button's saved value is skipped
    assert api_by_title(prompt, "Reference 1: cat")["inputs"] == {"image": "personalize_cat_04.jpg"}
    assert api_by_title(prompt, "Reference 2: dog mask")["inputs"] == {"image": "personalize_dog6_02_mask.jpg"}

    cat = node_by_title(workflow, "Reference Encode: cat")
    enc_cat = api_by_title(prompt, "Reference Encode: cat")["inputs"]
    enc_dog = api_by_title(prompt, "Reference Encode: dog")["inputs"]
    assert {k: enc_cat[k] for k in ("weight", "mask_threshold", "soft_mask", "resolution")} == \
        {"weight": 3.0, "mask_threshold": 0.5, "soft_mask": False, "resolution": 512}
    assert "references" not in enc_cat                                     # unconnected optional input
    assert enc_dog["references"] == [str(cat["id"]), 0]                    # chained
    assert enc_cat["vae"] == [ckpt_id, 2]
    mask_node = str(node_by_title(workflow, "cat mask (red channel)")["id"])
    assert enc_cat["mask"] == [mask_node, 0]
    assert api_by_title(prompt, "cat mask (red channel)")["inputs"]["channel"] == "red"

    mra = api_by_type(prompt, "PersonalizeMultiReferenceAttention")["inputs"]
    dog_id = str(node_by_title(workflow, "Reference Encode: dog")["id"])
    assert mra == {"layers": "SD1.5 FreeCustom (output 6-11)", "custom_blocks": "output:6-11", "start_percent": 0.0,
                   "end_percent": 1.0, "style_fidelity": 1.0, "seed": 0,   # no control value after this seed
                   "model": [ckpt_id, 0], "references": [dog_id, 0]}

    ks = api_by_type(prompt, "KSampler")["inputs"]
    mra_id = str(node_by_type(workflow, "PersonalizeMultiReferenceAttention")["id"])
    # the seed's control_after_generate value ("fixed") is consumed, not shifted into steps
    assert {k: ks[k] for k in ("seed", "steps", "cfg", "sampler_name", "scheduler", "denoise")} == \
        {"seed": 42, "steps": 50, "cfg": 7.5, "sampler_name": "ddim", "scheduler": "ddim_uniform", "denoise": 1.0}
    assert ks["model"] == [mra_id, 0]
    assert api_by_type(prompt, "EmptyLatentImage")["inputs"] == {"width": 512, "height": 512, "batch_size": 1}
    assert api_by_type(prompt, "SaveImage")["inputs"]["filename_prefix"] == "personalize_freecustom"


def test_widget_values_control_after_generate_rules():
    schema = {"required": {"seed": ("INT", {}), "noise_seed": ("INT", {"control_after_generate": False}),
                           "x": ("FLOAT", {"control_after_generate": True}), "y": ("INT", {}),
                           "pick": (["a", "b"], {"control_after_generate": True}), "z": ("STRING", {}),
                           "img": ("IMAGE", {}), "forced": ("INT", {"forceInput": True})}}
    # "seed" without the option gets a control widget (the frontend's legacy rule); a False option wins
    values = [7, "randomize", 9, 0.5, "fixed", 3, "b", "fixed", "", "text"]
    assert rw.widget_values(schema, values) == {"seed": 7, "noise_seed": 9, "x": 0.5, "y": 3, "pick": "b", "z": "text"}
    assert rw.widget_values(schema, {"seed": 1, "z": "t"}) == {"seed": 1, "z": "t"}   # dict-style values


def test_upload_value_optional_and_defaults():
    load = SCHEMAS["LoadImage"]
    assert rw.widget_values(load, ["a.png", "image"]) == {"image": "a.png"}
    assert rw.widget_values(load, ["a.png"]) == {"image": "a.png"}
    # short widgets_values fall back to the schema defaults
    assert rw.widget_values(SCHEMAS["EmptyLatentImage"], [256]) == {"width": 256, "height": 512, "batch_size": 1}


def test_converted_widget_fed_by_primitive_and_by_a_node(workflow):
    ks = node_by_type(workflow, "KSampler")
    prim = add_node(workflow, "PrimitiveNode", outputs=[{"name": "INT", "type": "INT",
                                                         "widget": {"name": "seed"}}], widgets=[1234, "fixed"])
    ks["inputs"].append({"name": "seed", "type": "INT", "widget": {"name": "seed"}, "link": None})
    add_link(workflow, prim, 0, ks, len(ks["inputs"]) - 1, "INT")
    # steps converted to an input and fed by a real node: the link wins over the widget value
    SCHEMAS_X = dict(SCHEMAS, PrimitiveInt={"required": {"value": ("INT", {"control_after_generate": "fixed"})}})
    src = add_node(workflow, "PrimitiveInt", outputs=[{"name": "INT", "type": "INT"}], widgets=[3, "fixed"])
    ks["inputs"].append({"name": "steps", "type": "INT", "widget": {"name": "steps"}, "link": None})
    add_link(workflow, src, 0, ks, len(ks["inputs"]) - 1, "INT")
    prompt = rw.ui_to_api(workflow, SCHEMAS_X)
    inputs = api_by_type(prompt, "KSampler")["inputs"]
    assert inputs["seed"] == 1234
    assert inputs["steps"] == [str(src["id"]), 0]
    assert inputs["cfg"] == 7.5                                            # the rest keep their places
    assert api_by_type(prompt, "PrimitiveInt")["inputs"] == {"value": 3}
    assert all(n["class_type"] != "PrimitiveNode" for n in prompt.values())


def test_reroute_is_followed(workflow):
    ckpt = node_by_type(workflow, "CheckpointLoaderSimple")
    decode = node_by_type(workflow, "VAEDecode")
    r1 = add_node(workflow, "Reroute", inputs=[{"name": "", "type": "*", "link": None}],
                  outputs=[{"name": "", "type": "VAE"}])
    r2 = add_node(workflow, "Reroute", inputs=[{"name": "", "type": "*", "link": None}],
                  outputs=[{"name": "", "type": "VAE"}])
    vae_link = decode["inputs"][1]["link"]
    relink(workflow, vae_link, r2, 0)                                     # VAEDecode.vae <- r2 <- r1 <- ckpt
    add_link(workflow, r1, 0, r2, 0, "VAE")
    add_link(workflow, ckpt, 2, r1, 0, "VAE")
    prompt = rw.ui_to_api(workflow, SCHEMAS)
    assert api_by_type(prompt, "VAEDecode")["inputs"]["vae"] == [str(ckpt["id"]), 2]
    assert all(n["class_type"] != "Reroute" for n in prompt.values())


def test_muted_and_bypassed_nodes(workflow):
    node_by_title(workflow, "Reference Encode: dog")["mode"] = 2           # muted: gone, its output too
    node_by_type(workflow, "SaveImage")["mode"] = 2
    prompt = rw.ui_to_api(workflow, SCHEMAS)
    assert all(n["_meta"]["title"] != "Reference Encode: dog" for n in prompt.values())
    assert all(n["class_type"] != "SaveImage" for n in prompt.values())
    assert "references" not in api_by_type(prompt, "PersonalizeMultiReferenceAttention")["inputs"]

    node_by_title(workflow, "Reference Encode: dog")["mode"] = 4           # bypassed: passes the cat through
    mra = node_by_type(workflow, "PersonalizeMultiReferenceAttention")
    mra["mode"] = 4                                                        # MODEL in -> MODEL out
    prompt = rw.ui_to_api(workflow, SCHEMAS)
    ckpt_id = str(node_by_type(workflow, "CheckpointLoaderSimple")["id"])
    assert api_by_type(prompt, "KSampler")["inputs"]["model"] == [ckpt_id, 0]
    assert all(n["class_type"] != "PersonalizeMultiReferenceAttention" for n in prompt.values())
    mra["mode"] = 0
    prompt = rw.ui_to_api(workflow, SCHEMAS)
    cat_id = str(node_by_title(workflow, "Reference Encode: cat")["id"])
    assert api_by_type(prompt, "PersonalizeMultiReferenceAttention")["inputs"]["references"] == [cat_id, 0]


def test_dict_links_and_unknown_nodes(workflow):
    as_dicts = copy.deepcopy(workflow)
    as_dicts["links"] = [dict(zip(("id", "origin_id", "origin_slot", "target_id", "target_slot", "type"), lk))
                         for lk in workflow["links"]]
    assert rw.ui_to_api(as_dicts, SCHEMAS) == rw.ui_to_api(workflow, SCHEMAS)

    add_node(workflow, "SomeMissingNode", mode=2)                          # muted unknown node: ignored
    rw.ui_to_api(workflow, SCHEMAS)
    add_node(workflow, "SomeMissingNode")
    with pytest.raises(rw.WorkflowError, match="SomeMissingNode"):
        rw.ui_to_api(workflow, SCHEMAS)
    with pytest.raises(rw.WorkflowError, match="UI-format"):
        rw.ui_to_api({"3": {"class_type": "KSampler", "inputs": {}}}, SCHEMAS)


def test_overrides(workflow):
    prompt = rw.ui_to_api(workflow, SCHEMAS)
    rw.apply_overrides(prompt, ["KSampler.steps=2", "EmptyLatentImage.width=64", "LoadImage.image=x.png",
                                "CheckpointLoaderSimple.ckpt_name=tiny.safetensors"], SCHEMAS)
    assert api_by_type(prompt, "KSampler")["inputs"]["steps"] == 2
    assert api_by_type(prompt, "EmptyLatentImage")["inputs"]["width"] == 64
    assert {n["inputs"]["image"] for n in prompt.values() if n["class_type"] == "LoadImage"} == {"x.png"}
    assert api_by_type(prompt, "CheckpointLoaderSimple")["inputs"]["ckpt_name"] == "tiny.safetensors"
    rw.apply_overrides(prompt, {"PersonalizeReferenceEncode.soft_mask": True}, SCHEMAS)
    assert all(n["inputs"]["soft_mask"] is True for n in prompt.values()
               if n["class_type"] == "PersonalizeReferenceEncode")
    for bad, msg in (("KSampler.stepz=2", "no input 'stepz'"), ("Nope.steps=2", "no active Nope"),
                     ("KSampler", "CLASS_TYPE.input=value")):
        with pytest.raises(rw.WorkflowError, match=msg):
            rw.apply_overrides(prompt, [bad], SCHEMAS)


def test_cli_without_comfyui_fails_clearly(monkeypatch, capsys):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    assert rw.main([str(WORKFLOW)]) == 1
    assert "COMFYUI_PATH" in capsys.readouterr().err


# --- integration: the shipped workflow in a real ComfyUI -------------------------------------

ROOT = comfyui_root()
needs_comfyui = pytest.mark.skipif(ROOT is None, reason="ComfyUI not found: set COMFYUI_PATH to a ComfyUI tree "
                                                        "(or place the pack in ComfyUI/custom_nodes)")


@pytest.fixture(scope="session")
def tiny_models_dir(tiny_sd15_path):
    """The shared tiny SD1.5 checkpoint's models folder (conftest builds it once per session)."""
    import comfy_host
    comfy_host.init_nodes_with_pack()
    return tiny_sd15_path.parents[1]


@needs_comfyui
def test_shipped_workflow_runs_headless(tiny_models_dir, tmp_path):
    from PIL import Image

    out_dir, in_dir = tmp_path / "out", tmp_path / "in"
    outputs = rw.run_workflow(WORKFLOW, ROOT, output_dir=out_dir, models_dir=tiny_models_dir, input_dir=in_dir,
                              overrides={"CheckpointLoaderSimple.ckpt_name": TINY_SD15,
                                         "EmptyLatentImage.width": 64, "EmptyLatentImage.height": 64,
                                         "KSampler.steps": 2})
    assert sorted(p.name for p in in_dir.iterdir()) == sorted(
        ["personalize_cat_04.jpg", "personalize_cat_04_mask.jpg", "personalize_dog6_02.jpg",
         "personalize_dog6_02_mask.jpg"])
    images = [item for out in outputs.values() for item in out.get("images", []) if item.get("type") == "output"]
    assert len(images) == 1
    path = out_dir / images[0].get("subfolder", "") / images[0]["filename"]
    assert path.is_file() and path.name.startswith("personalize_freecustom")
    with Image.open(path) as im:
        assert im.size == (64, 64)
        assert "workflow" in im.info                                       # reloadable in the editor
        pixels = np.asarray(im.convert("RGB"), dtype=np.float32)
    assert np.isfinite(pixels).all() and pixels.std() > 1.0


@needs_comfyui
def test_run_workflow_reports_validation_errors(tiny_models_dir, tmp_path):
    with pytest.raises(rw.WorkflowError, match="validation failed"):
        rw.run_workflow(WORKFLOW, ROOT, output_dir=tmp_path / "out", models_dir=tiny_models_dir,
                        input_dir=tmp_path / "in",
                        overrides={"CheckpointLoaderSimple.ckpt_name": "missing.safetensors"})


MIP_WORKFLOW = PACK_ROOT / "workflows" / "personalize_mip_adapter_multi_object.json"


@needs_comfyui
def test_mip_workflow_runs_headless(tiny_models_dir, sd15, tmp_path, monkeypatch):
    """The MIP-Adapter example on the tiny SD1.5 checkpoint with a random adapter of its shape and a
    tiny CLIP vision model. ComfyUI's CLIP vision loader only recognises the real towers (the smallest
    is a 300M-parameter ViT-L), so it is pointed at the tiny model for the tiny file; everything else
    runs as a user's graph does."""
    import comfy.clip_vision
    from PIL import Image
    from safetensors.torch import save_file
    from tiny_adapters import adapter_state, save_adapter
    from tiny_models import TINY_CLIP_VISION, build_clip_vision

    save_adapter(tiny_models_dir / "ipadapter" / "tiny_mip_plus.safetensors", adapter_state(sd15[0], "mip_plus"))
    tiny = build_clip_vision()
    cv_path = tiny_models_dir / "clip_vision" / "tiny_clip_vision.safetensors"
    cv_path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tiny.get_sd().items()}, str(cv_path))
    real_load = comfy.clip_vision.load

    def load(path):
        if str(path).endswith("tiny_clip_vision.safetensors"):
            cv = comfy.clip_vision.ClipVisionModel(dict(TINY_CLIP_VISION))
            cv.load_sd(comfy.utils.load_torch_file(str(path)))
            return cv
        return real_load(path)
    import comfy.utils
    monkeypatch.setattr(comfy.clip_vision, "load", load)

    out_dir, in_dir = tmp_path / "out", tmp_path / "in"
    outputs = rw.run_workflow(MIP_WORKFLOW, ROOT, output_dir=out_dir, models_dir=tiny_models_dir, input_dir=in_dir,
                              overrides={"CheckpointLoaderSimple.ckpt_name": TINY_SD15,
                                         "PersonalizeMIPAdapterLoader.adapter_name": "tiny_mip_plus.safetensors",
                                         "CLIPVisionLoader.clip_name": "tiny_clip_vision.safetensors",
                                         "EmptyLatentImage.width": 64, "EmptyLatentImage.height": 64,
                                         "KSampler.steps": 2})
    assert sorted(p.name for p in in_dir.iterdir()) == sorted(
        f"personalize_mip_{i}_{n}.jpg" for i, ns in ((1, ("cat", "jacket")), (2, ("cat", "dice")), (3, ("barn", "dog")))
        for n in ns)
    images = [item for out in outputs.values() for item in out.get("images", []) if item.get("type") == "output"]
    assert sorted(i["filename"].split("_0")[0] for i in images) == [f"personalize_mip_{k}" for k in (1, 2, 3)]
    arrays = []
    for item in images:
        with Image.open(out_dir / item.get("subfolder", "") / item["filename"]) as im:
            assert im.size == (64, 64)
            arrays.append(np.asarray(im.convert("RGB"), dtype=np.float32))
    assert all(np.isfinite(a).all() and a.std() > 1.0 for a in arrays)
    assert np.abs(arrays[0] - arrays[1]).max() > 1.0          # different prompts and references, different images


FREECURE_WORKFLOW = PACK_ROOT / "workflows" / "personalize_freecure_photomaker.json"


@needs_comfyui
def test_freecure_workflow_runs_headless(tiny_models_dir, tmp_path, monkeypatch):
    """FreeCure's two passes with ComfyUI's PhotoMaker nodes on the tiny SD1.5 checkpoint: a tiny
    PhotoMaker ID encoder (ComfyUI's own class at a tiny width, tests/tiny_models.py) replaces the
    ViT-L one, the SD1.x FreeCure blocks replace the SDXL ones, and since a random model draws no
    face, Face Attribute Mask is told to give an empty mask instead of stopping."""
    pytest.importorskip("mediapipe", reason="Face Attribute Mask needs mediapipe (tools/run_tests.sh installs it)")
    from PIL import Image
    import nodes
    from tiny_models import build_photomaker, tiny_photomaker_class

    build_photomaker(tiny_models_dir / "photomaker" / "tiny_photomaker.safetensors")
    pm = sys.modules[nodes.NODE_CLASS_MAPPINGS["PhotoMakerLoader"].__module__]   # as ComfyUI loaded it
    monkeypatch.setattr(pm, "PhotoMakerIDEncoder", tiny_photomaker_class(pm))
    out_dir, in_dir = tmp_path / "out", tmp_path / "in"
    outputs = rw.run_workflow(FREECURE_WORKFLOW, ROOT, output_dir=out_dir, models_dir=tiny_models_dir, input_dir=in_dir,
                              overrides={"CheckpointLoaderSimple.ckpt_name": TINY_SD15,
                                         "PhotoMakerLoader.photomaker_model_name": "tiny_photomaker.safetensors",
                                         "PersonalizeFoundationAwareAttention.layers": "SD1.5 FreeCure (output 6-11)",
                                         "PersonalizeFaceAttributeMask.if_no_face": "empty mask",
                                         "EmptyLatentImage.width": 64, "EmptyLatentImage.height": 64,
                                         "KSampler.steps": 2})
    assert [p.name for p in in_dir.iterdir()] == ["personalize_astronaut.jpg"]
    saved = sorted(item["filename"] for out in outputs.values() for item in out.get("images", [])
                   if item.get("type") == "output")
    assert [f.rsplit("_", 2)[0] for f in saved] == ["personalize_freecure", "personalize_freecure_foundation"]
    for name in saved:
        with Image.open(out_dir / name) as im:
            assert im.size == (64, 64)
            assert np.asarray(im.convert("RGB"), dtype=np.float32).std() > 1.0


# --- the MuDI example: compose, mean-shifted noise, SamplerCustomAdvanced, Detect-and-Compare --------

MUDI_WORKFLOW = PACK_ROOT / "workflows" / "personalize_mudi_compose_and_score.json"
MUDI_SIZE = 128      # the smallest square canvas on which two subjects fit with the composer's 32 px margin
MUDI_OVERRIDES = {"CheckpointLoaderSimple.ckpt_name": TINY_SD15,
                  "PersonalizeSubjectComposer.width": MUDI_SIZE, "PersonalizeSubjectComposer.height": MUDI_SIZE,
                  "EmptyLatentImage.width": MUDI_SIZE, "EmptyLatentImage.height": MUDI_SIZE,
                  "BasicScheduler.steps": 2}
MUDI_INPUTS = ["personalize_cat_04.jpg", "personalize_cat_04_mask.jpg", "personalize_dog6_02.jpg",
               "personalize_dog6_02_mask.jpg"]
DC_NODES = ("PersonalizeDetectCompareLoader", "PersonalizeDetectCompareSubject", "PersonalizeDetectCompare")


@pytest.fixture
def mudi_workflow():
    return json.loads(MUDI_WORKFLOW.read_text(encoding="utf-8"))


def test_mudi_workflow_is_ui_format(mudi_workflow):
    wf = mudi_workflow
    assert_ui_format(wf, MUDI_WORKFLOW)
    assert [g["title"][:2] for g in wf["groups"]] == ["1.", "2.", "3."]
    for g in wf["groups"]:
        assert len(g["bounding"]) == 4 and g["bounding"][2] > 0 and g["bounding"][3] > 0
    lora = node_by_type(wf, "LoraLoader")
    assert lora["mode"] == 4                                              # bypassed by default
    assert all(n["mode"] == 0 for n in wf["nodes"] if n is not lora)
    notes = [n["widgets_values"][0] for n in wf["nodes"] if n["type"] == "Note"]
    assert any("Seg-Mix" in t and "DreamBooth" in t and "layout" in t for t in notes)
    assert any("models/personalize_eval" in t and "caption" in t and "report" in t for t in notes)
    assert node_by_type(wf, "CheckpointLoaderSimple")["widgets_values"] == ["sd_xl_base_1.0.safetensors"]
    assert node_by_title(wf, "Prompt")["widgets_values"] == ["a cat and a dog sitting together on a sofa"]
    comp = node_by_type(wf, "PersonalizeSubjectComposer")["widgets_values"]
    assert comp[:2] == [1024, 1024]
    assert node_by_type(wf, "EmptyLatentImage")["widgets_values"] == [1024, 1024, 1]
    assert node_by_type(wf, "BasicScheduler")["widgets_values"][1] == 30
    assert node_by_type(wf, "PersonalizeDetectCompare")["widgets_values"] == [0.4]
    assert node_by_type(wf, "PersonalizeDetectCompareLoader")["widgets_values"] == ["owlv2-base-patch16-ensemble",
                                                                                     "dreamsim"]
    shipped = {p.name for p in (PACK_ROOT / "workflows" / "inputs").iterdir()}
    loaded = [n["widgets_values"][0] for n in wf["nodes"] if n["type"] == "LoadImage"]
    assert sorted(loaded) == sorted(MUDI_INPUTS) and set(loaded) <= shipped


@pytest.fixture(scope="module")
def dc_eval_dir(tmp_path_factory):
    """Tiny random OWLv2 and DreamSim folders under the names the workflow's loader asks for, in a
    personalize_eval folder registered with ComfyUI."""
    pytest.importorskip("transformers", reason="the Detect-and-Compare detector (OWLv2) needs transformers")
    import comfy_host
    comfy_host.init_nodes_with_pack()
    import folder_paths
    from tiny_dreamsim import build_tiny_dreamsim
    from tiny_owl import build_tiny_owlv2

    d = tmp_path_factory.mktemp("mudi_eval") / "personalize_eval"
    build_tiny_owlv2(d / "owlv2-base-patch16-ensemble")
    build_tiny_dreamsim(d / "dreamsim")
    folder_paths.add_model_folder_path("personalize_eval", str(d))
    return d


@pytest.fixture
def temp_dir(tmp_path, monkeypatch):
    """PreviewImage writes into ComfyUI's temp folder: a fresh one per test."""
    import folder_paths
    path = tmp_path / "temp"
    path.mkdir()
    monkeypatch.setattr(folder_paths, "temp_directory", str(path))
    return path


def _rgb(path):
    from PIL import Image
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float32)


def _images(outputs, node_id, kind):
    items = (outputs.get(str(node_id)) or {}).get("images", [])
    return [item for item in items if item.get("type") == kind]


def _run_mudi(wf, tiny_models_dir, tmp_path, tag, overrides=None):
    path = tmp_path / f"{tag}.json"
    path.write_text(json.dumps(wf), encoding="utf-8")
    out_dir, in_dir = tmp_path / f"out_{tag}", tmp_path / "in"
    outputs = rw.run_workflow(path, ROOT, output_dir=out_dir, models_dir=tiny_models_dir, input_dir=in_dir,
                              overrides=dict(MUDI_OVERRIDES, **(overrides or {})), log=lambda msg: None)
    saved = [item for out in outputs.values() for item in out.get("images", []) if item.get("type") == "output"]
    assert len(saved) == 1 and saved[0]["filename"].startswith("personalize_mudi")
    return outputs, out_dir / saved[0].get("subfolder", "") / saved[0]["filename"]


@needs_comfyui
def test_mudi_workflow_runs_headless(tiny_models_dir, dc_eval_dir, temp_dir, tmp_path, mudi_workflow, monkeypatch):
    """The whole MuDI example on the tiny SD1.5 checkpoint (the workflow's SDXL is only its default; the
    nodes are model-agnostic) at 128 px, 2 steps, with tiny random OWLv2 and DreamSim models: the image is
    saved, the collage preview holds both subjects where the composer's masks say, the score's annotated
    preview carries its caption and the report names both subjects. The LoRA loader stays bypassed."""
    import nodes
    wf = mudi_workflow
    ids = {n.get("title") or n["type"]: n["id"] for n in wf["nodes"]}

    # the bypassed LoraLoader is dropped and the checkpoint's MODEL and CLIP pass through it
    prompt = rw.ui_to_api(wf, rw.live_schemas({n["type"] for n in wf["nodes"]}))
    ckpt = str(node_by_type(wf, "CheckpointLoaderSimple")["id"])
    assert all(n["class_type"] != "LoraLoader" for n in prompt.values())
    for cls in ("CFGGuider", "BasicScheduler", "PersonalizeMeanShiftedNoise"):
        assert api_by_type(prompt, cls)["inputs"]["model"] == [ckpt, 0]
    assert api_by_title(prompt, "Prompt")["inputs"]["clip"] == [ckpt, 1]
    assert api_by_type(prompt, "PersonalizeMeanShiftedNoise")["inputs"]["gamma"] == 1.0      # the node's default

    outputs, saved = _run_mudi(wf, tiny_models_dir, tmp_path, "mudi")
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == sorted(MUDI_INPUTS)
    image = _rgb(saved)
    assert image.shape == (MUDI_SIZE, MUDI_SIZE, 3) and np.isfinite(image).all() and image.std() > 1.0

    # the collage preview is the composer's image at the workflow's layout seed, with both subjects in it
    (shown,) = _images(outputs, ids["Composed subjects (preview)"], "temp")
    collage = _rgb(temp_dir / shown.get("subfolder", "") / shown["filename"])
    comp_values = node_by_type(wf, "PersonalizeSubjectComposer")["widgets_values"]
    import folder_paths
    monkeypatch.setattr(folder_paths, "input_directory", str(tmp_path / "in"))
    load = nodes.NODE_CLASS_MAPPINGS["LoadImage"]().load_image           # decoded as the workflow decodes them
    subject, composer = (nodes.NODE_CLASS_MAPPINGS[k] for k in ("PersonalizeSubject", "PersonalizeSubjectComposer"))
    chain = None
    for name, photo, mask in (("cat", *MUDI_INPUTS[:2]), ("dog", *MUDI_INPUTS[2:])):
        chain = subject.execute(load(photo)[0], load(mask)[0][..., 0], name, chain).result[0]   # red channel
    expected, masks, layout = composer.execute(chain, MUDI_SIZE, MUDI_SIZE, *comp_values[2:]).result
    assert json.loads(layout)["seed"] == comp_values[7]
    assert collage.shape == (MUDI_SIZE, MUDI_SIZE, 3)
    assert np.abs(collage - np.clip(expected[0].numpy() * 255.0, 0, 255)).max() <= 1.0
    masks = masks.numpy() > 0.5
    assert masks.shape == (2, MUDI_SIZE, MUDI_SIZE)
    for m in masks:
        assert m.sum() > 50                                               # each subject is visible
        white = (collage[m] >= 250).all(axis=-1)
        assert white.mean() < 0.5                                         # and is not the background colour
    assert (collage[~masks.any(axis=0)] == 255).all()                    # the rest is the white canvas

    # the score: the annotated image is the saved one with boxes and the caption drawn on it
    (ann,) = _images(outputs, ids["Annotated (score in the caption)"], "temp")
    annotated = _rgb(temp_dir / ann.get("subfolder", "") / ann["filename"])
    assert annotated.shape == image.shape and np.abs(annotated - image).max() > 0
    report = outputs[str(ids["D&C report"])]["text"][0]
    assert report.startswith("D&C ") and "2 subjects (cat, dog), threshold 0.4" in report


@needs_comfyui
def test_mudi_gamma_zero_equals_random_noise(tiny_models_dir, temp_dir, tmp_path, mudi_workflow):
    """Mean-Shifted Noise with gamma 0 gives the image of the same workflow with core's RandomNoise of the
    same seed in its place, bit for bit; the default gamma (1) gives another image. The score nodes are
    muted here (they only read the image)."""
    wf = mudi_workflow
    for n in wf["nodes"]:
        if n["type"] in DC_NODES or n.get("title") in ("Annotated (score in the caption)", "D&C report"):
            n["mode"] = 2
    _, shifted = _run_mudi(wf, tiny_models_dir, tmp_path, "gamma1")
    _, zero = _run_mudi(wf, tiny_models_dir, tmp_path, "gamma0", {"PersonalizeMeanShiftedNoise.gamma": 0.0})

    # the same graph with RandomNoise (same seed) feeding SamplerCustomAdvanced's noise input
    plain = copy.deepcopy(wf)
    msn = node_by_type(plain, "PersonalizeMeanShiftedNoise")
    seed = msn["widgets_values"][1]
    dropped = {inp["link"] for inp in msn["inputs"] if inp["link"] is not None}
    plain["links"] = [lk for lk in plain["links"] if lk[0] not in dropped]
    for n in plain["nodes"]:
        for out in n["outputs"]:
            out["links"] = [i for i in out["links"] if i not in dropped]
    msn.update(type="RandomNoise", title="RandomNoise", inputs=[], widgets_values=[seed, "fixed"],
               properties={"Node name for S&R": "RandomNoise"})
    _, random_noise = _run_mudi(plain, tiny_models_dir, tmp_path, "random")

    a, b = _rgb(zero), _rgb(random_noise)
    assert a.std() > 1.0
    np.testing.assert_array_equal(a, b)
    assert np.abs(_rgb(shifted) - a).max() > 1.0


# --- the MuDI training example: Seg-Mix Dataset x2 -> Train Seg-Mix LoRA -> core Load LoRA -> KSampler -----

MUDI_TRAIN_WORKFLOW = PACK_ROOT / "workflows" / "personalize_mudi_train_segmix_lora.json"
MUDI_TRAIN_LORA = "mudi_cat_dog.safetensors"
MUDI_TRAIN_SIZE = 64
MUDI_TRAIN_OVERRIDES = {"CheckpointLoaderSimple.ckpt_name": TINY_SD15,
                        # two AdamW steps at MuDI's 1e-4 move the LoRA too little to show in an 8-bit picture
                        "PersonalizeTrainSegMixLoRA.steps": 2, "PersonalizeTrainSegMixLoRA.learning_rate": 1e-2,
                        "PersonalizeTrainSegMixLoRA.resolution": 64,
                        "PersonalizeTrainSegMixLoRA.validate_every": 2, "PersonalizeTrainSegMixLoRA.checkpoint_every": 1,
                        "EmptyLatentImage.width": MUDI_TRAIN_SIZE, "EmptyLatentImage.height": MUDI_TRAIN_SIZE,
                        "KSampler.steps": 2}
TRAIN_TITLES = ("Loss curve", "Validation images", "Training report")


@pytest.fixture
def mudi_train_workflow():
    return json.loads(MUDI_TRAIN_WORKFLOW.read_text(encoding="utf-8"))


def _link(wf, link_id):
    return next(lk for lk in wf["links"] if lk[0] == link_id)


def _input_link(wf, node, name):
    """(origin node id, origin slot) of the link into ``node``'s input ``name``."""
    slot = next(i for i in node["inputs"] if i["name"] == name)
    lk = _link(wf, slot["link"])
    return lk[1], lk[2]


def test_mudi_train_workflow_is_ui_format(mudi_train_workflow):
    wf = mudi_train_workflow
    assert_ui_format(wf, MUDI_TRAIN_WORKFLOW)
    assert [g["title"][:2] for g in wf["groups"]] == ["1.", "2.", "3."]
    assert all(n["mode"] == 0 for n in wf["nodes"])
    ckpt = node_by_type(wf, "CheckpointLoaderSimple")
    assert ckpt["widgets_values"] == ["sd_xl_base_1.0.safetensors"]

    # 1. two chained Seg-Mix Dataset nodes on the shipped photos and masks (red channel), default identifier
    cat, dog = (node_by_title(wf, f"Seg-Mix Dataset (MuDI): {p}") for p in ("olis cat", "hta dog"))
    assert cat["widgets_values"] == ["olis cat", "a photo of {}", ""]
    assert dog["widgets_values"] == ["hta dog", "a photo of {}", ""]
    assert next(i for i in cat["inputs"] if i["name"] == "dataset")["link"] is None
    assert _input_link(wf, dog, "dataset") == (cat["id"], 0)
    for ds, name, photo in ((cat, "cat", "personalize_cat_04"), (dog, "dog", "personalize_dog6_02")):
        img = next(n for n in wf["nodes"] if n["id"] == _input_link(wf, ds, "images")[0])
        assert img["widgets_values"][0] == f"{photo}.jpg"
        to_mask = next(n for n in wf["nodes"] if n["id"] == _input_link(wf, ds, "masks")[0])
        assert to_mask["type"] == "ImageToMask" and to_mask["widgets_values"] == ["red"]
        msk = next(n for n in wf["nodes"] if n["id"] == _input_link(wf, to_mask, "image")[0])
        assert msk["widgets_values"][0] == f"{photo}_mask.jpg"
    shipped = {p.name for p in (PACK_ROOT / "workflows" / "inputs").iterdir()}
    assert {n["widgets_values"][0] for n in wf["nodes"] if n["type"] == "LoadImage"} <= shipped

    # 2. MuDI's settings except the steps; previews of the loss curve, the validation images and the report
    train = node_by_type(wf, "PersonalizeTrainSegMixLoRA")
    assert train["widgets_values"] == ["mudi_cat_dog", 300, 32, 1e-4, 0.3, 0.75, 1.0, "dco", 1000.0, 1024, 1, True,
                                       42, "fixed", "a photo of olis cat and hta dog, simple background", 100, 100, 1]
    assert _input_link(wf, train, "dataset") == (dog["id"], 0)
    for name, slot in (("model", 0), ("clip", 1), ("vae", 2)):
        assert _input_link(wf, train, name) == (ckpt["id"], slot)
    for title, slot in zip(TRAIN_TITLES, (2, 3, 4)):
        preview = node_by_title(wf, title)
        assert preview["type"] == ("PreviewAny" if slot == 4 else "PreviewImage")
        assert _input_link(wf, preview, preview["inputs"][0]["name"]) == (train["id"], slot)
    notes = [n["widgets_values"][0] for n in wf["nodes"] if n["type"] == "Note"]
    assert any("2010" in t and "300" in t and "gradient checkpointing" in t and "memory" in t for t in notes)
    assert any("Mean-Shifted Noise" in t and "models/loras" in t for t in notes)

    # 3. core Load LoRA: lora_name from the training node's first output, MODEL and CLIP from the checkpoint
    lora = node_by_type(wf, "LoraLoader")
    assert lora["widgets_values"] == [MUDI_TRAIN_LORA, 1.0, 1.0]
    assert _input_link(wf, lora, "lora_name") == (train["id"], 0)
    assert train["outputs"][0]["name"] == "lora_name" and train["outputs"][0]["type"] == "COMBO"
    assert _input_link(wf, lora, "model") == (ckpt["id"], 0) and _input_link(wf, lora, "clip") == (ckpt["id"], 1)
    ks = node_by_type(wf, "KSampler")
    assert _input_link(wf, ks, "model") == (lora["id"], 0)
    assert ks["widgets_values"] == [42, "fixed", 30, 5.0, "euler", "normal", 1.0]
    assert node_by_title(wf, "Prompt")["widgets_values"] == ["a photo of olis cat and hta dog sitting together on a sofa"]
    assert _input_link(wf, node_by_title(wf, "Prompt"), "clip") == (lora["id"], 1)
    assert node_by_type(wf, "EmptyLatentImage")["widgets_values"] == [1024, 1024, 1]
    assert node_by_type(wf, "SaveImage")["widgets_values"] == ["personalize_mudi_lora"]


def _lora_link_type_ok() -> bool:
    """Whether ComfyUI's validation accepts the training node's lora_name output in core LoraLoader's
    lora_name input (the check execution.validate_inputs makes for every linked input)."""
    import nodes
    from comfy_execution.validation import validate_node_input
    received = nodes.NODE_CLASS_MAPPINGS["PersonalizeTrainSegMixLoRA"].RETURN_TYPES[0]
    return validate_node_input(received, nodes.LoraLoader.INPUT_TYPES()["required"]["lora_name"][0])


@needs_comfyui
def test_mudi_train_lora_name_link_passes_validation(tiny_models_dir, loras_dir):
    """Core LoraLoader declares lora_name with the file list as its type; the training node's first
    return type is that live list, so ComfyUI's validation accepts the link, also for a file written
    after the node was loaded."""
    assert _lora_link_type_ok()
    (loras_dir / "written_later.safetensors").write_bytes(b"")
    import folder_paths
    folder_paths.filename_list_cache.pop("loras", None)
    assert _lora_link_type_ok()


@pytest.fixture
def loras_dir(tmp_path):
    """A fresh models/loras folder, ComfyUI's default for the test (Train Seg-Mix LoRA writes into the
    first one); the folder list and its file list cache are restored after."""
    import folder_paths
    path = tmp_path / "loras"
    path.mkdir()
    before = folder_paths.get_folder_paths("loras")
    folder_paths.add_model_folder_path("loras", str(path), is_default=True)
    folder_paths.filename_list_cache.pop("loras", None)
    yield path
    folder_paths.folder_names_and_paths["loras"][0][:] = before
    folder_paths.filename_list_cache.pop("loras", None)


@needs_comfyui
def test_mudi_train_workflow_runs_headless(tiny_models_dir, loras_dir, temp_dir, tmp_path, mudi_train_workflow,
                                           monkeypatch):
    """The whole training example on the tiny SD1.5 checkpoint (SDXL is only the workflow's default):
    2 training steps at 64 px in the training child, a validation image after the second, then core's Load LoRA
    with the new file and a 64 px picture. The LoRA lands in the (temporary) models/loras, Load LoRA
    receives exactly its name, and the picture differs from the same graph without the LoRA."""
    import folder_paths
    import nodes
    wf = mudi_train_workflow
    ids = {n.get("title") or n["type"]: n["id"] for n in wf["nodes"]}
    train_id, lora_id = (str(node_by_type(wf, t)["id"]) for t in ("PersonalizeTrainSegMixLoRA", "LoraLoader"))
    ckpt = str(node_by_type(wf, "CheckpointLoaderSimple")["id"])

    # the converted prompt: Load LoRA's lora_name is the training node's first output, not the saved value
    prompt = rw.ui_to_api(wf, rw.live_schemas({n["type"] for n in wf["nodes"]}))
    lora_inputs = prompt[lora_id]["inputs"]
    assert lora_inputs == {"lora_name": [train_id, 0], "strength_model": 1.0, "strength_clip": 1.0,
                           "model": [ckpt, 0], "clip": [ckpt, 1]}
    assert prompt[train_id]["inputs"]["output_name"] == "mudi_cat_dog"

    assert _lora_link_type_ok()
    received = []
    real_load_lora = nodes.LoraLoader.load_lora

    def spy(self, model, clip, lora_name, strength_model, strength_clip):
        received.append((lora_name, strength_model, strength_clip, folder_paths.get_full_path("loras", lora_name)))
        return real_load_lora(self, model, clip, lora_name, strength_model, strength_clip)
    monkeypatch.setattr(nodes.LoraLoader, "load_lora", spy)

    path = tmp_path / "train.json"
    path.write_text(json.dumps(wf), encoding="utf-8")
    out_dir, in_dir = tmp_path / "out", tmp_path / "in"
    outputs = rw.run_workflow(path, ROOT, output_dir=out_dir, models_dir=tiny_models_dir, input_dir=in_dir,
                              overrides=MUDI_TRAIN_OVERRIDES, log=lambda msg: None)
    assert sorted(p.name for p in in_dir.iterdir()) == sorted(MUDI_INPUTS)

    # the LoRA is in the temporary models/loras, and Load LoRA got exactly that file
    assert sorted(p.name for p in loras_dir.iterdir()) == [MUDI_TRAIN_LORA]
    assert received == [(MUDI_TRAIN_LORA, 1.0, 1.0, str(loras_dir / MUDI_TRAIN_LORA))]
    # the training's job folder went to the (temporary) output folder, with its validation image
    job = out_dir / "personalize_training" / "mudi_cat_dog"
    assert [p.name for p in job.glob("preview_*.png")] == ["preview_000002.png"]

    # the training previews: the loss curve, the validation image at the training size, the report
    (curve,) = _images(outputs, ids["Loss curve"], "temp")
    assert _rgb(temp_dir / curve.get("subfolder", "") / curve["filename"]).std() > 1.0
    (shown,) = _images(outputs, ids["Validation images"], "temp")
    validation = _rgb(temp_dir / shown.get("subfolder", "") / shown["filename"])
    assert validation.shape == (64, 64, 3) and validation.std() > 1.0
    report = outputs[str(ids["Training report"])]["text"][0]
    assert report.startswith("Seg-Mix LoRA: ") and MUDI_TRAIN_LORA in report and "2 steps" in report

    # the picture
    saved = [item for out in outputs.values() for item in out.get("images", []) if item.get("type") == "output"]
    assert len(saved) == 1 and saved[0]["filename"].startswith("personalize_mudi_lora")
    with_lora = _rgb(out_dir / saved[0].get("subfolder", "") / saved[0]["filename"])
    assert with_lora.shape == (MUDI_TRAIN_SIZE, MUDI_TRAIN_SIZE, 3) and with_lora.std() > 1.0

    # the same graph without the LoRA (Load LoRA bypassed; the training and its previews muted, no second
    # training run): the same seed and prompt give another picture, so the trained LoRA changes it
    plain = copy.deepcopy(wf)
    for n in plain["nodes"]:
        if n["type"] == "LoraLoader":
            n["mode"] = 4
        elif n["type"] in ("PersonalizeTrainSegMixLoRA", "PersonalizeSegMixDataset", "LoadImage", "ImageToMask") \
                or n.get("title") in TRAIN_TITLES:
            n["mode"] = 2
    path = tmp_path / "plain.json"
    path.write_text(json.dumps(plain), encoding="utf-8")
    outputs = rw.run_workflow(path, ROOT, output_dir=tmp_path / "out_plain", models_dir=tiny_models_dir,
                              input_dir=in_dir, log=lambda msg: None,
                              overrides={k: v for k, v in MUDI_TRAIN_OVERRIDES.items()
                                         if not k.startswith("PersonalizeTrainSegMixLoRA.")})
    assert len(received) == 1                                             # Load LoRA did not run
    (item,) = [i for out in outputs.values() for i in out.get("images", []) if i.get("type") == "output"]
    without = _rgb(tmp_path / "out_plain" / item.get("subfolder", "") / item["filename"])
    assert without.shape == with_lora.shape and without.std() > 1.0
    diff = np.abs(with_lora - without)
    assert diff.max() > 8.0 and diff.mean() > 0.5, (diff.max(), diff.mean())


# --- the FLUX example: MRSA on FLUX.1 dev with core's split loaders, FluxGuidance and cfg 1 ---------------

FLUX_WORKFLOW = PACK_ROOT / "workflows" / "personalize_freecustom_flux.json"
FLUX_SINGLE = "FLUX dev/schnell: single blocks"
TINY_FLUX, TINY_FLUX_VAE = "tiny_flux_workflow.safetensors", "tiny_flux_workflow_ae.safetensors"
FLUX_SIZE = 64
FLUX_OVERRIDES = {"UNETLoader.unet_name": TINY_FLUX, "VAELoader.vae_name": TINY_FLUX_VAE,
                  "EmptySD3LatentImage.width": FLUX_SIZE, "EmptySD3LatentImage.height": FLUX_SIZE,
                  "PersonalizeReferenceEncode.resolution": FLUX_SIZE, "KSampler.steps": 2}
FLUX_INPUTS = ["personalize_cat_04.jpg", "personalize_cat_04_mask.jpg", "personalize_dog6_02.jpg",
               "personalize_dog6_02_mask.jpg"]


@pytest.fixture
def flux_workflow():
    return json.loads(FLUX_WORKFLOW.read_text(encoding="utf-8"))


def _origin(wf, node, name):
    """The node and output slot feeding ``node``'s input ``name``."""
    src, slot = _input_link(wf, node, name)
    return next(n for n in wf["nodes"] if n["id"] == src), slot


def test_flux_workflow_is_ui_format(flux_workflow):
    """What a FLUX.1 dev user expects: core's split loaders (diffusion model, CLIP-L + T5-XXL, ae),
    FluxGuidance 3.5 on the prompt, an empty negative prompt, cfg 1, euler / simple, 1024x1024 from
    Empty SD3 Latent; the references of the SD1.5 FreeCustom example encoded with the FLUX VAE and
    captioned with the FLUX text encoders; MRSA on the single blocks, side by side."""
    wf = flux_workflow
    assert_ui_format(wf, FLUX_WORKFLOW, ("models/diffusion_models", "models/text_encoders", "models/vae"))
    assert all(n["mode"] == 0 for n in wf["nodes"])
    unet, dual, vae = (node_by_type(wf, t) for t in ("UNETLoader", "DualCLIPLoader", "VAELoader"))
    assert unet["widgets_values"] == ["flux1-dev.safetensors", "default"]
    assert dual["widgets_values"] == ["clip_l.safetensors", "t5xxl_fp16.safetensors", "flux", "default"]
    assert vae["widgets_values"] == ["ae.safetensors"]

    mra = node_by_type(wf, "PersonalizeMultiReferenceAttention")
    assert mra["widgets_values"] == [FLUX_SINGLE, "output:6-11", 0.0, 1.0, 1.0, 0, "shifted (side by side)",
                                     "whole image"]
    assert _input_link(wf, mra, "model") == (unet["id"], 0)
    ks = node_by_type(wf, "KSampler")
    assert ks["widgets_values"] == [42, "fixed", 20, 1.0, "euler", "simple", 1.0]
    assert _input_link(wf, ks, "model") == (mra["id"], 0)
    guidance, _ = _origin(wf, ks, "positive")
    assert guidance["type"] == "FluxGuidance" and guidance["widgets_values"] == [3.5]
    prompt, _ = _origin(wf, guidance, "conditioning")
    assert prompt["widgets_values"] == ["a cat and a dog sitting together on a sofa"]
    negative, _ = _origin(wf, ks, "negative")
    assert negative["type"] == "CLIPTextEncode" and negative["widgets_values"] == [""]
    latent, _ = _origin(wf, ks, "latent_image")
    assert latent["type"] == "EmptySD3LatentImage" and latent["widgets_values"] == [1024, 1024, 1]
    decode = node_by_type(wf, "VAEDecode")
    assert _input_link(wf, decode, "samples") == (ks["id"], 0) and _input_link(wf, decode, "vae") == (vae["id"], 0)
    assert node_by_type(wf, "SaveImage")["widgets_values"] == ["personalize_freecustom_flux"]

    # the two chained references, as in the SD1.5 example, with the FLUX VAE and text encoders
    cat, dog = (node_by_title(wf, f"Reference Encode: {s}") for s in ("cat", "dog"))
    assert _input_link(wf, mra, "references") == (dog["id"], 0)
    assert _input_link(wf, dog, "references") == (cat["id"], 0)
    for enc, photo, caption in ((cat, "personalize_cat_04", "a cat"), (dog, "personalize_dog6_02", "a dog")):
        assert enc["widgets_values"] == [3.0, 0.5, False, 1024]
        assert _input_link(wf, enc, "vae") == (vae["id"], 0)
        assert _origin(wf, enc, "image")[0]["widgets_values"][0] == f"{photo}.jpg"
        to_mask, _ = _origin(wf, enc, "mask")
        assert to_mask["widgets_values"] == ["red"]
        assert _origin(wf, to_mask, "image")[0]["widgets_values"][0] == f"{photo}_mask.jpg"
        cap, _ = _origin(wf, enc, "caption")
        assert cap["widgets_values"] == [caption]
    for text_node in (prompt, negative, *(_origin(wf, e, "caption")[0] for e in (cat, dog))):
        assert _input_link(wf, text_node, "clip") == (dual["id"], 0)
    shipped = {p.name for p in (PACK_ROOT / "workflows" / "inputs").iterdir()}
    assert sorted(n["widgets_values"][0] for n in wf["nodes"] if n["type"] == "LoadImage") == sorted(FLUX_INPUTS)
    assert set(FLUX_INPUTS) <= shipped

    notes = [n["widgets_values"][0] for n in wf["nodes"] if n["type"] == "Note"]
    assert any("flux1-dev.safetensors" in t and "t5xxl_fp16.safetensors" in t and "ae.safetensors" in t
               and "single blocks" in t and "side by side" in t for t in notes)
    assert any("ignored" in t and "cfg 1" in t and "cfg above 1" in t for t in notes)


def _with_tiny_clip(wf):
    """The FLUX workflow with its text encoders swapped for ones a test can build.

    No tiny T5-XXL exists, so the DualCLIPLoader node becomes a Load Checkpoint of the tiny SD1.5
    checkpoint (same node id, so every link stays): its CLIP output (slot 1) feeds the links the
    DualCLIPLoader's CLIP fed (prompt, negative prompt, the two captions); its MODEL and VAE stay
    unconnected. The tiny FLUX takes 768-wide text and pooled vectors, the SD1 CLIP's width."""
    wf = copy.deepcopy(wf)
    dual = node_by_type(wf, "DualCLIPLoader")
    clip_links = list(dual["outputs"][0]["links"])
    for lk in wf["links"]:
        if lk[0] in clip_links:
            lk[2] = 1                                                     # origin slot: CLIP is output 1
    dual.update(type="CheckpointLoaderSimple", title="Load Checkpoint (tiny SD1.5: its CLIP stands in)",
                widgets_values=[TINY_SD15], properties={"Node name for S&R": "CheckpointLoaderSimple"},
                outputs=[{"name": name, "localized_name": name, "type": name, "slot_index": i,
                          "links": clip_links if name == "CLIP" else []}
                         for i, name in enumerate(("MODEL", "CLIP", "VAE"))])
    return wf


@pytest.fixture(scope="module")
def flux_models_dir(tiny_models_dir):
    """The tiny models folder with a tiny FLUX dev (2 double, 2 single blocks, guidance embedding) in
    diffusion_models/ and a 16-channel VAE in vae/, under the names FLUX_OVERRIDES gives the loaders."""
    from tiny_flux import build_flux, build_flux_vae
    if not (tiny_models_dir / "diffusion_models" / TINY_FLUX).is_file():
        build_flux(tiny_models_dir / "diffusion_models" / TINY_FLUX, heads=2, depth=2, single=2, guidance=True)
    if not (tiny_models_dir / "vae" / TINY_FLUX_VAE).is_file():
        build_flux_vae(tiny_models_dir / "vae" / TINY_FLUX_VAE)
    return tiny_models_dir


def _pack_module(name):
    """A module of the pack as ComfyUI loaded it (not the test import under personalize_pack)."""
    import importlib
    import nodes
    package = sys.modules[nodes.NODE_CLASS_MAPPINGS["PersonalizeMultiReferenceAttention"].__module__].__package__
    return importlib.import_module(f"{package.rsplit('.', 1)[0]}.{name}")


def _run_flux(wf, models_dir, tmp_path, tag, overrides=None):
    path = tmp_path / f"{tag}.json"
    path.write_text(json.dumps(wf), encoding="utf-8")
    out_dir = tmp_path / f"out_{tag}"
    outputs = rw.run_workflow(path, ROOT, output_dir=out_dir, models_dir=models_dir, input_dir=tmp_path / "in",
                              overrides=dict(FLUX_OVERRIDES, **(overrides or {})), log=lambda msg: None)
    (item,) = [i for out in outputs.values() for i in out.get("images", []) if i.get("type") == "output"]
    assert item["filename"].startswith("personalize_freecustom_flux")
    return out_dir / item.get("subfolder", "") / item["filename"]


@needs_comfyui
def test_flux_workflow_runs_headless(flux_models_dir, tmp_path, flux_workflow, monkeypatch):
    """The shipped FLUX example on a tiny random FLUX dev at 64 px, 2 steps, with the tiny SD1.5 CLIP in
    place of CLIP-L + T5-XXL (``_with_tiny_clip``): the image is saved at the latent's size and is not
    flat; the patched attention acts in the single blocks only (the preset), and both the references
    (the node bypassed) and their positions (aligned instead of side by side) change the picture."""
    from PIL import Image
    wf = _with_tiny_clip(flux_workflow)

    # the converted prompt: the loaders' values and links as the workflow gives them
    prompt = rw.ui_to_api(wf, rw.live_schemas({n["type"] for n in wf["nodes"]}))
    mra = api_by_type(prompt, "PersonalizeMultiReferenceAttention")["inputs"]
    assert (mra["layers"], mra["reference_positions"]) == (FLUX_SINGLE, "shifted (side by side)")
    assert api_by_type(prompt, "FluxGuidance")["inputs"]["guidance"] == 3.5

    # which FLUX blocks hand their joint attention to the pack (its override, in the pack ComfyUI loaded)
    dit = _pack_module("attention.dit")
    patched = []
    real_call = dit.JointAttention.__call__

    def spy(self, func, *args, **kwargs):
        patched.append(self.key)
        return real_call(self, func, *args, **kwargs)
    monkeypatch.setattr(dit.JointAttention, "__call__", spy)

    saved = _run_flux(wf, flux_models_dir, tmp_path, "mrsa")
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == sorted(FLUX_INPUTS)
    with Image.open(saved) as im:
        assert im.size == (FLUX_SIZE, FLUX_SIZE)
        assert "workflow" in im.info                                       # reloadable in the editor
    image = _rgb(saved)
    assert np.isfinite(image).all() and image.std() > 1.0
    assert set(patched) == {("single_block", 0), ("single_block", 1)}     # the preset: single blocks only
    calls = len(patched)

    # the same graph with Multi-Reference Attention bypassed (MODEL passes through): another picture
    plain = copy.deepcopy(wf)
    node_by_type(plain, "PersonalizeMultiReferenceAttention")["mode"] = 4
    without = _rgb(_run_flux(plain, flux_models_dir, tmp_path, "plain"))
    assert len(patched) == calls                                          # nothing patched without the node
    # A run is deterministic (the same graph twice gives the same bits: SDPA on the CPU, comfy_host), so
    # every difference comes from the references. Two steps of a random 2+2-block FLUX move the 8-bit
    # picture by a little, but over much of it (measured: mean 0.86, 59 % of the values).
    diff = np.abs(image - without)
    assert without.std() > 1.0 and diff.mean() > 0.3 and (diff > 0).mean() > 0.3, (diff.max(), diff.mean())

    # the references' positions matter: on the image's grid (aligned) the reference keys turn by other
    # RoPE angles than beside it, so the picture changes (measured: 13 % of the values, by one level)
    aligned = _rgb(_run_flux(wf, flux_models_dir, tmp_path, "aligned",
                             {"PersonalizeMultiReferenceAttention.reference_positions": "aligned"}))
    diff = np.abs(image - aligned)
    assert (diff > 0).mean() > 0.05, (diff.max(), diff.mean())


@needs_comfyui
def test_flux_workflow_is_reproduced_by_the_generator(tiny_models_dir, tmp_path):
    """The shipped JSON and thumbnail are what tools/make_workflows.py writes with the live schemas."""
    if "personalize_make_workflows" not in sys.modules:
        spec = importlib.util.spec_from_file_location("personalize_make_workflows",
                                                      PACK_ROOT / "tools" / "make_workflows.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    mw = sys.modules["personalize_make_workflows"]
    import nodes
    shipped = json.loads(FLUX_WORKFLOW.read_text(encoding="utf-8"))
    schemas = mw.rw.live_schemas(sorted({n["type"] for n in shipped["nodes"]} - {"Note"}))
    assert mw.freecustom_flux_workflow(schemas, nodes.NODE_CLASS_MAPPINGS) == shipped
    mw.thumbnail_flux(tmp_path / "card.jpg")
    assert (tmp_path / "card.jpg").read_bytes() == FLUX_WORKFLOW.with_suffix(".jpg").read_bytes()
