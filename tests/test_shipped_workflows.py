"""The shipped example workflows as files, without ComfyUI: UI format (keys, links, node fields, a Note
naming the model folders, the thumbnail), and the settings, wiring and notes each example promises. That
they run is tests/integration/test_workflows.py."""
from __future__ import annotations

import json

import pytest
from workflow_helpers import SHIPPED_INPUTS, WORKFLOWS, assert_ui_format, input_link, node_by_title, node_by_type, origin

WORKFLOW = WORKFLOWS / "personalize_freecustom_multi_reference.json"
MUDI_WORKFLOW = WORKFLOWS / "personalize_mudi_compose_and_score.json"
MUDI_INPUTS = ["personalize_cat_04.jpg", "personalize_cat_04_mask.jpg", "personalize_dog6_02.jpg",
               "personalize_dog6_02_mask.jpg"]
MUDI_TRAIN_WORKFLOW = WORKFLOWS / "personalize_mudi_train_segmix_lora.json"
MUDI_TRAIN_LORA = "mudi_cat_dog.safetensors"
TRAIN_TITLES = ("Loss curve", "Validation images", "Training report")
FLUX_WORKFLOW = WORKFLOWS / "personalize_freecustom_flux.json"
FLUX_SINGLE = "FLUX dev/schnell: single blocks"
FLUX_INPUTS = MUDI_INPUTS


@pytest.fixture
def mudi_workflow():
    return json.loads(MUDI_WORKFLOW.read_text(encoding="utf-8"))


@pytest.fixture
def mudi_train_workflow():
    return json.loads(MUDI_TRAIN_WORKFLOW.read_text(encoding="utf-8"))


@pytest.fixture
def flux_workflow():
    return json.loads(FLUX_WORKFLOW.read_text(encoding="utf-8"))


