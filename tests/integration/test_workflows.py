"""Every shipped example workflow (workflows/*.json) runs headless in a real ComfyUI, through
tools/run_workflow.py, on the tiny random models at 64-128 px and 2-3 steps.

One parametrised test runs them all; what differs per workflow is data (``CASES``): the overrides that
swap the real model files for tiny ones and shrink the run, the example inputs it copies, the images it
saves, a ``prepare`` step (tiny model files, stand-ins for ComfyUI loaders that only know the real towers,
checks of the converted prompt) and a ``check`` step with the example's own assertions on the run
(further runs of the same graph included). Tests of other behaviour of the examples follow below it."""
from __future__ import annotations

import copy
import json
import shutil
import sys
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pytest
import torch
from workflow_helpers import (WORKFLOWS, api_by_title, api_by_type, images_of, node_by_type, rgb, saved_images,
                              shipped_stems, workflow_file)

import run_workflow as rw
from pack_paths import comfyui_root
from tiny_models import TINY_SD15
from ui_to_api import WorkflowError, ui_to_api

ROOT = comfyui_root()

CAT_DOG = ["personalize_cat_04.jpg", "personalize_cat_04_mask.jpg", "personalize_dog6_02.jpg",
           "personalize_dog6_02_mask.jpg"]
MUDI_SIZE = 128      # the smallest square canvas on which two subjects fit with the composer's 32 px margin
MUDI_TRAIN_LORA = "mudi_cat_dog.safetensors"
TRAIN_TITLES = ("Loss curve", "Validation images", "Training report")
DC_NODES = ("PersonalizeDetectCompareLoader", "PersonalizeDetectCompareSubject", "PersonalizeDetectCompare")
FLUX_SINGLE = "FLUX dev/schnell: single blocks"
TINY_FLUX, TINY_FLUX_VAE = "tiny_flux_workflow.safetensors", "tiny_flux_workflow_ae.safetensors"
SAM_FILE = "sam_vit_b_01ec64.pth"      # the name the FreeMix example uses; holds the tiny SAM here
WORLD_CIRCLE_SQUARE = [f"personalize_world_{s}{m}.png" for s in ("teal_checkered_circle", "orange_striped_square")
                       for m in ("", "_mask")]
WORLD_STAR_DIAMOND = [f"personalize_world_{s}{m}.png" for s in ("green_plain_star", "purple_checkered_diamond")
                      for m in ("", "_mask")]


@dataclass
class Run:
    """One headless run of a shipped workflow, as ``prepare`` sets it up and ``check`` sees it."""
    wf: dict
    models_dir: object
    tmp_path: object
    request: object
    monkeypatch: object
    state: dict = field(default_factory=dict)     # what prepare hands to check (spies, ids)
    outputs: dict = field(default_factory=dict)
    lines: list = field(default_factory=list)     # the runner's log

    @property
    def out_dir(self):
        return self.tmp_path / "out"

    @property
    def in_dir(self):
        return self.tmp_path / "in"

    def saved_paths(self):
        return [self.out_dir / item.get("subfolder", "") / item["filename"] for item in saved_images(self.outputs)]

    def run_again(self, wf, tag, overrides, out_dir=None):
        """Run another version of the workflow in the same input folder; returns the history outputs."""
        path = self.tmp_path / f"{tag}.json"
        path.write_text(json.dumps(wf), encoding="utf-8")
        return rw.run_workflow(path, ROOT, output_dir=out_dir or self.tmp_path / f"out_{tag}",
                               models_dir=self.models_dir, input_dir=self.in_dir, overrides=overrides,
                               log=lambda msg: None)


@dataclass
class Case:
    overrides: dict
    inputs: list                    # the shipped example images copied into the input folder
    saved: list                     # the Save Image filename prefixes, sorted
    size: int                       # the saved images' width and height
    prepare: Callable | None = None  # (Run) -> None: tiny models, stand-ins, checks of the converted prompt
    check: Callable | None = None    # (Run, images) -> None: the example's own assertions on the run


# --- per-workflow set-up and checks ------------------------------------------------------------------

def _live_prompt(wf):
    return ui_to_api(wf, rw.live_schemas({n["type"] for n in wf["nodes"]}))


def _prepare_freemix(run):
    """A models folder of its own: the tiny SD1.5 checkpoint and the tiny SAM under the workflow's SAM name."""
    pytest.importorskip("segment_anything", reason="SAM Mask needs segment_anything (pip install segment-anything "
                                                   "torchvision)")
    from tiny_sam import save_tiny_sam
    models = run.tmp_path / "models"
    (models / "checkpoints").mkdir(parents=True)
    tiny_sd15 = run.models_dir / "checkpoints" / TINY_SD15
    try:
        (models / "checkpoints" / TINY_SD15).symlink_to(tiny_sd15)
    except OSError:
        shutil.copyfile(tiny_sd15, models / "checkpoints" / TINY_SD15)
    save_tiny_sam(models / "sams" / SAM_FILE)
    run.models_dir = models


def _check_freemix(run, images):
    assert sum("PersonalizeSAMMask" in line for line in run.lines) == 2


