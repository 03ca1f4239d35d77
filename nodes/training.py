"""Training nodes: Seg-Mix Dataset and Train Seg-Mix LoRA (MuDI). Schema, input checks, the job
folder and the wiring to the training child (``training/runner.py``); the training itself runs in the
child (``training/sidecar.py`` + ``training/comfy_model.py``)."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch
from comfy_api.latest import io

from ..references.masks import as_mask_batch
from ..files.atomic import atomic_save_safetensors, atomic_write_text
from ..files.output_names import output_path

SegMixDatasetType = io.Custom("PERSONALIZE_SEGMIX_DATASET")
CATEGORY = "personalize/training"
JOBS_FOLDER = "personalize_training"


# ====================================================================================== dataset

@dataclass(frozen=True)
class DatasetSubject:
    identifier: str
    phrase: str
    images: torch.Tensor     # [N, H, W, 3]
    masks: torch.Tensor      # [N, H, W]
    captions: tuple


def dataset_from_inputs(images, masks, phrase: str, captions: str, identifier: str = "", previous=None) -> tuple:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] < 1 or images.shape[-1] < 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images: expected a ComfyUI IMAGE [B,H,W,3] with at least one image, got {shape}")
    m = as_mask_batch(masks, "masks")
    n = images.shape[0]
    if m.shape[0] not in (1, n):
        raise ValueError(f"masks: {m.shape[0]} masks for {n} images; give one mask per image (or one for all)")
    if tuple(m.shape[-2:]) != tuple(images.shape[1:3]):
        raise ValueError(f"masks: {m.shape[-1]}x{m.shape[-2]} masks for {images.shape[2]}x{images.shape[1]} images; "
                         f"each mask must have its image's size")
    m = m.expand(n, -1, -1) if m.shape[0] == 1 else m
    empty = [i + 1 for i in range(n) if float((m[i] > 0.5).sum()) == 0]
    if empty:
        raise ValueError(f"masks: mask(s) {empty} are empty (nothing above 0.5): Seg-Mix cuts the subject out with it")
    phrase = str(phrase or "").strip()
    if not phrase:
        raise ValueError("phrase: give the subject's placeholder phrase, e.g. 'olis monster toy'")
    ident = str(identifier or "").strip() or phrase.split()[0]
    lines = [ln.strip() for ln in str(captions or "").splitlines() if ln.strip()] or ["a photo of {}"]
    if len(lines) not in (1, n):
        raise ValueError(f"captions: {len(lines)} lines for {n} images; give one line for all (with '{{}}' for the "
                         f"phrase) or one per image")
    caps = tuple((lines[i] if len(lines) == n else lines[0]).replace("{}", phrase) for i in range(n))
    prev = tuple(previous or ())
    if any(s.identifier == ident for s in prev):
        raise ValueError(f"identifier: {ident!r} is already in the dataset; give each subject its own identifier")
    return prev + (DatasetSubject(ident, phrase, images[..., :3].float().cpu(), (m > 0.5).float().cpu(), caps),)


class SegMixDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PersonalizeSegMixDataset",
            display_name="Seg-Mix Dataset (MuDI)",
            category=CATEGORY,
            description=(
                "One subject of a Seg-Mix LoRA training set: its photos, their subject masks, the placeholder phrase "
                "(a rare token and the class, e.g. 'olis monster toy', as MuDI's metadata writes it) and the "
                "captions. Chain one node per subject; Seg-Mix composes pairs of different subjects."),
            inputs=[
                io.Image.Input("images", tooltip="The subject's photos (a batch; 3-10 is typical)."),
                io.Mask.Input("masks", tooltip="The subject's mask in each photo (SAM, hand-drawn), the photo's size."),
                io.String.Input("phrase", default="",
                                tooltip="The placeholder phrase, e.g. 'olis monster toy': used in the captions and "
                                        "in Seg-Mix's 'a photo of a {A} and a {B}, simple background.'"),
                io.String.Input("captions", multiline=True, default="a photo of {}",
                                tooltip="One caption for every photo, or one line per photo; '{}' is replaced by "
                                        "the phrase."),
                io.String.Input("identifier", default="", optional=True,
                                tooltip="A short unique name for this subject (default: the phrase's first word)."),
                SegMixDatasetType.Input("dataset", optional=True, tooltip="Subjects to chain onto."),
            ],
            outputs=[SegMixDatasetType.Output(display_name="dataset")],
        )

    @classmethod
    def execute(cls, images, masks, phrase, captions="a photo of {}", identifier="", dataset=None) -> io.NodeOutput:
        return io.NodeOutput(dataset_from_inputs(images, masks, phrase, captions, identifier, dataset))


# ====================================================================================== job folder

def comfyui_root() -> str:
    import folder_paths
    return os.path.dirname(os.path.abspath(folder_paths.__file__))


def job_folder(stem: str) -> str:
    import folder_paths
    path = os.path.join(folder_paths.get_output_directory(), JOBS_FOLDER, stem)
    os.makedirs(path, exist_ok=True)
    return path


def model_fingerprint(sd: dict) -> str:
    """A cheap digest of the weights (names, shapes and a few sums), so a resume with another model is
    refused without hashing gigabytes."""
    import hashlib
    h = hashlib.sha256()
    keys = sorted(sd)
    for k in keys:
        h.update(f"{k}:{tuple(sd[k].shape)};".encode())
    for k in keys[:: max(1, len(keys) // 16)]:
        h.update(f"{float(sd[k].double().sum()):.6e}".encode())
    return h.hexdigest()[:16]


def write_model(model, job_dir: str) -> str:
    """The MODEL's diffusion model weights, patches (LoRAs applied before this node) included."""
    import comfy.model_management as mm
    mm.load_models_gpu([model], force_patch_weights=True)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in model.model.diffusion_model.state_dict().items()}
    atomic_save_safetensors(os.path.join(job_dir, "model.safetensors"), sd)
    return model_fingerprint(sd)


