"""Training nodes: Seg-Mix Dataset, Train Seg-Mix LoRA (MuDI) and Train Infusion. Schema, input checks
and the wiring: the data checks are ``training/dataset.py``, the job folder ``training/job_folder.py``,
the child process ``training/runner.py`` (the training itself runs there: ``training/sidecar.py`` +
``training/comfy_model.py``), the loss curve and previews ``training/report.py``."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import folder_paths
from comfy_api.latest import io

from ..attention.blocks import cross_attention_modules
from ..attention.infusion import cross_attention_widths, model_config_name
from ..files.atomic import remove_quietly
from ..files.output_names import output_path
from ..training import job_guard as guard
from ..training.infusion import KIND as INFUSION_KIND
from ..training.dataset import check_segmix_dataset, dataset_from_inputs, infusion_data_from_inputs
from ..training.job_folder import (DATA_FILE, MODEL_FILE, VAE_FILE, model_file_record, model_fingerprint,
                                   model_weights, write_config, write_infusion_data, write_segmix_data, write_vae,
                                   write_weights)
from ..training.lora import lora_file_bytes
from ..training.report import loss_curve_image, preview_images, preview_picture
from ..training.runner import TrainingCancelled, run_with_progress
from ..training.segmix import TEMPLATE
from .checks import check_inputs

SegMixDatasetType = io.Custom("PERSONALIZE_SEGMIX_DATASET")
CATEGORY = "personalize/training"
JOBS_FOLDER = "personalize_training"
LOG = logging.getLogger("personalize.training")


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
            outputs=[SegMixDatasetType.Output(display_name="dataset", tooltip="The training set so far, this part last.")],
        )

    @classmethod
    def execute(cls, images, masks, phrase, captions="a photo of {}", identifier="", dataset=None) -> io.NodeOutput:
        check_inputs(cls, locals())
        return io.NodeOutput(dataset_from_inputs(images, masks, phrase, captions, identifier, dataset))


# ====================================================================================== wiring
# comfy.* is imported when a node runs, as in the other node files: comfy.model_management picks the
# device when it is first imported, which must not happen before ComfyUI has read its settings.

def comfyui_root() -> str:
    return os.path.dirname(os.path.abspath(folder_paths.__file__))


def job_folder(kind: str, stem: str) -> str:
    """``output/personalize_training/<kind>/<stem>``: one folder per node kind and output name, so a
    LoRA and an Infusion file never share one."""
    path = os.path.join(folder_paths.get_output_directory(), JOBS_FOLDER, kind, stem)
    os.makedirs(path, exist_ok=True)
    return path


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def training_device() -> str:
    import comfy.model_management as mm
    return "cuda" if mm.get_torch_device().type == "cuda" else "cpu"


def run_in_child(job_dir: str, total: int, gpus: int, label: str = "training") -> dict:
    """Runs the job folder's training in the child process with ComfyUI's progress bar (step, loss,
    previews), console lines (``label``: ...) and Cancel; returns the runner's result."""
    import comfy.model_management as mm
    import comfy.utils
    pbar = comfy.utils.ProgressBar(total)

    def on_progress(step: int, preview: str | None) -> None:
        pbar.update_absolute(step, total, None if preview is None else ("PNG", preview_picture(preview), 512))

    mm.unload_all_models()
    mm.soft_empty_cache()
    try:
        return run_with_progress(job_dir, on_progress, mm.processing_interrupted, gpus=gpus,
                                 log=lambda line: LOG.info("%s: %s", label, line))
    except TrainingCancelled:
        # the child has stopped (its last checkpoint kept); ComfyUI's own interrupt ends the prompt as
        # "interrupted", not as an error
        mm.throw_exception_if_processing_interrupted()
        raise


def model_for_job(model) -> tuple[dict | None, dict | None, str]:
    """``(model_file record or None, weights to copy or None, fingerprint)``: a MODEL straight from a
    file ComfyUI loaded is read by the child from that file; a patched or merged one is copied."""
    record = model_file_record(model)
    if record is not None:
        return record, None, record["fingerprint"]
    sd = model_weights(model)
    return None, sd, model_fingerprint(sd)