def _prepare_mip(run):
    """A random MIP-Adapter of the tiny SD1.5's shape and a tiny CLIP vision model. ComfyUI's CLIP vision
    loader only recognises the real towers (the smallest is a 300M-parameter ViT-L), so it is pointed at
    the tiny model for the tiny file; everything else runs as a user's graph does."""
    import comfy.clip_vision
    import comfy.utils
    from safetensors.torch import save_file
    from tiny_adapters import adapter_state, save_adapter
    from tiny_models import TINY_CLIP_VISION, build_clip_vision

    sd15 = run.request.getfixturevalue("sd15")
    save_adapter(run.models_dir / "ipadapter" / "tiny_mip_plus.safetensors", adapter_state(sd15[0], "mip_plus"))
    tiny = build_clip_vision()
    cv_path = run.models_dir / "clip_vision" / "tiny_clip_vision.safetensors"
    cv_path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tiny.get_sd().items()}, str(cv_path))
    real_load = comfy.clip_vision.load

    def load(path):
        if str(path).endswith("tiny_clip_vision.safetensors"):
            cv = comfy.clip_vision.ClipVisionModel(dict(TINY_CLIP_VISION))
            cv.load_sd(comfy.utils.load_torch_file(str(path)))
            return cv
        return real_load(path)
    run.monkeypatch.setattr(comfy.clip_vision, "load", load)


def _check_mip(run, images):
    assert np.abs(images[0] - images[1]).max() > 1.0          # different prompts and references, different images


def _prepare_freecure(run):
    """A tiny PhotoMaker ID encoder (ComfyUI's own class at a tiny width, tests/tiny_models.py) replaces the
    ViT-L one; the overrides put the SD1.x FreeCure blocks in place of the SDXL ones and, since a random
    model draws no face, tell Face Attribute Mask to give an empty mask instead of stopping."""
    pytest.importorskip("mediapipe", reason="Face Attribute Mask needs mediapipe (tools/run_tests.sh installs it)")
    import nodes
    from tiny_models import build_photomaker, tiny_photomaker_class

    build_photomaker(run.models_dir / "photomaker" / "tiny_photomaker.safetensors")
    pm = sys.modules[nodes.NODE_CLASS_MAPPINGS["PhotoMakerLoader"].__module__]   # as ComfyUI loaded it
    run.monkeypatch.setattr(pm, "PhotoMakerIDEncoder", tiny_photomaker_class(pm))


def _prepare_mudi(run):
    """Tiny random OWLv2 and DreamSim models for Detect-and-Compare, a fresh temp folder for the previews;
    the bypassed LoraLoader is dropped and the checkpoint's MODEL and CLIP pass through it."""
    run.request.getfixturevalue("dc_eval_dir")
    run.state["temp_dir"] = run.request.getfixturevalue("temp_dir")
    wf = run.wf
    prompt = _live_prompt(wf)
    ckpt = str(node_by_type(wf, "CheckpointLoaderSimple")["id"])
    assert all(n["class_type"] != "LoraLoader" for n in prompt.values())
    for cls in ("CFGGuider", "BasicScheduler", "PersonalizeMeanShiftedNoise"):
        assert api_by_type(prompt, cls)["inputs"]["model"] == [ckpt, 0]
    assert api_by_title(prompt, "Prompt")["inputs"]["clip"] == [ckpt, 1]
    assert api_by_type(prompt, "PersonalizeMeanShiftedNoise")["inputs"]["gamma"] == 1.0      # the node's default


def _check_mudi(run, images):
    """The collage preview holds both subjects where the composer's masks say, the score's annotated
    preview carries its caption and the report names both subjects."""
    import folder_paths
    import nodes
    wf, outputs, temp_dir = run.wf, run.outputs, run.state["temp_dir"]
    ids = {n.get("title") or n["type"]: n["id"] for n in wf["nodes"]}
    image = images[0]

    # the collage preview is the composer's image at the workflow's layout seed, with both subjects in it
    (shown,) = images_of(outputs, ids["Composed subjects (preview)"], "temp")
    collage = rgb(temp_dir / shown.get("subfolder", "") / shown["filename"])
    comp_values = node_by_type(wf, "PersonalizeSubjectComposer")["widgets_values"]
    run.monkeypatch.setattr(folder_paths, "input_directory", str(run.in_dir))
    load = nodes.NODE_CLASS_MAPPINGS["LoadImage"]().load_image           # decoded as the workflow decodes them
    subject, composer = (nodes.NODE_CLASS_MAPPINGS[k] for k in ("PersonalizeSubject", "PersonalizeSubjectComposer"))
    chain = None
    for name, photo, mask in (("cat", *CAT_DOG[:2]), ("dog", *CAT_DOG[2:])):
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
    (ann,) = images_of(outputs, ids["Annotated (score in the caption)"], "temp")
    annotated = rgb(temp_dir / ann.get("subfolder", "") / ann["filename"])
    assert annotated.shape == image.shape and np.abs(annotated - image).max() > 0
    report = outputs[str(ids["D&C report"])]["text"][0]
    assert report.startswith("D&C ") and "2 subjects (cat, dog), threshold 0.4" in report


