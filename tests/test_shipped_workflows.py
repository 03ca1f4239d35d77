"""The shipped example workflows as files, without ComfyUI: UI format (keys, links, node fields, a Note
naming the model folders, the thumbnail), and the settings, wiring and notes each example promises. That
they run is tests/integration/test_workflows.py."""
from __future__ import annotations

import json

import numpy as np
import pytest
from workflow_helpers import (SHIPPED_INPUTS, WORKFLOWS, assert_ui_format, input_link, node_by_title, node_by_type,
                              origin, shipped_stems, workflow_file)

WORKFLOW = workflow_file("personalize_freecustom_multi_reference")
MUDI_WORKFLOW = workflow_file("personalize_mudi_compose_and_score")
MUDI_INPUTS = ["personalize_cat_04.jpg", "personalize_cat_04_mask.jpg", "personalize_dog6_02.jpg",
               "personalize_dog6_02_mask.jpg"]
MUDI_TRAIN_WORKFLOW = workflow_file("personalize_mudi_train_segmix_lora")
MUDI_TRAIN_LORA = "mudi_cat_dog.safetensors"
TRAIN_TITLES = ("Loss curve", "Validation images", "Training report")
FLUX_WORKFLOW = workflow_file("personalize_freecustom_flux")
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
    assert train["widgets_values"] == ["mudi_cat_dog", 300, 32, 1e-4, 0.3, 0.75, 1.0, "dco", 1000.0, 1024, 1, 2, True,
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


# --- the world's examples: the same techniques on the pack's own model, no download -------------------------

WORLD = "World model (no download)"
WORLD_CHECKPOINT = "personalize_world.safetensors"
WORLD_STEMS = ["personalize_world_freecustom_multi_reference", "personalize_world_freemix_structure_appearance",
               "personalize_world_mudi_compose"]
WORLD_SUBJECTS = {"circle": ("teal", "checkered", "circle"), "square": ("orange", "striped", "square"),
                  "star": ("green", "plain", "star"), "diamond": ("purple", "checkered", "diamond")}


def _world(stem):
    return json.loads(workflow_file(stem).read_text(encoding="utf-8"))


def _world_file(subject, mask=False):
    return "personalize_world_" + "_".join(WORLD_SUBJECTS[subject]) + ("_mask" if mask else "") + ".png"


def _image_and_mask(wf, node, image_input="image", mask_input="mask"):
    """The file names behind a node's image input and its mask input (Load Image > Image To Mask, red)."""
    img, _ = origin(wf, node, image_input)
    to_mask, _ = origin(wf, node, mask_input)
    assert to_mask["type"] == "ImageToMask" and to_mask["widgets_values"] == ["red"]
    return img["widgets_values"][0], origin(wf, to_mask, "image")[0]["widgets_values"][0]


def test_world_stems_are_every_shipped_world_workflow():
    assert [s for s in shipped_stems() if s.startswith("personalize_world_")] == WORLD_STEMS


@pytest.mark.parametrize("stem", WORLD_STEMS)
def test_world_workflow_is_marked_and_uses_the_worlds_settings(stem):
    """UI format, the world checkpoint in a loader titled as the world's, a Read-me note that says so and
    how to build the file, the world's sampler defaults (euler / normal, 20 steps, cfg 5, no negative,
    128x128), Reference Encode at 128 with mask weight 3, and only shipped world inputs."""
    wf = _world(stem)
    assert_ui_format(wf, workflow_file(stem))
    assert all(n["mode"] == 0 for n in wf["nodes"])
    ckpt = node_by_type(wf, "CheckpointLoaderSimple")
    assert ckpt["widgets_values"] == [WORLD_CHECKPOINT] and WORLD in ckpt["title"]
    notes = [n for n in wf["nodes"] if n["type"] == "Note"]
    assert len(notes) == 1 and notes[0]["title"].startswith(f"Read me: {WORLD}")
    text = notes[0]["widgets_values"][0]
    assert text.startswith(WORLD) and "tools/world.py build" in text and WORLD_CHECKPOINT in text

    prompts = [n for n in wf["nodes"] if n.get("title") == "Prompt"]
    prompts = prompts or [node_by_type(wf, "PersonalizeDisentangleMixingAttention")]   # DMSA encodes its own
    assert len(prompts) == 1 and prompts[0]["widgets_values"][0] != ""
    negative = [n for n in wf["nodes"] if n.get("title", "").startswith("Negative prompt")]
    assert len(negative) == 1 and negative[0]["widgets_values"] == [""]
    assert node_by_type(wf, "EmptyLatentImage")["widgets_values"] == [128, 128, 1]
    samplers = [n for n in wf["nodes"] if n["type"] == "KSampler"]
    if samplers:
        assert samplers[0]["widgets_values"] == [42, "fixed", 20, 5.0, "euler", "normal", 1.0]
    else:
        assert node_by_type(wf, "CFGGuider")["widgets_values"] == [5.0]
        assert node_by_type(wf, "KSamplerSelect")["widgets_values"] == ["euler"]
        assert node_by_type(wf, "BasicScheduler")["widgets_values"] == ["normal", 20, 1.0]
    for enc in (n for n in wf["nodes"] if n["type"] == "PersonalizeReferenceEncode"):
        assert enc["widgets_values"] == [3.0, 0.5, False, 128]
        assert input_link(wf, enc, "vae") == (ckpt["id"], 2)
    loaded = {n["widgets_values"][0] for n in wf["nodes"] if n["type"] == "LoadImage"}
    assert loaded and all(name.startswith("personalize_world_") and name.endswith(".png") for name in loaded)
    assert loaded <= {p.name for p in SHIPPED_INPUTS.iterdir()}
    assert workflow_file(stem).with_suffix(".jpg").is_file()


def test_world_mrsa_workflow():
    """Two chained references (a subject each, masked, captioned with its full description) and a prompt
    that names only the shapes, so colour and pattern can only come from the references."""
    wf = _world("personalize_world_freecustom_multi_reference")
    ckpt = node_by_type(wf, "CheckpointLoaderSimple")
    assert node_by_title(wf, "Prompt")["widgets_values"] == ["a circle and a square"]
    mra = node_by_type(wf, "PersonalizeMultiReferenceAttention")
    assert mra["widgets_values"][:6] == ["SD1.5 FreeCustom (output 6-11)", "output:6-11", 0.0, 1.0, 1.0, 0]
    assert input_link(wf, mra, "model") == (ckpt["id"], 0)
    ks = node_by_type(wf, "KSampler")
    assert input_link(wf, ks, "model") == (mra["id"], 0)
    circle, square = (node_by_title(wf, f"Reference Encode: {s}") for s in ("circle", "square"))
    assert input_link(wf, mra, "references") == (square["id"], 0)
    assert input_link(wf, square, "references") == (circle["id"], 0)
    for enc, subject, caption in ((circle, "circle", "a teal checkered circle"),
                                  (square, "square", "an orange striped square")):
        assert _image_and_mask(wf, enc) == (_world_file(subject), _world_file(subject, mask=True))
        assert origin(wf, enc, "caption")[0]["widgets_values"] == [caption]
    assert node_by_type(wf, "SaveImage")["widgets_values"] == ["personalize_world_freecustom"]


def test_world_dmsa_workflow():
    """Structure from the green star, appearance from the purple checkered diamond, masks from files (no
    SAM), prompt "a star" with the blend word "star"."""
    wf = _world("personalize_world_freemix_structure_appearance")
    assert not any(n["type"].startswith("PersonalizeSAM") for n in wf["nodes"])
    dmsa = node_by_type(wf, "PersonalizeDisentangleMixingAttention")
    assert dmsa["widgets_values"][:3] == ["a star", "star", "SD1.5 FreeMix"]
    ckpt = node_by_type(wf, "CheckpointLoaderSimple")
    assert input_link(wf, dmsa, "model") == (ckpt["id"], 0) and input_link(wf, dmsa, "clip") == (ckpt["id"], 1)
    sampler = node_by_type(wf, "KSampler")
    # the prompt is written once: the sampler's positive is the DMSA node's encoding of it
    assert input_link(wf, sampler, "model") == (dmsa["id"], 0)
    assert input_link(wf, sampler, "positive") == (dmsa["id"], 1)
    assert [n["widgets_values"] for n in wf["nodes"] if n["type"] == "CLIPTextEncode" and "caption" not in n["title"]] \
        == [[""]]                                                     # the empty negative only
    for role, subject in (("structure", "star"), ("appearance", "diamond")):
        enc, _ = origin(wf, dmsa, role)
        assert enc["title"] == f"Reference Encode: {role} ({subject})"
        assert _image_and_mask(wf, enc) == (_world_file(subject), _world_file(subject, mask=True))
        caption = "a {} {} {}".format(*WORLD_SUBJECTS[subject])
        assert origin(wf, enc, "caption")[0]["widgets_values"] == [caption]


def test_world_mudi_workflow():
    """Two subjects composed on a 128x128 canvas (8 px margin), mean-shifted noise into
    SamplerCustomAdvanced, a prompt naming both subjects fully; no LoRA and no Detect-and-Compare (their
    models are downloads)."""
    wf = _world("personalize_world_mudi_compose")
    types = {n["type"] for n in wf["nodes"]}
    assert "LoraLoader" not in types and not any(t.startswith("PersonalizeDetectCompare") for t in types)
    assert [g["title"][:2] for g in wf["groups"]] == ["1.", "2."]
    assert node_by_title(wf, "Prompt")["widgets_values"] == ["a teal checkered circle and an orange striped square"]
    comp = node_by_type(wf, "PersonalizeSubjectComposer")
    assert comp["widgets_values"] == [128, 128, "random", 0.75, 1.0, 0.0, "white", 20, 8]
    ckpt = node_by_type(wf, "CheckpointLoaderSimple")
    noise = node_by_type(wf, "PersonalizeMeanShiftedNoise")
    assert noise["widgets_values"] == [1.0, 42, "fixed"]
    for cls in ("PersonalizeMeanShiftedNoise", "CFGGuider", "BasicScheduler"):
        assert input_link(wf, node_by_type(wf, cls), "model") == (ckpt["id"], 0)
    assert input_link(wf, noise, "masks") == (comp["id"], 1)
    assert input_link(wf, node_by_type(wf, "SamplerCustomAdvanced"), "noise") == (noise["id"], 0)
    circle, square = (node_by_title(wf, f"Subject (MuDI): {s}") for s in ("circle", "square"))
    assert input_link(wf, square, "subjects") == (circle["id"], 0)
    for subj, subject in ((circle, "circle"), (square, "square")):
        assert subj["widgets_values"] == [subject]
        assert _image_and_mask(wf, subj) == (_world_file(subject), _world_file(subject, mask=True))


def test_world_inputs_are_the_scene_generators_drawings():
    """Each shipped world input is what tools/workflows/world_inputs.py draws with world/data.py (so
    tools/make_workflows.py reproduces it): the subject alone on a pale background, its mask exactly
    where its colour is."""
    from PIL import Image
    from workflows.world_inputs import render_subject

    from personalize_pack.world import data
    for subject, (colour, pattern, shape) in WORLD_SUBJECTS.items():
        image, mask = render_subject(subject)
        with Image.open(SHIPPED_INPUTS / _world_file(subject)) as im:
            assert im.mode == "RGB" and im.size == (128, 128)
            assert np.array_equal(np.asarray(im), image)
        with Image.open(SHIPPED_INPUTS / _world_file(subject, mask=True)) as im:
            assert im.mode == "L"
            assert np.array_equal(np.asarray(im) > 127, mask)
        base = np.array(data.COLOURS[colour], np.uint8)
        assert (image[mask] == base).all(axis=-1).any() and not (image[~mask] == base).all(axis=-1).any()
        assert 34 ** 2 / 4 < mask.sum() < 50 ** 2                        # one object of the world's size


# --- the templates as the frontend lists them, and their model files ----------------------------------------

# The model folder each loader lists (ComfyUI's folder names; the frontend's missing-models panel files a
# model under it): node type -> [(widget index, folder)]
LOADER_FOLDERS = {
    "CheckpointLoaderSimple": [(0, "checkpoints")], "UNETLoader": [(0, "diffusion_models")],
    "DualCLIPLoader": [(0, "text_encoders"), (1, "text_encoders")], "CLIPLoader": [(0, "text_encoders")],
    "VAELoader": [(0, "vae")], "CLIPVisionLoader": [(0, "clip_vision")], "PhotoMakerLoader": [(0, "photomaker")],
    "LoraLoader": [(0, "loras")], "PersonalizeSAMModelLoader": [(0, "sams")],
    "PersonalizeMIPAdapterLoader": [(0, "ipadapter")],
}
# the extensions frontend 1.49.6 treats as model files (its missing-model scan)
MODEL_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft", ".onnx", ".gguf")
# files the user makes: the world checkpoint (tools/world.py build) and trained LoRAs: no download link
USER_MADE = {"personalize_world.safetensors", "mudi_segmix_lora_cat_dog.safetensors", "mudi_cat_dog.safetensors"}
README = (WORKFLOWS.parent / "README.md").read_text(encoding="utf-8")


def _shipped(stem):
    return json.loads(workflow_file(stem).read_text(encoding="utf-8"))


def test_template_files_are_titled_for_people():
    """Frontend 1.49.6 titles a pack's template card with the file name: each shipped workflow's file is a
    short human title (no underscores, no characters Windows refuses) with its thumbnail beside it, and
    nothing else in workflows/ would show up as a template (ComfyUI lists every workflows/*.json)."""
    stems = shipped_stems()
    assert len(stems) == 12 and len(set(stems)) == 12
    for stem in stems:
        path = workflow_file(stem)
        title = path.stem
        # the card shows about 32 characters of the title on one line
        assert "_" not in title and not set('<>:"/\\|?*') & set(title) and 10 <= len(title) <= 32, title
        assert path.with_suffix(".jpg").is_file()
        assert title in README, f"README does not list the template {title!r}"
    assert sorted(p.name for p in WORKFLOWS.iterdir() if p.is_file()) == sorted(
        n for s in stems for n in (workflow_file(s).name, workflow_file(s).with_suffix(".jpg").name))


@pytest.mark.parametrize("stem", shipped_stems())
def test_every_model_file_has_download_metadata(stem):
    """Every widget value that names a model file carries a ``properties.models`` entry on its node (the
    frontend's missing-models panel): the same name, the loader's folder, a Hugging Face ``resolve`` link
    whose repository the README names (none only for a file the user makes); the workflow's top-level
    ``models`` lists them all once."""
    wf = _shipped(stem)
    described = []
    for node in wf["nodes"]:
        entries = node.get("properties", {}).get("models", [])
        by_name = {e["name"]: e for e in entries}
        files = [(i, v) for i, v in enumerate(node["widgets_values"])
                 if isinstance(v, str) and v.lower().endswith(MODEL_EXTENSIONS)]
        if files:
            assert node["type"] in LOADER_FOLDERS, f"{node['type']} loads {files}: give it a folder"
        assert sorted(by_name) == sorted(v for _, v in files), (node["type"], entries, files)
        for index, folder in LOADER_FOLDERS.get(node["type"], []):
            entry = by_name[node["widgets_values"][index]]
            assert entry["directory"] == folder, (node["type"], entry)
            if entry["name"] in USER_MADE:
                assert "url" not in entry
                continue
            url = entry["url"]
            assert url.startswith("https://huggingface.co/") and "/resolve/main/" in url, url
            repo = "/".join(url.split("/")[3:5])
            assert repo in README, f"{entry['name']}: README does not name {repo}"
            assert entry["name"] in README, f"README's model table lacks {entry['name']}"
            described.append(entry)
        described += [e for e in entries if e["name"] in USER_MADE]
    unique = []
    for e in described:
        if e not in unique:
            unique.append(e)
    assert sorted(map(json.dumps, wf["models"])) == sorted(map(json.dumps, unique))