def train_or_reuse(job_dir: str, config: dict, out: Path, weights: dict | None, gpus: int, label: str) -> dict:
    """The finished result when this job folder's last run had exactly these inputs and its file is
    still there unchanged (a second Queue does not train again); otherwise the run in the child.
    Call while holding the job folder's lock."""
    key = guard.request_key(config, job_dir, (DATA_FILE, VAE_FILE))
    done = guard.finished_run(job_dir, key, out)
    if done is not None:
        LOG.info("%s: nothing changed since the run that wrote %s; not training again", label, out)
        return {**done, "reused": True, "preview_paths": [p for p in done.get("preview_paths") or []
                                                          if os.path.isfile(p)]}
    guard.forget_finished(job_dir)
    if weights is not None:
        write_weights(weights, job_dir)
    else:
        remove_quietly(os.path.join(job_dir, MODEL_FILE))          # a copy of an earlier run is not read
    try:
        result = run_in_child(job_dir, int(config["steps"]), gpus, label)
    finally:
        guard.remove_own_temp_files(out)                          # what a killed child left in the folder
    guard.record_finished(job_dir, key, out, result)
    return result


def lora_model_check(model) -> None:
    """Seg-Mix LoRA trains the UNet's attention projections: a model without UNet cross-attention
    (FLUX, SD3, ...) is refused before anything is copied or written."""
    if not cross_attention_modules(getattr(getattr(model, "model", None), "diffusion_model", None)):
        raise ValueError(f"model: Train Seg-Mix LoRA supports UNet models with cross-attention (SD1.x, SD2.x, SDXL); "
                         f"this is a {model_config_name(model)} model. Nothing was written")


# ====================================================================================== Seg-Mix