def _lora_link_type_ok() -> bool:
    """Whether ComfyUI's validation accepts the training node's lora_name output in core LoraLoader's
    lora_name input (the check execution.validate_inputs makes for every linked input)."""
    import nodes
    from comfy_execution.validation import validate_node_input
    received = nodes.NODE_CLASS_MAPPINGS["PersonalizeTrainSegMixLoRA"].RETURN_TYPES[0]
    return validate_node_input(received, nodes.LoraLoader.INPUT_TYPES()["required"]["lora_name"][0])


def _prepare_mudi_train(run):
    """A fresh models/loras and temp folder; Load LoRA's lora_name is the training node's first output
    (not the saved value), and a spy records what Load LoRA receives."""
    import folder_paths
    import nodes
    run.state["loras_dir"] = run.request.getfixturevalue("loras_dir")
    run.state["temp_dir"] = run.request.getfixturevalue("temp_dir")
    wf = run.wf
    train_id, lora_id = (str(node_by_type(wf, t)["id"]) for t in ("PersonalizeTrainSegMixLoRA", "LoraLoader"))
    ckpt = str(node_by_type(wf, "CheckpointLoaderSimple")["id"])
    prompt = _live_prompt(wf)
    assert prompt[lora_id]["inputs"] == {"lora_name": [train_id, 0], "strength_model": 1.0, "strength_clip": 1.0,
                                         "model": [ckpt, 0], "clip": [ckpt, 1]}
    assert prompt[train_id]["inputs"]["output_name"] == "mudi_cat_dog"

    assert _lora_link_type_ok()
    received = run.state["received"] = []
    real_load_lora = nodes.LoraLoader.load_lora

    def spy(self, model, clip, lora_name, strength_model, strength_clip):
        received.append((lora_name, strength_model, strength_clip, folder_paths.get_full_path("loras", lora_name)))
        return real_load_lora(self, model, clip, lora_name, strength_model, strength_clip)
    run.monkeypatch.setattr(nodes.LoraLoader, "load_lora", spy)


def _check_mudi_train(run, images):
    """2 training steps at 64 px in the training child, a validation image after the second, then core's
    Load LoRA with the new file: the LoRA lands in the (temporary) models/loras, Load LoRA receives exactly
    its name, and the picture differs from the same graph without the LoRA."""
    wf, outputs = run.wf, run.outputs
    loras_dir, temp_dir, received = run.state["loras_dir"], run.state["temp_dir"], run.state["received"]
    ids = {n.get("title") or n["type"]: n["id"] for n in wf["nodes"]}

    # the LoRA is in the temporary models/loras, and Load LoRA got exactly that file
    assert sorted(p.name for p in loras_dir.iterdir()) == [MUDI_TRAIN_LORA]
    assert received == [(MUDI_TRAIN_LORA, 1.0, 1.0, str(loras_dir / MUDI_TRAIN_LORA))]
    # the training's job folder went to the (temporary) output folder, with its validation image
    job = run.out_dir / "personalize_training" / "segmix_lora" / "mudi_cat_dog"
    assert [p.name for p in job.glob("preview_*.png")] == ["preview_000002.png"]

    # the training previews: the loss curve, the validation image at the training size, the report
    (curve,) = images_of(outputs, ids["Loss curve"], "temp")
    assert rgb(temp_dir / curve.get("subfolder", "") / curve["filename"]).std() > 1.0
    (shown,) = images_of(outputs, ids["Validation images"], "temp")
    validation = rgb(temp_dir / shown.get("subfolder", "") / shown["filename"])
    assert validation.shape == (64, 64, 3) and validation.std() > 1.0
    report = outputs[str(ids["Training report"])]["text"][0]
    assert report.startswith("Seg-Mix LoRA: ") and MUDI_TRAIN_LORA in report and "2 steps" in report

    # the same graph without the LoRA (Load LoRA bypassed; the training and its previews muted, no second
    # training run): the same seed and prompt give another picture, so the trained LoRA changes it
    with_lora = images[0]
    plain = copy.deepcopy(wf)
    for n in plain["nodes"]:
        if n["type"] == "LoraLoader":
            n["mode"] = 4
        elif n["type"] in ("PersonalizeTrainSegMixLoRA", "PersonalizeSegMixDataset", "LoadImage", "ImageToMask") \
                or n.get("title") in TRAIN_TITLES:
            n["mode"] = 2
    outputs = run.run_again(plain, "plain", {k: v for k, v in CASES[run.state["stem"]].overrides.items()
                                             if not k.startswith("PersonalizeTrainSegMixLoRA.")})
    assert len(received) == 1                                             # Load LoRA did not run
    (item,) = saved_images(outputs)
    without = rgb(run.tmp_path / "out_plain" / item.get("subfolder", "") / item["filename"])
    assert without.shape == with_lora.shape and without.std() > 1.0
    diff = np.abs(with_lora - without)
    assert diff.max() > 8.0 and diff.mean() > 0.5, (diff.max(), diff.mean())