def test_shipped_workflow_is_ui_format():
    assert_ui_format(json.loads(WORKFLOW.read_text(encoding="utf-8")), WORKFLOW)


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
    shipped = {p.name for p in SHIPPED_INPUTS.iterdir()}
    loaded = [n["widgets_values"][0] for n in wf["nodes"] if n["type"] == "LoadImage"]
    assert sorted(loaded) == sorted(MUDI_INPUTS) and set(loaded) <= shipped


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
    assert input_link(wf, dog, "dataset") == (cat["id"], 0)
    for ds, name, photo in ((cat, "cat", "personalize_cat_04"), (dog, "dog", "personalize_dog6_02")):
        img = next(n for n in wf["nodes"] if n["id"] == input_link(wf, ds, "images")[0])
        assert img["widgets_values"][0] == f"{photo}.jpg"
        to_mask = next(n for n in wf["nodes"] if n["id"] == input_link(wf, ds, "masks")[0])
        assert to_mask["type"] == "ImageToMask" and to_mask["widgets_values"] == ["red"]
        msk = next(n for n in wf["nodes"] if n["id"] == input_link(wf, to_mask, "image")[0])
        assert msk["widgets_values"][0] == f"{photo}_mask.jpg"
    shipped = {p.name for p in SHIPPED_INPUTS.iterdir()}
    assert {n["widgets_values"][0] for n in wf["nodes"] if n["type"] == "LoadImage"} <= shipped

    # 2. MuDI's settings except the steps; previews of the loss curve, the validation images and the report
    train = node_by_type(wf, "PersonalizeTrainSegMixLoRA")
    assert train["widgets_values"] == ["mudi_cat_dog", 300, 32, 1e-4, 0.3, 0.75, 1.0, "dco", 1000.0, 1024, 1, True,
                                       42, "fixed", "a photo of olis cat and hta dog, simple background", 100, 100, 1]
    assert input_link(wf, train, "dataset") == (dog["id"], 0)
    for name, slot in (("model", 0), ("clip", 1), ("vae", 2)):
        assert input_link(wf, train, name) == (ckpt["id"], slot)
    for title, slot in zip(TRAIN_TITLES, (2, 3, 4)):
        preview = node_by_title(wf, title)
        assert preview["type"] == ("PreviewAny" if slot == 4 else "PreviewImage")
        assert input_link(wf, preview, preview["inputs"][0]["name"]) == (train["id"], slot)
    notes = [n["widgets_values"][0] for n in wf["nodes"] if n["type"] == "Note"]
    assert any("2010" in t and "300" in t and "gradient checkpointing" in t and "memory" in t for t in notes)
    assert any("Mean-Shifted Noise" in t and "models/loras" in t for t in notes)

    # 3. core Load LoRA: lora_name from the training node's first output, MODEL and CLIP from the checkpoint
    lora = node_by_type(wf, "LoraLoader")
    assert lora["widgets_values"] == [MUDI_TRAIN_LORA, 1.0, 1.0]
    assert input_link(wf, lora, "lora_name") == (train["id"], 0)
    assert train["outputs"][0]["name"] == "lora_name" and train["outputs"][0]["type"] == "COMBO"
    assert input_link(wf, lora, "model") == (ckpt["id"], 0) and input_link(wf, lora, "clip") == (ckpt["id"], 1)
    ks = node_by_type(wf, "KSampler")
    assert input_link(wf, ks, "model") == (lora["id"], 0)
    assert ks["widgets_values"] == [42, "fixed", 30, 5.0, "euler", "normal", 1.0]
    assert node_by_title(wf, "Prompt")["widgets_values"] == ["a photo of olis cat and hta dog sitting together on a sofa"]
    assert input_link(wf, node_by_title(wf, "Prompt"), "clip") == (lora["id"], 1)
    assert node_by_type(wf, "EmptyLatentImage")["widgets_values"] == [1024, 1024, 1]
    assert node_by_type(wf, "SaveImage")["widgets_values"] == ["personalize_mudi_lora"]


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
    assert input_link(wf, mra, "model") == (unet["id"], 0)
    ks = node_by_type(wf, "KSampler")
    assert ks["widgets_values"] == [42, "fixed", 20, 1.0, "euler", "simple", 1.0]
    assert input_link(wf, ks, "model") == (mra["id"], 0)
    guidance, _ = origin(wf, ks, "positive")
    assert guidance["type"] == "FluxGuidance" and guidance["widgets_values"] == [3.5]
    prompt, _ = origin(wf, guidance, "conditioning")
    assert prompt["widgets_values"] == ["a cat and a dog sitting together on a sofa"]
    negative, _ = origin(wf, ks, "negative")
    assert negative["type"] == "CLIPTextEncode" and negative["widgets_values"] == [""]
    latent, _ = origin(wf, ks, "latent_image")
    assert latent["type"] == "EmptySD3LatentImage" and latent["widgets_values"] == [1024, 1024, 1]
    decode = node_by_type(wf, "VAEDecode")
    assert input_link(wf, decode, "samples") == (ks["id"], 0) and input_link(wf, decode, "vae") == (vae["id"], 0)
    assert node_by_type(wf, "SaveImage")["widgets_values"] == ["personalize_freecustom_flux"]

    # the two chained references, as in the SD1.5 example, with the FLUX VAE and text encoders
    cat, dog = (node_by_title(wf, f"Reference Encode: {s}") for s in ("cat", "dog"))
    assert input_link(wf, mra, "references") == (dog["id"], 0)
    assert input_link(wf, dog, "references") == (cat["id"], 0)
    for enc, photo, caption in ((cat, "personalize_cat_04", "a cat"), (dog, "personalize_dog6_02", "a dog")):
        assert enc["widgets_values"] == [3.0, 0.5, False, 1024]
        assert input_link(wf, enc, "vae") == (vae["id"], 0)
        assert origin(wf, enc, "image")[0]["widgets_values"][0] == f"{photo}.jpg"
        to_mask, _ = origin(wf, enc, "mask")
        assert to_mask["widgets_values"] == ["red"]
        assert origin(wf, to_mask, "image")[0]["widgets_values"][0] == f"{photo}_mask.jpg"
        cap, _ = origin(wf, enc, "caption")
        assert cap["widgets_values"] == [caption]
    for text_node in (prompt, negative, *(origin(wf, e, "caption")[0] for e in (cat, dog))):
        assert input_link(wf, text_node, "clip") == (dual["id"], 0)
    shipped = {p.name for p in SHIPPED_INPUTS.iterdir()}
    assert sorted(n["widgets_values"][0] for n in wf["nodes"] if n["type"] == "LoadImage") == sorted(FLUX_INPUTS)
    assert set(FLUX_INPUTS) <= shipped

    notes = [n["widgets_values"][0] for n in wf["nodes"] if n["type"] == "Note"]
    assert any("flux1-dev.safetensors" in t and "t5xxl_fp16.safetensors" in t and "ae.safetensors" in t
               and "single blocks" in t and "side by side" in t for t in notes)
    assert any("ignored" in t and "cfg 1" in t and "cfg above 1" in t for t in notes)
