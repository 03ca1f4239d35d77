"""Helpers of the workflow tests (tests/test_ui_to_api.py, tests/test_run_workflow.py,
tests/test_shipped_workflows.py, tests/integration/test_workflows.py): the tools on ``sys.path``, the
hand-written schemas of the FreeCustom example, finders for nodes and links of UI-format workflows and
API prompts, and the UI-format check every shipped workflow passes."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

PACK_ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = PACK_ROOT / "workflows"
SHIPPED_INPUTS = WORKFLOWS / "inputs"
TOOLS = PACK_ROOT / "tools"
if str(TOOLS) not in sys.path:          # tools/ is not a package: its modules import each other by path
    sys.path.insert(0, str(TOOLS))

from workflows.settings import TEMPLATES, workflow_path  # (tools/ is on the path now)


def workflow_file(stem: str) -> Path:
    """The shipped JSON of the workflow ``stem`` (``workflows/<its template title>.json``)."""
    return workflow_path(stem)


def shipped_stems() -> list[str]:
    """The stems of every shipped workflow, sorted; each JSON in ``workflows/`` is one of them."""
    by_file = {f"{title}.json": stem for stem, title in TEMPLATES.items()}
    return sorted(by_file[p.name] for p in WORKFLOWS.glob("*.json"))

# The FreeCustom example's node types as hand-written schemas (no ComfyUI needed)
FLOAT = lambda default: ("FLOAT", {"default": default, "min": 0.0, "max": 100.0})
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


def node_by_title(wf, title):
    return next(n for n in wf["nodes"] if n.get("title") == title)


def node_by_type(wf, class_type):
    return next(n for n in wf["nodes"] if n["type"] == class_type)


def api_by_title(prompt, title):
    return next(n for n in prompt.values() if n["_meta"]["title"] == title)


def api_by_type(prompt, class_type):
    return next(n for n in prompt.values() if n["class_type"] == class_type)


def input_link(wf, node, name):
    """(origin node id, origin slot) of the link into ``node``'s input ``name``."""
    slot = next(i for i in node["inputs"] if i["name"] == name)
    lk = next(lk for lk in wf["links"] if lk[0] == slot["link"])
    return lk[1], lk[2]


def origin(wf, node, name):
    """The node and output slot feeding ``node``'s input ``name``."""
    src, slot = input_link(wf, node, name)
    return next(n for n in wf["nodes"] if n["id"] == src), slot


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


def rgb(path):
    from PIL import Image
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float32)


def images_of(outputs, node_id, kind):
    """The ``kind`` ("output", "temp") images node ``node_id`` reported in a run's history outputs."""
    items = (outputs.get(str(node_id)) or {}).get("images", [])
    return [item for item in items if item.get("type") == kind]


def saved_images(outputs):
    """Every image a run saved into its output folder (Save Image), as history items."""
    return [item for out in outputs.values() for item in out.get("images", []) if item.get("type") == "output"]