def _with_tiny_clip(wf, loader="DualCLIPLoader"):
    """A workflow with its text encoders swapped for ones a test can build.

    No tiny T5-XXL (or Qwen3, Qwen2.5-VL) exists, so the ``loader`` node (DualCLIPLoader, CLIPLoader)
    becomes a Load Checkpoint of the tiny SD1.5 checkpoint (same node id, so every link stays): its CLIP
    output (slot 1) feeds the links the loader's CLIP fed (prompt, negative prompt, captions); its MODEL and
    VAE stay unconnected. The tiny models take 768-wide text (and pooled) vectors, the SD1 CLIP's width."""
    wf = copy.deepcopy(wf)
    dual = node_by_type(wf, loader)
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


def _pack_module(name):
    """A module of the pack as ComfyUI loaded it (not the test import under personalize_pack)."""
    import importlib

    import nodes
    package = sys.modules[nodes.NODE_CLASS_MAPPINGS["PersonalizeMultiReferenceAttention"].__module__].__package__
    return importlib.import_module(f"{package.rsplit('.', 1)[0]}.{name}")


def _prepare_flux(run):
    """A tiny random FLUX dev (2 double, 2 single blocks, guidance embedding) and a 16-channel VAE, the tiny
    SD1.5 CLIP in place of CLIP-L + T5-XXL (``_with_tiny_clip``), and a spy on the blocks that hand their
    joint attention to the pack."""
    from tiny_flux import build_flux, build_flux_vae
    if not (run.models_dir / "diffusion_models" / TINY_FLUX).is_file():
        build_flux(run.models_dir / "diffusion_models" / TINY_FLUX, heads=2, depth=2, single=2, guidance=True)
    if not (run.models_dir / "vae" / TINY_FLUX_VAE).is_file():
        build_flux_vae(run.models_dir / "vae" / TINY_FLUX_VAE)
    run.wf = wf = _with_tiny_clip(run.wf)

    # the converted prompt: the loaders' values and links as the workflow gives them
    prompt = _live_prompt(wf)
    mra = api_by_type(prompt, "PersonalizeMultiReferenceAttention")["inputs"]
    assert (mra["layers"], mra["reference_positions"]) == (FLUX_SINGLE, "shifted (side by side)")
    assert api_by_type(prompt, "FluxGuidance")["inputs"]["guidance"] == 3.5

    # which FLUX blocks hand their joint attention to the pack (its override, in the pack ComfyUI loaded)
    dit = _pack_module("attention.dit_blocks")
    patched = run.state["patched"] = []
    real_call = dit.JointAttention.__call__

    def spy(self, func, *args, **kwargs):
        patched.append(self.key)
        return real_call(self, func, *args, **kwargs)
    run.monkeypatch.setattr(dit.JointAttention, "__call__", spy)


def _check_flux(run, images):
    """The patched attention acts in the single blocks only (the preset), and both the references (the
    node bypassed) and their positions (aligned instead of side by side) change the picture."""
    image, patched, overrides = images[0], run.state["patched"], CASES[run.state["stem"]].overrides
    assert set(patched) == {("single_block", 0), ("single_block", 1)}     # the preset: single blocks only
    calls = len(patched)

    def picture(outputs, tag):
        (item,) = saved_images(outputs)
        assert item["filename"].startswith("personalize_freecustom_flux")
        return rgb(run.tmp_path / f"out_{tag}" / item.get("subfolder", "") / item["filename"])

    # the same graph with Multi-Reference Attention bypassed (MODEL passes through): another picture
    plain = copy.deepcopy(run.wf)
    node_by_type(plain, "PersonalizeMultiReferenceAttention")["mode"] = 4
    without = picture(run.run_again(plain, "plain", overrides), "plain")
    assert len(patched) == calls                                          # nothing patched without the node
    # A run is deterministic (the same graph twice gives the same bits: SDPA on the CPU, comfy_host), so
    # every difference comes from the references. Two steps of a random 2+2-block FLUX move the 8-bit
    # picture by a little, but over much of it (measured: mean 0.86, 59 % of the values).
    diff = np.abs(image - without)
    assert without.std() > 1.0 and diff.mean() > 0.3 and (diff > 0).mean() > 0.3, (diff.max(), diff.mean())

    # the references' positions matter: on the image's grid (aligned) the reference keys turn by other
    # RoPE angles than beside it, so the picture changes (measured: 13 % of the values, by one level)
    aligned = picture(run.run_again(run.wf, "aligned", dict(
        overrides, **{"PersonalizeMultiReferenceAttention.reference_positions": "aligned"})), "aligned")
    diff = np.abs(image - aligned)
    assert (diff > 0).mean() > 0.05, (diff.max(), diff.mean())


TINY_FLUX2, TINY_FLUX2_VAE = "tiny_flux2_workflow.safetensors", "tiny_flux2_workflow_vae.safetensors"
TINY_QWEN, TINY_WAN_VAE = "tiny_qwen_edit_workflow.safetensors", "tiny_wan_workflow_vae.safetensors"
REGIONS = ["personalize_region_left.png", "personalize_region_right.png"]