def lora_files() -> list[str]:
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
                "('a photo of a {A} and a {B}, simple background.'), the loss over the whole image as MuDI's "
                "recipe has it (soft_alpha 1.0); DCO keeps the model close to the original. The LoRA is saved to models/loras (core LoraLoader loads it); "
                "checkpoints let a run started again with the same output name resume."),
            inputs=[
                io.Model.Input("model", tooltip="The model to train on (your checkpoint; MuDI uses SDXL)."),
                io.Clip.Input("clip", tooltip="The checkpoint's CLIP, to encode the captions."),
                io.Vae.Input("vae", tooltip="The checkpoint's VAE, to encode the training images."),
                SegMixDatasetType.Input("dataset", tooltip="From Seg-Mix Dataset (MuDI) nodes, one per subject."),
                io.String.Input("output_name", default="segmix_lora",
                                tooltip="The LoRA's file name in models/loras (no folders). The same name resumes "
                                        "an interrupted run; a file of this name the pack did not train is never "
                                        "replaced."),
                io.Int.Input("steps", default=2010, min=1, max=1_000_000, tooltip="Optimizer steps (MuDI: 2010)."),
                io.Int.Input("rank", default=32, min=1, max=512, tooltip="LoRA rank (alpha = rank). MuDI: 32."),
                io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1.0, step=1e-5,
                               tooltip="AdamW learning rate, constant (MuDI: 1e-4)."),
                io.Float.Input("segmix_prob", advanced=True, default=0.3, min=0.0, max=1.0, step=0.05,
                               tooltip="Probability that a step trains on a two-subject collage (MuDI: 0.3). Needs "
                                       "two or more subjects when above 0."),
                io.Float.Input("scale_min", advanced=True, default=0.75, min=0.05, max=1.0, step=0.05,
                               tooltip="Smallest subject scale in a collage, as a fraction of the largest that fits."),
                io.Float.Input("scale_max", advanced=True, default=1.0, min=0.05, max=1.0, step=0.05,
                               tooltip="Largest subject scale in a collage."),
                io.Combo.Input("loss", advanced=True, options=["dco", "mse"], default="dco",
                               tooltip="dco: MuDI's -log sigmoid(-beta (L_lora - L_ref)) against the model without "
                                       "the LoRA; mse: plain DreamBooth masked MSE."),
                io.Float.Input("dco_beta", advanced=True, default=1000.0, min=0.0, max=1e6, step=10.0, tooltip="DCO's beta (1000)."),
                io.Int.Input("resolution", default=1024, min=64, max=4096, step=64,
                             tooltip="Training image side in pixels (MuDI: 1024 on SDXL)."),
                io.Int.Input("batch_size", default=1, min=1, max=64,
                             tooltip="Images per forward pass (MuDI: 1)."),
                io.Int.Input("gradient_accumulation", advanced=True, default=2, min=1, max=256,
                             tooltip="Forward passes whose gradients make one optimizer step: each step trains on "
                                     "batch_size x gradient_accumulation images (MuDI: 1 x 2)."),
                io.Boolean.Input("gradient_checkpointing", advanced=True, default=True,
                                 tooltip="Recompute the transformer blocks in the backward pass: much less memory, "
                                         "about 30 % slower."),
                io.Int.Input("seed", default=42, min=0, max=0xFFFFFFFF, control_after_generate=io.ControlAfterGenerate.fixed,
                             tooltip="Seed of the LoRA init, the data draws and the noise (MuDI: 42). Kept fixed "
                                     "after a Queue: the same inputs never train twice."),
                io.String.Input("validation_prompt", multiline=True, default="",
                                tooltip="A prompt sampled every validate_every steps as a preview (empty: none)."),
                io.Int.Input("validate_every", advanced=True, default=0, min=0, max=1_000_000,
                             tooltip="Steps between validation images (0: none)."),
                io.Int.Input("checkpoint_every", advanced=True, default=100, min=1, max=1_000_000,
                             tooltip="Steps between checkpoints (for resuming)."),
                io.Int.Input("gpus", advanced=True, default=1, min=1, max=64,
                             tooltip="GPUs for data-parallel training (the child runs under accelerate launch / "
                                     "torchrun). batch_size must be a multiple of it."),
            ],
            outputs=[io.Combo.Output(display_name="lora_name", options=lora_files(),
                                     tooltip="The trained LoRA's file in models/loras, for LoraLoader."),
                     io.Model.Output(display_name="model", tooltip="The input model with the trained LoRA applied."),
                     io.Image.Output(display_name="loss_curve", tooltip="The training loss over the steps."),
                     io.Image.Output(display_name="validation", tooltip="The validation images, when any were made."),
                     io.String.Output(display_name="report", tooltip="What the run did, as text.")],
        )

    @classmethod
    def execute(cls, model, clip, vae, dataset, output_name="segmix_lora", steps=2010, rank=32, learning_rate=1e-4,
                segmix_prob=0.3, scale_min=0.75, scale_max=1.0, loss="dco", dco_beta=1000.0, resolution=1024,
                batch_size=1, gradient_accumulation=2, gradient_checkpointing=True, seed=42, validation_prompt="", validate_every=0,
                checkpoint_every=100, gpus=1) -> io.NodeOutput:
        check_inputs(cls, locals())
        import comfy.model_management as mm
        import comfy.sd
        import comfy.utils
        check_segmix_dataset(dataset, segmix_prob)
        if scale_min > scale_max:
            raise ValueError(f"scale_min ({scale_min}) is above scale_max ({scale_max})")
        if batch_size % gpus:
            raise ValueError(f"batch_size ({batch_size}) must be a multiple of gpus ({gpus})")
        if loss not in ("dco", "mse"):
            raise ValueError(f"loss: expected dco or mse, got {loss!r}")
        lora_model_check(model)
        out = output_path(folder_paths.get_folder_paths("loras")[0], output_name, ".safetensors")
        job_dir = job_folder("segmix_lora", out.stem)
        with guard.JobLock(job_dir, output_name):
            guard.check_replaceable(out, ("segmix_lora",))
            guard.remove_own_temp_files(out)
            source, weights, fingerprint = model_for_job(model)
            lora = lora_file_bytes(model.model.diffusion_model, int(rank))
            data = sum(tensor_bytes((s.images, s.masks)) for s in dataset) + (1 << 20) * (len(dataset) + 1) ** 2
            guard.check_room([(out.parent, 2 * lora, "the LoRA folder"),
                              (Path(job_dir), 6 * lora + data + tensor_bytes(vae.first_stage_model.state_dict().values())
                               + (tensor_bytes(weights.values()) if weights else 0), "the job folder")])
            device = training_device()
            write_vae(vae, job_dir)
            write_segmix_data(dataset, clip, job_dir, TEMPLATE, validation_prompt if validate_every else "", seed)
            config = {
                "kind": "lora", "output": str(out), "state_dir": os.path.join(job_dir, "state"), "steps": int(steps),
                "seed": int(seed), "checkpoint_every": int(checkpoint_every), "validate_every": int(validate_every),
                "comfyui_path": comfyui_root(), "device": device, "resolution": int(resolution), "rank": int(rank),
                "learning_rate": float(learning_rate), "weight_decay": 1e-4, "max_grad_norm": 1.0,
                "segmix_prob": float(segmix_prob), "scale_min": float(scale_min), "scale_max": float(scale_max),
                "loss": loss, "dco_beta": float(dco_beta), "batch_size": int(batch_size),
                "gradient_accumulation": int(gradient_accumulation), "gradient_checkpointing": bool(gradient_checkpointing), "model_fingerprint": fingerprint,
                "training_dtype": "bfloat16" if device == "cuda" and mm.should_use_bf16(mm.get_torch_device()) else "float32",
                "model_file": source,
            }
            write_config(job_dir, config)
            result = train_or_reuse(job_dir, config, out, weights, int(gpus), f"Train Seg-Mix LoRA {out.name}")
            lora_sd = comfy.utils.load_torch_file(str(out), safe_load=True)
            patched, _ = comfy.sd.load_lora_for_models(model, None, lora_sd, 1.0, 0.0)
            losses = result.get("losses") or []
            report = (f"Seg-Mix LoRA: {out} ({len(lora_sd) // 3} layers, rank {rank}); {result.get('steps')} steps"
                      f"{', resumed from step ' + str(result.get('resumed_from')) if result.get('resumed_from') else ''}; "
                      f"loss {losses[0]:.4f} -> {losses[-1]:.4f}" if losses else f"Seg-Mix LoRA: {out}")
            if result.get("reused"):
                report += " (already trained with these inputs: not trained again)"
            return io.NodeOutput(out.name, patched, loss_curve_image(losses), preview_images(result["preview_paths"]),
                                 report)


