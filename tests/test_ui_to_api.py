"""The UI→API converter (tools/ui_to_api.py) on the shipped FreeCustom workflow and variants of it,
with hand-written schemas, without ComfyUI: widget rules, links, converted widgets, Reroute, muted and
bypassed nodes."""
from __future__ import annotations

import copy
import json

import pytest
from workflow_helpers import SCHEMAS, api_by_title, api_by_type, node_by_title, node_by_type, workflow_file

from ui_to_api import WorkflowError, ui_to_api, widget_values

WORKFLOW = workflow_file("personalize_freecustom_multi_reference")


@pytest.fixture
def workflow():
    return json.loads(WORKFLOW.read_text(encoding="utf-8"))


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


def test_shipped_workflow_converts(workflow):
    prompt = ui_to_api(workflow, SCHEMAS)
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
    assert widget_values(schema, values) == {"seed": 7, "noise_seed": 9, "x": 0.5, "y": 3, "pick": "b", "z": "text"}
    assert widget_values(schema, {"seed": 1, "z": "t"}) == {"seed": 1, "z": "t"}   # dict-style values


def test_upload_value_optional_and_defaults():
    load = SCHEMAS["LoadImage"]
    assert widget_values(load, ["a.png", "image"]) == {"image": "a.png"}
    assert widget_values(load, ["a.png"]) == {"image": "a.png"}
    # short widgets_values fall back to the schema defaults
    assert widget_values(SCHEMAS["EmptyLatentImage"], [256]) == {"width": 256, "height": 512, "batch_size": 1}


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
    prompt = ui_to_api(workflow, SCHEMAS_X)
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
    prompt = ui_to_api(workflow, SCHEMAS)
    assert api_by_type(prompt, "VAEDecode")["inputs"]["vae"] == [str(ckpt["id"]), 2]
    assert all(n["class_type"] != "Reroute" for n in prompt.values())


def test_muted_and_bypassed_nodes(workflow):
    node_by_title(workflow, "Reference Encode: dog")["mode"] = 2           # muted: gone, its output too
    node_by_type(workflow, "SaveImage")["mode"] = 2
    prompt = ui_to_api(workflow, SCHEMAS)
    assert all(n["_meta"]["title"] != "Reference Encode: dog" for n in prompt.values())
    assert all(n["class_type"] != "SaveImage" for n in prompt.values())
    assert "references" not in api_by_type(prompt, "PersonalizeMultiReferenceAttention")["inputs"]

    node_by_title(workflow, "Reference Encode: dog")["mode"] = 4           # bypassed: passes the cat through
    mra = node_by_type(workflow, "PersonalizeMultiReferenceAttention")
    mra["mode"] = 4                                                        # MODEL in -> MODEL out
    prompt = ui_to_api(workflow, SCHEMAS)
    ckpt_id = str(node_by_type(workflow, "CheckpointLoaderSimple")["id"])
    assert api_by_type(prompt, "KSampler")["inputs"]["model"] == [ckpt_id, 0]
    assert all(n["class_type"] != "PersonalizeMultiReferenceAttention" for n in prompt.values())
    mra["mode"] = 0
    prompt = ui_to_api(workflow, SCHEMAS)
    cat_id = str(node_by_title(workflow, "Reference Encode: cat")["id"])
    assert api_by_type(prompt, "PersonalizeMultiReferenceAttention")["inputs"]["references"] == [cat_id, 0]


def test_dict_links_and_unknown_nodes(workflow):
    as_dicts = copy.deepcopy(workflow)
    as_dicts["links"] = [dict(zip(("id", "origin_id", "origin_slot", "target_id", "target_slot", "type"), lk))
                         for lk in workflow["links"]]
    assert ui_to_api(as_dicts, SCHEMAS) == ui_to_api(workflow, SCHEMAS)

    add_node(workflow, "SomeMissingNode", mode=2)                          # muted unknown node: ignored
    ui_to_api(workflow, SCHEMAS)
    add_node(workflow, "SomeMissingNode")
    with pytest.raises(WorkflowError, match="SomeMissingNode"):
        ui_to_api(workflow, SCHEMAS)
    with pytest.raises(WorkflowError, match="UI-format"):
        ui_to_api({"3": {"class_type": "KSampler", "inputs": {}}}, SCHEMAS)