def _spy_controls(run):
    """Count the grouped (controlled) attention calls of Native Reference Control, in the pack ComfyUI loaded."""
    native = _pack_module("attention.native_refs")
    calls = run.state["controlled"] = []
    real = native.controlled_attention

    def spy(attend, q, k, v, call_plan, mask=None):
        calls.append((q.shape[2], k.shape[2], len(call_plan.groups)))
        return real(attend, q, k, v, call_plan, mask)
    run.monkeypatch.setattr(native, "controlled_attention", spy)


def _prepare_native_flux2(run):
    """A tiny random FLUX.2 (2+2 blocks, 768-wide text) and a tiny FLUX.2 VAE (128-channel latents at 1/16),
    the tiny SD1.5 CLIP in place of Qwen3-4B (``_with_tiny_clip``), a spy on the controlled attention."""
    from tiny_native import build_flux2, build_flux2_vae
    if not (run.models_dir / "diffusion_models" / TINY_FLUX2).is_file():
        build_flux2(run.models_dir / "diffusion_models" / TINY_FLUX2, depth=2, single=2, text=768, seed=17)
    if not (run.models_dir / "vae" / TINY_FLUX2_VAE).is_file():
        build_flux2_vae(run.models_dir / "vae" / TINY_FLUX2_VAE)
    run.wf = _with_tiny_clip(run.wf, "CLIPLoader")
    prompt = _live_prompt(run.wf)
    natives = [n["inputs"] for n in prompt.values() if n["class_type"] == "PersonalizeNativeReference"]
    assert sorted(n["weight"] for n in natives) == [1.0, 1.2]
    assert all({"subject_mask", "target_region"} <= set(n) for n in natives)
    _spy_controls(run)
    run.state["blocks"] = 4           # 2 double + 2 single blocks, cfg 1 (no uncond pass)


def _prepare_native_qwen(run):
    """Qwen-Image-Edit's loaders only know the 20B model's widths, so Load Diffusion Model is pointed at a
    tiny Qwen-Image built in-process (768-wide text) for the tiny file's name (a placeholder file, so that the
    name validates); a tiny Wan 2.1-layout VAE; the tiny SD1.5 CLIP in place of Qwen2.5-VL (it reads the
    prompt's text and ignores the pictures); a spy on the controlled attention."""
    import comfy.sd
    from safetensors.torch import save_file
    from tiny_native import build_qwen, build_wan_vae
    placeholder = run.models_dir / "diffusion_models" / TINY_QWEN
    if not placeholder.is_file():
        placeholder.parent.mkdir(parents=True, exist_ok=True)
        save_file({"placeholder": torch.zeros(1)}, str(placeholder))
    if not (run.models_dir / "vae" / TINY_WAN_VAE).is_file():
        build_wan_vae(run.models_dir / "vae" / TINY_WAN_VAE)
    real_load = comfy.sd.load_diffusion_model

    def load(path, *args, **kwargs):
        if str(path).endswith(TINY_QWEN):
            return build_qwen(heads=2, depth=2, seed=18, text=768)
        return real_load(path, *args, **kwargs)
    run.monkeypatch.setattr(comfy.sd, "load_diffusion_model", load)
    run.wf = _with_tiny_clip(run.wf, "CLIPLoader")
    _spy_controls(run)
    run.state["blocks"] = 4           # 2 blocks x (cond, uncond): at cfg 2.5 ComfyUI runs the two in calls of their own


def _check_native(run, images):
    """The controls act in every block of every model call of the 2 steps, with several query groups (two regions), and
    bypassing Native Reference Control (the MODEL passes through) gives another picture. Two steps of a tiny
    random model move the 8-bit picture by little (Qwen: one level), so the picture check is "not the same"."""
    calls = run.state["controlled"]
    assert len(calls) == 2 * run.state["blocks"] and all(groups >= 2 for _, _, groups in calls)
    overrides = CASES[run.state["stem"]].overrides
    plain = copy.deepcopy(run.wf)
    node_by_type(plain, "PersonalizeNativeReferenceControl")["mode"] = 4
    n = len(calls)
    (item,) = saved_images(run.run_again(plain, "plain", overrides))
    assert len(calls) == n                                                # nothing controlled without the node
    without = rgb(run.tmp_path / "out_plain" / item.get("subfolder", "") / item["filename"])
    assert np.abs(images[0] - without).max() >= 1.0


def _prepare_world(run):
    """The world examples run as shipped (128 px, 20 steps) on the world checkpoint that
    ``world.checkpoint.build`` makes from the world's weights (the ``world_models_dir`` fixture skips,
    saying why, without them), in place of the tiny random models."""
    run.models_dir = run.request.getfixturevalue("world_models_dir")
    run.state["temp_dir"] = run.request.getfixturevalue("temp_dir")      # MuDI's collage preview


SD15_64 = {"CheckpointLoaderSimple.ckpt_name": TINY_SD15, "EmptyLatentImage.width": 64,
           "EmptyLatentImage.height": 64, "KSampler.steps": 2}
MUDI_OVERRIDES = {"CheckpointLoaderSimple.ckpt_name": TINY_SD15,
                  "PersonalizeSubjectComposer.width": MUDI_SIZE, "PersonalizeSubjectComposer.height": MUDI_SIZE,
                  "EmptyLatentImage.width": MUDI_SIZE, "EmptyLatentImage.height": MUDI_SIZE,
                  "BasicScheduler.steps": 2}