def write_vae(vae, job_dir: str) -> None:
    sd = {k: v.detach().to("cpu").contiguous() for k, v in vae.first_stage_model.state_dict().items()}
    atomic_save_safetensors(os.path.join(job_dir, "vae.safetensors"), sd)


def encode_text(clip, text: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    return cond.detach().float().cpu().contiguous(), (None if pooled is None else pooled.detach().float().cpu().contiguous())


def write_segmix_data(dataset, clip, job_dir: str, template: str, validation_prompt: str, seed: int) -> None:
    tensors, images = {}, []
    phrases = {s.identifier: s.phrase for s in dataset}
    captions: list[str] = []
    k = 0
    for s in dataset:
        for i in range(s.images.shape[0]):
            tensors[f"image.{k}"] = s.images[i].contiguous()
            tensors[f"mask.{k}"] = s.masks[i].contiguous()
            images.append({"identifier": s.identifier, "caption": s.captions[i]})
            if s.captions[i] not in captions:
                captions.append(s.captions[i])
            k += 1
    for a in phrases:
        for b in phrases:
            if a != b:
                text = template.format(phrases[a], phrases[b])
                if text not in captions:
                    captions.append(text)
    for i, text in enumerate(captions):
        cond, pooled = encode_text(clip, text)
        tensors[f"cond.{i}"] = cond
        if pooled is not None:
            tensors[f"pooled.{i}"] = pooled
    meta = {"images": images, "phrases": phrases, "captions": captions}
    if validation_prompt.strip():
        for j, text in enumerate((validation_prompt.strip(), "")):
            cond, pooled = encode_text(clip, text)
            tensors[f"val_cond.{j}"] = cond
            if pooled is not None:
                tensors[f"val_pooled.{j}"] = pooled
        meta["validation"] = {"prompt": validation_prompt.strip(), "seed": int(seed)}
    atomic_save_safetensors(os.path.join(job_dir, "data.safetensors"), tensors)
    atomic_write_text(os.path.join(job_dir, "data.json"), json.dumps(meta, indent=1))


# ====================================================================================== running

def run_in_child(job_dir: str, total: int, gpus: int):
    """Runs the job folder's training in the child process with ComfyUI's progress bar (step, loss,
    previews) and Cancel; returns the runner's result."""
    import comfy.model_management as mm
    import comfy.utils
    from PIL import Image

    from ..training.runner import run_job
    pbar = comfy.utils.ProgressBar(total)
    previews = []

    def on_event(evt):
        kind = evt.get("event")
        if kind == "start":
            pbar.update_absolute(int(evt.get("resumed_from", 0)), total)
        elif kind == "step":
            pbar.update_absolute(int(evt["step"]), total)
        elif kind == "preview":
            previews.append(evt["path"])
            with Image.open(evt["path"]) as im:
                pbar.update_absolute(int(evt["step"]), total, ("PNG", im.convert("RGB"), 512))

    from ..training.runner import TrainingCancelled
    mm.unload_all_models()
    mm.soft_empty_cache()
    try:
        result = run_job(job_dir, on_event, mm.processing_interrupted, gpus=gpus)
    except TrainingCancelled:
        # the child has stopped (its last checkpoint kept); ComfyUI's own interrupt ends the prompt as
        # "interrupted", not as an error
        mm.throw_exception_if_processing_interrupted()
        raise
    result["preview_paths"] = previews
    return result


def loss_curve_image(losses: list, width: int = 640, height: int = 320) -> torch.Tensor:
    """The loss per step (and its running mean over ~5 % of the steps) as an IMAGE ``[1, H, W, 3]``."""
    from PIL import Image, ImageDraw
    im = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(im)
    left, top, right, bottom = 56, 16, width - 12, height - 28
    d.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    vals = [float(v) for v in losses if math.isfinite(float(v))]
    if vals:
        lo, hi = min(vals), max(vals)
        hi = hi if hi > lo else lo + 1e-8
        n = len(vals)

        def xy(i, v):
            x = left + (right - left) * (i / max(1, n - 1))
            return x, bottom - (bottom - top) * (v - lo) / (hi - lo)
        d.line([xy(i, v) for i, v in enumerate(vals)], fill=(150, 170, 230), width=1)
        w = max(1, n // 20)
        run = [sum(vals[max(0, i - w + 1):i + 1]) / len(vals[max(0, i - w + 1):i + 1]) for i in range(n)]
        d.line([xy(i, v) for i, v in enumerate(run)], fill=(20, 60, 200), width=2)
        d.text((4, top), f"{hi:.4g}", fill=(0, 0, 0))
        d.text((4, bottom - 10), f"{lo:.4g}", fill=(0, 0, 0))
        d.text((left, bottom + 6), f"step 1 .. {n}    loss (light) and running mean (dark)", fill=(0, 0, 0))
    import numpy as np
    return torch.from_numpy(np.asarray(im).astype(np.float32) / 255.0)[None]


def preview_images(paths: list) -> torch.Tensor:
    import numpy as np
    from PIL import Image
    if not paths:
        return torch.zeros(1, 64, 64, 3)
    ims = []
    for p in paths:
        with Image.open(p) as im:
            ims.append(torch.from_numpy(np.asarray(im.convert("RGB")).astype(np.float32) / 255.0))
    shape = ims[0].shape
    return torch.stack([i for i in ims if i.shape == shape])


def lora_files() -> list[str]:
    import folder_paths
    return folder_paths.get_filename_list("loras")


class _LoraListFirst:
    """``RETURN_TYPES`` with the first output typed as the live list of LoRA files: core LoraLoader
    declares its ``lora_name`` input with that list as the type (a V1 combo), and ComfyUI's prompt
    validation compares a linked output's type with it; the schema's ``COMBO`` (what the editor sees)
    would be refused as a type mismatch. Read at every validation, so a file written by a previous
    run is in the list."""

    def __get__(self, obj, cls):
        cls.GET_SCHEMA()
        return [lora_files(), *cls._RETURN_TYPES[1:]]


class TrainSegMixLoRA(io.ComfyNode):
    RETURN_TYPES = _LoraListFirst()

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PersonalizeTrainSegMixLoRA",
            display_name="Train Seg-Mix LoRA (MuDI)",
            category=CATEGORY,
            description=(
                "Trains MuDI's Seg-Mix LoRA of the dataset's subjects on the connected MODEL, in a separate "
                "process (ComfyUI stays responsive; Cancel stops it cleanly). LoRA on every attention "
                "projection; with probability segmix_prob a step trains on a collage of two segmented subjects "
                "('a photo of a {A} and a {B}, simple background.') with the loss inside the subjects; DCO keeps "
                "the model close to the original. The LoRA is saved to models/loras (core LoraLoader loads it); "
                "checkpoints let a run started again with the same output name resume."),
            inputs=[
                io.Model.Input("model", tooltip="The model to train on (your checkpoint; MuDI uses SDXL)."),
                io.Clip.Input("clip", tooltip="The checkpoint's CLIP, to encode the captions."),
                io.Vae.Input("vae", tooltip="The checkpoint's VAE, to encode the training images."),
                SegMixDatasetType.Input("dataset", tooltip="From Seg-Mix Dataset (MuDI) nodes, one per subject."),
                io.String.Input("output_name", default="segmix_lora",
                                tooltip="The LoRA's file name in models/loras (no folders). The same name resumes "
                                        "an interrupted run."),
                io.Int.Input("steps", default=2010, min=1, max=1_000_000, tooltip="Optimizer steps (MuDI: 2010)."),
                io.Int.Input("rank", default=32, min=1, max=512, tooltip="LoRA rank (alpha = rank). MuDI: 32."),
                io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1.0, step=1e-5,
                               tooltip="AdamW learning rate, constant (MuDI: 1e-4)."),
                io.Float.Input("segmix_prob", default=0.3, min=0.0, max=1.0, step=0.05,
                               tooltip="Probability that a step trains on a two-subject collage (MuDI: 0.3). Needs "
                                       "two or more subjects when above 0."),
                io.Float.Input("scale_min", default=0.75, min=0.05, max=1.0, step=0.05,
                               tooltip="Smallest subject scale in a collage, as a fraction of the largest that fits."),
                io.Float.Input("scale_max", default=1.0, min=0.05, max=1.0, step=0.05,
                               tooltip="Largest subject scale in a collage."),
                io.Combo.Input("loss", options=["dco", "mse"], default="dco",
                               tooltip="dco: MuDI's -log sigmoid(-beta (L_lora - L_ref)) against the model without "
                                       "the LoRA; mse: plain DreamBooth masked MSE."),
                io.Float.Input("dco_beta", default=1000.0, min=0.0, max=1e6, step=10.0, tooltip="DCO's beta (1000)."),
                io.Int.Input("resolution", default=1024, min=64, max=4096, step=64,
                             tooltip="Training image side in pixels (MuDI: 1024 on SDXL)."),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Images per step."),
                io.Boolean.Input("gradient_checkpointing", default=True,
                                 tooltip="Recompute the transformer blocks in the backward pass: much less memory, "
                                         "about 30 % slower."),
                io.Int.Input("seed", default=42, min=0, max=0xFFFFFFFF, tooltip="Seed of the LoRA init, the data "
                                                                               "draws and the noise (MuDI: 42)."),
                io.String.Input("validation_prompt", multiline=True, default="",
                                tooltip="A prompt sampled every validate_every steps as a preview (empty: none)."),
                io.Int.Input("validate_every", default=0, min=0, max=1_000_000,
                             tooltip="Steps between validation images (0: none)."),
                io.Int.Input("checkpoint_every", default=100, min=1, max=1_000_000,
                             tooltip="Steps between checkpoints (for resuming)."),
                io.Int.Input("gpus", default=1, min=1, max=64,
                             tooltip="GPUs for data-parallel training (the child runs under accelerate launch / "
                                     "torchrun). batch_size must be a multiple of it."),
            ],
            outputs=[io.Combo.Output(display_name="lora_name", options=lora_files()),
                     io.Model.Output(display_name="model"),
                     io.Image.Output(display_name="loss_curve"),
                     io.Image.Output(display_name="validation"),
                     io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, model, clip, vae, dataset, output_name="segmix_lora", steps=2010, rank=32, learning_rate=1e-4,
                segmix_prob=0.3, scale_min=0.75, scale_max=1.0, loss="dco", dco_beta=1000.0, resolution=1024,
                batch_size=1, gradient_checkpointing=True, seed=42, validation_prompt="", validate_every=0,
                checkpoint_every=100, gpus=1) -> io.NodeOutput:
        import comfy.model_management as mm
        import comfy.sd
        import comfy.utils
        import folder_paths

        from ..training.segmix import TEMPLATE
        if not dataset or not all(isinstance(s, DatasetSubject) for s in dataset):
            raise ValueError("dataset: connect Seg-Mix Dataset (MuDI) nodes (at least one subject)")
        if segmix_prob > 0 and len(dataset) < 2:
            raise ValueError("segmix_prob: Seg-Mix composes two different subjects; chain a second Seg-Mix Dataset "
                             "node, or set segmix_prob to 0 to train one subject")
        if scale_min > scale_max:
            raise ValueError(f"scale_min ({scale_min}) is above scale_max ({scale_max})")
        if batch_size % gpus:
            raise ValueError(f"batch_size ({batch_size}) must be a multiple of gpus ({gpus})")
        if loss not in ("dco", "mse"):
            raise ValueError(f"loss: expected dco or mse, got {loss!r}")
        loras_dir = folder_paths.get_folder_paths("loras")[0]
        out = output_path(loras_dir, output_name, ".safetensors")
        job_dir = job_folder(out.stem)
        device = "cuda" if mm.get_torch_device().type == "cuda" else "cpu"
        fingerprint = write_model(model, job_dir)
        write_vae(vae, job_dir)
        write_segmix_data(dataset, clip, job_dir, TEMPLATE, validation_prompt if validate_every else "", seed)
        config = {
            "kind": "lora", "output": str(out), "state_dir": os.path.join(job_dir, "state"), "steps": int(steps),
            "seed": int(seed), "checkpoint_every": int(checkpoint_every), "validate_every": int(validate_every),
            "comfyui_path": comfyui_root(), "device": device, "resolution": int(resolution), "rank": int(rank),
            "learning_rate": float(learning_rate), "weight_decay": 1e-4, "max_grad_norm": 1.0,
            "segmix_prob": float(segmix_prob), "scale_min": float(scale_min), "scale_max": float(scale_max),
            "loss": loss, "dco_beta": float(dco_beta), "batch_size": int(batch_size),
            "gradient_checkpointing": bool(gradient_checkpointing), "model_fingerprint": fingerprint,
            "training_dtype": "bfloat16" if device == "cuda" and mm.should_use_bf16(mm.get_torch_device()) else "float32",
        }
        atomic_write_text(os.path.join(job_dir, "job.json"), json.dumps(config, indent=1))
        result = run_in_child(job_dir, int(steps), int(gpus))
        lora_sd = comfy.utils.load_torch_file(str(out), safe_load=True)
        patched, _ = comfy.sd.load_lora_for_models(model, None, lora_sd, 1.0, 0.0)
        losses = result.get("losses") or []
        report = (f"Seg-Mix LoRA: {out} ({len(lora_sd) // 3} layers, rank {rank}); {result.get('steps')} steps"
                  f"{', resumed from step ' + str(result.get('resumed_from')) if result.get('resumed_from') else ''}; "
                  f"loss {losses[0]:.4f} -> {losses[-1]:.4f}" if losses else f"Seg-Mix LoRA: {out}")
        return io.NodeOutput(out.name, patched, loss_curve_image(losses), preview_images(result["preview_paths"]),
                             report)


# ====================================================================================== Infusion

# Textual-Inversion-style caption templates with the concept's super-class word (Infusion trains on 11
# such templates, §6.2; the word is the ordinary class word, e.g. "cat").
INFUSION_TEMPLATES = ("a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
                      "a photo of a clean {}", "a close-up photo of a {}", "a bright photo of the {}",
                      "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a photo of a nice {}")


def write_infusion_data(model, clip, images, masks, word: str, job_dir: str, validation_prompt: str, seed: int):
    from ..attention.infusion import concept_position, cross_attention_widths
    widths, family = cross_attention_widths(model)
    tensors, meta_images = {}, []
    for i in range(images.shape[0]):
        tensors[f"image.{i}"] = images[i, ..., :3].float().contiguous()
        tensors[f"mask.{i}"] = masks[i].float().contiguous()
        meta_images.append({"index": i})
    captions = [t.format(word) for t in INFUSION_TEMPLATES]
    positions, length = [], None
    for i, text in enumerate(captions):
        pos, n = concept_position(clip, text, word, family)
        positions.append(pos)
        if length is not None and n != length:
            raise ValueError(f"concept_word: the captions tokenize to {length} and {n} tokens; use a shorter word")
        length = n
        cond, pooled = encode_text(clip, text)
        tensors[f"cond.{i}"] = cond
        if pooled is not None:
            tensors[f"pooled.{i}"] = pooled
    meta = {"images": meta_images, "captions": captions, "positions": positions, "length": length,
            "widths": [[list(k), w] for k, w in widths.items()], "family": family}
    if validation_prompt.strip():
        pos, n = concept_position(clip, validation_prompt.strip(), word, family)
        for j, text in enumerate((validation_prompt.strip(), "")):
            cond, pooled = encode_text(clip, text)
            tensors[f"val_cond.{j}"] = cond
            if pooled is not None:
                tensors[f"val_pooled.{j}"] = pooled
        meta["validation"] = {"prompt": validation_prompt.strip(), "seed": int(seed), "position": pos, "length": n}
    atomic_save_safetensors(os.path.join(job_dir, "data.safetensors"), tensors)
    atomic_write_text(os.path.join(job_dir, "data.json"), json.dumps(meta, indent=1))
    return family


def infusion_files() -> list[str]:
    import folder_paths
    return folder_paths.get_filename_list("model_patches")


class TrainInfusion(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PersonalizeTrainInfusion",
            display_name="Train Infusion",
            category=CATEGORY,
            description=(
                "Trains Infusion's tiny customisation (about 25k numbers for SD1.x): a key and a value offset per "
                "cross-attention layer at the concept word's token, the UNet frozen, with the soft-masked "
                "epsilon loss over captions like 'a photo of a {word}'. Runs in a separate process (Cancel "
                "stops it; the same output name resumes). The file goes to models/model_patches for Apply "
                "Infusion. SD1.x and SD2.x models."),
            inputs=[
                io.Model.Input("model", tooltip="An SD1.x or SD2.x model (the official code: SD1.5 / SD2.1)."),
                io.Clip.Input("clip", tooltip="The checkpoint's CLIP, to encode the captions and find the word."),
                io.Vae.Input("vae", tooltip="The checkpoint's VAE, to encode the images."),
                io.Image.Input("images", tooltip="3-10 photos of the concept (a batch)."),
                io.String.Input("concept_word", default="",
                                tooltip="The concept's ordinary super-class word, e.g. 'cat' (Infusion writes the "
                                        "concept with it; no placeholder token)."),
                io.Mask.Input("masks", optional=True,
                              tooltip="Soft masks of the concept, one per photo (the official code uses CLIPSeg); "
                                      "unconnected: the whole image counts."),
                io.String.Input("output_name", default="infusion", tooltip="The file name in models/model_patches."),
                io.Int.Input("steps", default=500, min=1, max=1_000_000, tooltip="Optimizer steps (official: 500)."),
                io.Float.Input("learning_rate", default=0.01, min=1e-6, max=1.0, step=1e-3,
                               tooltip="AdamW learning rate of the offsets (official: 0.01)."),
                io.Int.Input("batch_size", default=4, min=1, max=64, tooltip="Images per step (official: 4)."),
                io.Int.Input("resolution", default=512, min=64, max=2048, step=64,
                             tooltip="Training image side in pixels (official: 512)."),
                io.Combo.Input("offsets", options=["kv", "v"], default="kv",
                               tooltip="kv: key and value offsets (the official xformers path); v: value only."),
                io.Int.Input("seed", default=42, min=0, max=0xFFFFFFFF, tooltip="Seed of the data draws and noise."),
                io.String.Input("validation_prompt", multiline=True, default="",
                                tooltip="A prompt with the concept word, sampled every validate_every steps."),
                io.Int.Input("validate_every", default=0, min=0, max=1_000_000,
                             tooltip="Steps between validation images (0: none)."),
                io.Int.Input("checkpoint_every", default=100, min=1, max=1_000_000,
                             tooltip="Steps between checkpoints (for resuming)."),
                io.Int.Input("gpus", default=1, min=1, max=64, tooltip="GPUs for data-parallel training."),
            ],
            outputs=[io.Combo.Output(display_name="infusion_name", options=infusion_files()),
                     io.Image.Output(display_name="loss_curve"),
                     io.Image.Output(display_name="validation"),
                     io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, model, clip, vae, images, concept_word, masks=None, output_name="infusion", steps=500,
                learning_rate=0.01, batch_size=4, resolution=512, offsets="kv", seed=42, validation_prompt="",
                validate_every=0, checkpoint_every=100, gpus=1) -> io.NodeOutput:
        import comfy.model_management as mm
        import folder_paths

        from ..references.compose import make_subject
        from ..training.segmix import cover_resize
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] < 1:
            raise ValueError("images: expected a ComfyUI IMAGE batch with at least one photo")
        word = str(concept_word or "").strip()
        if not word:
            raise ValueError("concept_word: give the concept's super-class word, e.g. 'cat'")
        n = images.shape[0]
        if masks is None:
            m = torch.ones(n, images.shape[1], images.shape[2])
        else:
            m = as_mask_batch(masks, "masks")
            if m.shape[0] not in (1, n) or tuple(m.shape[-2:]) != tuple(images.shape[1:3]):
                raise ValueError(f"masks: {m.shape[0]} masks of {m.shape[-1]}x{m.shape[-2]} for {n} images of "
                                 f"{images.shape[2]}x{images.shape[1]}; give one mask per image, of its size")
            m = m.expand(n, -1, -1) if m.shape[0] == 1 else m
        if batch_size % gpus:
            raise ValueError(f"batch_size ({batch_size}) must be a multiple of gpus ({gpus})")
        for i in range(n):
            make_subject(images[i], torch.ones_like(m[i]), f"image {i + 1}")          # checks the pixels
        size = int(resolution)
        imgs = torch.stack([cover_resize(images[i, ..., :3].float(), size) for i in range(n)])
        msks = torch.stack([cover_resize(m[i, ..., None].float(), size)[..., 0] for i in range(n)])
        out = output_path(folder_paths.get_folder_paths("model_patches")[0], output_name, ".safetensors")
        job_dir = job_folder("infusion_" + out.stem)
        device = "cuda" if mm.get_torch_device().type == "cuda" else "cpu"
        family = write_infusion_data(model, clip, imgs, msks, word, job_dir, validation_prompt if validate_every else "",
                                     seed)
        fingerprint = write_model(model, job_dir)
        write_vae(vae, job_dir)
        config = {
            "kind": "infusion", "output": str(out), "state_dir": os.path.join(job_dir, "state"), "steps": int(steps),
            "seed": int(seed), "checkpoint_every": int(checkpoint_every), "validate_every": int(validate_every),
            "comfyui_path": comfyui_root(), "device": device, "resolution": size, "concept_word": word,
            "learning_rate": float(learning_rate), "weight_decay": 0.01, "max_grad_norm": 0.0,
            "batch_size": int(batch_size), "kv": offsets, "model_fingerprint": fingerprint,
        }
        atomic_write_text(os.path.join(job_dir, "job.json"), json.dumps(config, indent=1))
        result = run_in_child(job_dir, int(steps), int(gpus))
        losses = result.get("losses") or []
        report = (f"Infusion ({family}, {offsets}): {out}; {result.get('steps')} steps"
                  + (f", resumed from step {result['resumed_from']}" if result.get("resumed_from") else "")
                  + (f"; loss {losses[0]:.4f} -> {losses[-1]:.4f}" if losses else ""))
        return io.NodeOutput(out.name, loss_curve_image(losses), preview_images(result["preview_paths"]), report)


NODES = [SegMixDataset, TrainSegMixLoRA, TrainInfusion]