# ====================================================================================== Infusion

def infusion_files() -> list[str]:
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
                io.String.Input("output_name", default="infusion",
                                tooltip="The file name in models/model_patches (no folders). The same name resumes an "
                                        "interrupted run; a file of this name the pack did not train is never "
                                        "replaced."),
                io.Int.Input("steps", default=500, min=1, max=1_000_000, tooltip="Optimizer steps (official: 500)."),
                io.Float.Input("learning_rate", default=0.01, min=1e-6, max=1.0, step=1e-3,
                               tooltip="AdamW learning rate of the offsets (official: 0.01)."),
                io.Int.Input("batch_size", default=4, min=1, max=64,
                             tooltip="Images per forward pass (official: 4)."),
                io.Int.Input("gradient_accumulation", advanced=True, default=4, min=1, max=256,
                             tooltip="Forward passes whose gradients make one optimizer step: each step trains on "
                                     "batch_size x gradient_accumulation images (official: 4 x 4 = 16)."),
                io.Int.Input("resolution", default=512, min=64, max=2048, step=64,
                             tooltip="Training image side in pixels (official: 512)."),
                io.Combo.Input("offsets", advanced=True, options=["kv", "v"], default="kv",
                               tooltip="kv: key and value offsets (the official xformers path); v: value only."),
                io.Int.Input("seed", default=42, min=0, max=0xFFFFFFFF, control_after_generate=io.ControlAfterGenerate.fixed,
                             tooltip="Seed of the data draws and noise. Kept fixed after a Queue: the same inputs "
                                     "never train twice."),
                io.String.Input("validation_prompt", multiline=True, default="",
                                tooltip="A prompt with the concept word, sampled every validate_every steps."),
                io.Int.Input("validate_every", advanced=True, default=0, min=0, max=1_000_000,
                             tooltip="Steps between validation images (0: none)."),
                io.Int.Input("checkpoint_every", advanced=True, default=100, min=1, max=1_000_000,
                             tooltip="Steps between checkpoints (for resuming)."),
                io.Int.Input("gpus", advanced=True, default=1, min=1, max=64, tooltip="GPUs for data-parallel training."),
            ],
            outputs=[io.Combo.Output(display_name="infusion_name", options=infusion_files(),
                                     tooltip="The trained file in models/model_patches, for Apply Infusion."),
                     io.Image.Output(display_name="loss_curve", tooltip="The training loss over the steps."),
                     io.Image.Output(display_name="validation", tooltip="The validation images, when any were made."),
                     io.String.Output(display_name="report", tooltip="What the run did, as text.")],
        )

    @classmethod
    def execute(cls, model, clip, vae, images, concept_word, masks=None, output_name="infusion", steps=500,
                learning_rate=0.01, batch_size=4, gradient_accumulation=4, resolution=512, offsets="kv", seed=42, validation_prompt="",
                validate_every=0, checkpoint_every=100, gpus=1) -> io.NodeOutput:
        check_inputs(cls, locals())
        word, imgs, msks = infusion_data_from_inputs(images, masks, concept_word, resolution)
        if batch_size % gpus:
            raise ValueError(f"batch_size ({batch_size}) must be a multiple of gpus ({gpus})")
        out = output_path(folder_paths.get_folder_paths("model_patches")[0], output_name, ".safetensors")
        job_dir = job_folder("infusion", out.stem)
        with guard.JobLock(job_dir, output_name):
            guard.check_replaceable(out, (INFUSION_KIND,))
            guard.remove_own_temp_files(out)
            cross_attention_widths(model)                           # SD1.x / SD2.x, before anything is copied
            source, weights, fingerprint = model_for_job(model)
            guard.check_room([(out.parent, 4 << 20, "the model_patches folder"),
                              (Path(job_dir), (16 << 20) + tensor_bytes((imgs, msks))
                               + tensor_bytes(vae.first_stage_model.state_dict().values())
                               + (tensor_bytes(weights.values()) if weights else 0), "the job folder")])
            family = write_infusion_data(model, clip, imgs, msks, word, job_dir, validation_prompt if validate_every else "",
                                         seed)
            write_vae(vae, job_dir)
            config = {
                "kind": "infusion", "output": str(out), "state_dir": os.path.join(job_dir, "state"), "steps": int(steps),
                "seed": int(seed), "checkpoint_every": int(checkpoint_every), "validate_every": int(validate_every),
                "comfyui_path": comfyui_root(), "device": training_device(), "resolution": int(resolution),
                "concept_word": word, "learning_rate": float(learning_rate), "weight_decay": 0.01, "max_grad_norm": 0.0,
                "batch_size": int(batch_size), "gradient_accumulation": int(gradient_accumulation), "kv": offsets, "model_fingerprint": fingerprint,
                "model_file": source,
            }
            write_config(job_dir, config)
            result = train_or_reuse(job_dir, config, out, weights, int(gpus), f"Train Infusion {out.name}")
            losses = result.get("losses") or []
            report = (f"Infusion ({family}, {offsets}): {out}; {result.get('steps')} steps"
                      + (f", resumed from step {result['resumed_from']}" if result.get("resumed_from") else "")
                      + (f"; loss {losses[0]:.4f} -> {losses[-1]:.4f}" if losses else "")
                      + (" (already trained with these inputs: not trained again)" if result.get("reused") else ""))
            return io.NodeOutput(out.name, loss_curve_image(losses), preview_images(result["preview_paths"]), report)


NODES = [SegMixDataset, TrainSegMixLoRA, TrainInfusion]