CASES = {
    "personalize_freecustom_multi_reference": Case(
        SD15_64, CAT_DOG, ["personalize_freecustom"], 64),
    "personalize_freemix_structure_appearance": Case(
        dict(SD15_64, **{"KSampler.steps": 3, "PersonalizeReferenceEncode.resolution": 64}),
        ["personalize_cat_04.jpg", "personalize_dog6_02.jpg"], ["personalize_freemix"], 64,
        prepare=_prepare_freemix, check=_check_freemix),
    "personalize_mip_adapter_multi_object": Case(
        dict(SD15_64, **{"PersonalizeMIPAdapterLoader.adapter_name": "tiny_mip_plus.safetensors",
                         "CLIPVisionLoader.clip_name": "tiny_clip_vision.safetensors"}),
        [f"personalize_mip_{i}_{n}.jpg" for i, ns in ((1, ("cat", "jacket")), (2, ("cat", "dice")),
                                                      (3, ("barn", "dog"))) for n in ns],
        [f"personalize_mip_{k}" for k in (1, 2, 3)], 64, prepare=_prepare_mip, check=_check_mip),
    "personalize_freecure_photomaker": Case(
        dict(SD15_64, **{"PhotoMakerLoader.photomaker_model_name": "tiny_photomaker.safetensors",
                         "PersonalizeFoundationAwareAttention.layers": "SD1.5 FreeCure (output 6-11)",
                         "PersonalizeFaceAttributeMask.if_no_face": "empty mask"}),
        ["personalize_astronaut.jpg"], ["personalize_freecure", "personalize_freecure_foundation"], 64,
        prepare=_prepare_freecure),
    "personalize_mudi_compose_and_score": Case(
        MUDI_OVERRIDES, CAT_DOG, ["personalize_mudi"], MUDI_SIZE, prepare=_prepare_mudi, check=_check_mudi),
    "personalize_mudi_train_segmix_lora": Case(
        dict(SD15_64, **{
            # two AdamW steps at MuDI's 1e-4 move the LoRA too little to show in an 8-bit picture
            "PersonalizeTrainSegMixLoRA.steps": 2, "PersonalizeTrainSegMixLoRA.learning_rate": 1e-2,
            "PersonalizeTrainSegMixLoRA.resolution": 64, "PersonalizeTrainSegMixLoRA.validate_every": 2,
            "PersonalizeTrainSegMixLoRA.checkpoint_every": 1}),
        CAT_DOG, ["personalize_mudi_lora"], 64, prepare=_prepare_mudi_train, check=_check_mudi_train),
    "personalize_freecustom_flux": Case(
        {"UNETLoader.unet_name": TINY_FLUX, "VAELoader.vae_name": TINY_FLUX_VAE,
         "EmptySD3LatentImage.width": 64, "EmptySD3LatentImage.height": 64,
         "PersonalizeReferenceEncode.resolution": 64, "KSampler.steps": 2},
        CAT_DOG, ["personalize_freecustom_flux"], 64, prepare=_prepare_flux, check=_check_flux),
    "personalize_native_flux2_klein": Case(
        {"UNETLoader.unet_name": TINY_FLUX2, "VAELoader.vae_name": TINY_FLUX2_VAE, "EmptyFlux2LatentImage.width": 64,
         "EmptyFlux2LatentImage.height": 64, "ImageScaleToTotalPixels.megapixels": 0.01, "KSampler.steps": 2},
        CAT_DOG + REGIONS, ["personalize_native_flux2"], 64, prepare=_prepare_native_flux2, check=_check_native),
    "personalize_native_qwen_edit_two_people": Case(
        {"UNETLoader.unet_name": TINY_QWEN, "VAELoader.vae_name": TINY_WAN_VAE, "EmptySD3LatentImage.width": 64,
         "EmptySD3LatentImage.height": 64, "KSampler.steps": 2},
        ["personalize_astronaut.jpg", "personalize_cameraman.jpg"] + REGIONS, ["personalize_native_qwen_edit"], 64,
        prepare=_prepare_native_qwen, check=_check_native),
    "personalize_world_freecustom_multi_reference": Case(
        {}, WORLD_CIRCLE_SQUARE, ["personalize_world_freecustom"], 128, prepare=_prepare_world),
    "personalize_world_freemix_structure_appearance": Case(
        {}, WORLD_STAR_DIAMOND, ["personalize_world_freemix"], 128, prepare=_prepare_world),
    "personalize_world_mudi_compose": Case(
        {}, WORLD_CIRCLE_SQUARE, ["personalize_world_mudi"], 128, prepare=_prepare_world),
}
SHIPPED = shipped_stems()


# --- fixtures ------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_models_dir(tiny_sd15_path):
    """The shared tiny SD1.5 checkpoint's models folder (conftest builds it once per session)."""
    import comfy_host
    comfy_host.init_nodes_with_pack()
    return tiny_sd15_path.parents[1]


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


# --- every shipped workflow runs headless -------------------------------------------------------------

@pytest.mark.parametrize("stem", SHIPPED)
def test_shipped_workflow_runs_headless(stem, tiny_models_dir, tmp_path, request, monkeypatch):
    """The workflow as shipped, with only its model files and sizes overridden: the example inputs are
    copied into the input folder, every Save Image writes its picture at the run's size with the workflow
    embedded (reloadable in the editor), not flat; then the example's own checks."""
    from PIL import Image

    assert stem in CASES, f"{workflow_file(stem).name} ({stem}) has no tiny set-up in CASES"
    case = CASES[stem]
    run = Run(json.loads(workflow_file(stem).read_text(encoding="utf-8")), tiny_models_dir, tmp_path,
              request, monkeypatch, state={"stem": stem})
    if case.prepare:
        case.prepare(run)
    path = tmp_path / f"{stem}.json"
    path.write_text(json.dumps(run.wf), encoding="utf-8")
    run.outputs = rw.run_workflow(path, ROOT, output_dir=run.out_dir, models_dir=run.models_dir,
                                  input_dir=run.in_dir, overrides=case.overrides, log=run.lines.append)

    assert sorted(p.name for p in run.in_dir.iterdir()) == sorted(case.inputs)
    paths = sorted(run.saved_paths(), key=lambda p: p.name)
    assert [p.name.rsplit("_", 2)[0] for p in paths] == case.saved
    images = []
    for p in paths:
        with Image.open(p) as im:
            assert im.size == (case.size, case.size)
            assert "workflow" in im.info                                   # reloadable in the editor
        images.append(rgb(p))
    assert all(np.isfinite(a).all() and a.std() > 1.0 for a in images)
    if case.check:
        case.check(run, images)


# --- more of the examples' behaviour ------------------------------------------------------------------

def test_run_workflow_reports_validation_errors(tiny_models_dir, tmp_path):
    with pytest.raises(WorkflowError, match="validation failed"):
        rw.run_workflow(workflow_file("personalize_freecustom_multi_reference"), ROOT,
                        output_dir=tmp_path / "out", models_dir=tiny_models_dir, input_dir=tmp_path / "in",
                        overrides={"CheckpointLoaderSimple.ckpt_name": "missing.safetensors"})


def test_mudi_gamma_zero_equals_random_noise(tiny_models_dir, temp_dir, tmp_path):
    """Mean-Shifted Noise with gamma 0 gives the image of the same workflow with core's RandomNoise of the
    same seed in its place, bit for bit; the default gamma (1) gives another image. The score nodes are
    muted here (they only read the image)."""
    wf = json.loads(workflow_file("personalize_mudi_compose_and_score").read_text(encoding="utf-8"))
    for n in wf["nodes"]:
        if n["type"] in DC_NODES or n.get("title") in ("Annotated (score in the caption)", "D&C report"):
            n["mode"] = 2

    def run(graph, tag, overrides=None):
        path = tmp_path / f"{tag}.json"
        path.write_text(json.dumps(graph), encoding="utf-8")
        out_dir = tmp_path / f"out_{tag}"
        outputs = rw.run_workflow(path, ROOT, output_dir=out_dir, models_dir=tiny_models_dir,
                                  input_dir=tmp_path / "in", overrides=dict(MUDI_OVERRIDES, **(overrides or {})),
                                  log=lambda msg: None)
        saved = saved_images(outputs)
        assert len(saved) == 1 and saved[0]["filename"].startswith("personalize_mudi")
        return out_dir / saved[0].get("subfolder", "") / saved[0]["filename"]

    shifted = run(wf, "gamma1")
    zero = run(wf, "gamma0", {"PersonalizeMeanShiftedNoise.gamma": 0.0})

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
    random_noise = run(plain, "random")

    a, b = rgb(zero), rgb(random_noise)
    assert a.std() > 1.0
    np.testing.assert_array_equal(a, b)
    assert np.abs(rgb(shifted) - a).max() > 1.0


def test_mudi_train_lora_name_link_passes_validation(tiny_models_dir, loras_dir):
    """Core LoraLoader declares lora_name with the file list as its type; the training node's first
    return type is that live list, so ComfyUI's validation accepts the link, also for a file written
    after the node was loaded."""
    assert _lora_link_type_ok()
    (loras_dir / "written_later.safetensors").write_bytes(b"")
    import folder_paths
    folder_paths.filename_list_cache.pop("loras", None)
    assert _lora_link_type_ok()


def test_flux_workflow_is_reproduced_by_the_generator(tiny_models_dir, tmp_path):
    """The shipped JSON and thumbnail are what tools/make_workflows.py writes with the live schemas."""
    import nodes
    from workflows import recipes, thumbnails
    flux = workflow_file("personalize_freecustom_flux")
    shipped = json.loads(flux.read_text(encoding="utf-8"))
    schemas = rw.live_schemas(sorted({n["type"] for n in shipped["nodes"]} - {"Note"}))
    assert recipes.freecustom_flux_workflow(schemas, nodes.NODE_CLASS_MAPPINGS) == shipped
    thumbnails.thumbnail_flux(tmp_path / "card.jpg")
    assert (tmp_path / "card.jpg").read_bytes() == flux.with_suffix(".jpg").read_bytes()


@pytest.mark.parametrize("stem,recipe,card", [
    ("personalize_native_flux2_klein", "native_flux2_workflow", "thumbnail_native_flux2"),
    ("personalize_native_qwen_edit_two_people", "native_qwen_workflow", "thumbnail_native_qwen")])
def test_native_workflows_are_reproduced_by_the_generator(stem, recipe, card, tiny_models_dir, tmp_path):
    """The shipped JSON, thumbnail and region masks are what tools/make_workflows.py writes."""
    import nodes
    from workflows import native_recipes, thumbnails
    from workflows.native_inputs import REGIONS, write_native_inputs
    path = workflow_file(stem)
    shipped = json.loads(path.read_text(encoding="utf-8"))
    schemas = rw.live_schemas(sorted({n["type"] for n in shipped["nodes"]} - {"Note"}))
    assert getattr(native_recipes, recipe)(schemas, nodes.NODE_CLASS_MAPPINGS) == shipped
    getattr(thumbnails, card)(tmp_path / "card.jpg")
    assert (tmp_path / "card.jpg").read_bytes() == path.with_suffix(".jpg").read_bytes()
    write_native_inputs(tmp_path)
    for name in REGIONS:
        assert (tmp_path / name).read_bytes() == (WORKFLOWS / "inputs" / name).read_bytes()


@pytest.mark.parametrize("stem", ["personalize_world_freecustom_multi_reference",
                                  "personalize_world_freemix_structure_appearance", "personalize_world_mudi_compose"])
def test_world_workflows_are_reproduced_by_the_generator(stem, tiny_models_dir, tmp_path):
    """The shipped world JSON and thumbnail are what tools/make_workflows.py writes with the live schemas, from the
    settings passed to the shared recipes."""
    import nodes
    from workflows import recipes, thumbnails
    from workflows import settings as st
    settings, build, card = {
        st.WORLD_FREECUSTOM["stem"]: (st.WORLD_FREECUSTOM, recipes.freecustom_workflow,
                                      thumbnails.thumbnail_world_freecustom),
        st.WORLD_FREEMIX["stem"]: (st.WORLD_FREEMIX, recipes.freemix_workflow, thumbnails.thumbnail_world_freemix),
        st.WORLD_MUDI["stem"]: (st.WORLD_MUDI, recipes.mudi_workflow, thumbnails.thumbnail_world_mudi)}[stem]
    shipped = json.loads(workflow_file(stem).read_text(encoding="utf-8"))
    schemas = rw.live_schemas(sorted({n["type"] for n in shipped["nodes"]} - {"Note"}))
    assert build(schemas, nodes.NODE_CLASS_MAPPINGS, settings) == shipped
    card(tmp_path / "card.jpg")
    assert (tmp_path / "card.jpg").read_bytes() == workflow_file(stem).with_suffix(".jpg").read_bytes()


def test_model_metadata_names_the_loaders_own_folder(tiny_models_dir, tmp_path):
    """Each model entry of a shipped workflow names a folder ComfyUI knows (``/experiment/models`` lists it,
    so the frontend's missing-models panel files the download there), and the folder its loader reads: a
    file of the entry's name put into a fresh path of that folder shows up among the loader widget's
    choices (the widget found by position in the live schema, not from the generator's table)."""
    import folder_paths
    from ui_to_api import widget_slots

    checked = set()
    for stem in shipped_stems():
        wf = json.loads(workflow_file(stem).read_text(encoding="utf-8"))
        for node in wf["nodes"]:
            for entry in node.get("properties", {}).get("models", []):
                schema = rw.live_schemas([node["type"]])[node["type"]]
                widgets = [(name, opts) for (name, kind, opts), value in zip(widget_slots(schema),
                                                                              node["widgets_values"])
                           if kind == "value" and value == entry["name"]]
                assert widgets, (stem, node["type"], entry)
                checked.add((node["type"], widgets[0][0], entry["name"], entry["directory"]))
    assert {c[3] for c in checked} >= {"checkpoints", "ipadapter", "sams", "clip_vision", "photomaker",
                                       "diffusion_models", "text_encoders", "vae", "loras"}
    for class_type, widget, name, directory in sorted(checked):
        assert directory in folder_paths.folder_names_and_paths, f"{directory}: not a ComfyUI model folder"
        folder = tmp_path / directory
        folder.mkdir(exist_ok=True)
        (folder / name).write_bytes(b"")
        before = list(folder_paths.folder_names_and_paths[directory][0])
        folder_paths.add_model_folder_path(directory, str(folder))
        folder_paths.filename_list_cache.pop(directory, None)
        try:
            spec = rw.live_schemas([class_type])[class_type]["required"][widget]
            choices = spec[0] if isinstance(spec[0], (list, tuple)) else spec[1].get("options", [])
            assert name in choices, f"{class_type}.{widget} does not list {name} put into models/{directory}"
        finally:
            folder_paths.folder_names_and_paths[directory][0][:] = before
            folder_paths.filename_list_cache.pop(directory, None)
