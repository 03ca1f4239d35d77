"""MuDI nodes: schema, input checks and wiring only (the work is in ``references/compose.py``).

Subject (MuDI) → Subject Composer (MuDI): segmented subjects pasted on a plain canvas, the collage
of Seg-Mix (``docs/algorithms.md`` §5.2) and the image behind MuDI's mean-shifted initialisation (§5.4).
"""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..references.compose import BACKGROUNDS, PLACEMENTS, compose_subjects, make_subject
from ..references.init_noise import MeanShiftedNoise, shift_latent
from ..references.masks import as_mask_batch
from .checks import check_inputs

Subjects = io.Custom("PERSONALIZE_SUBJECTS")
CATEGORY = "personalize/mudi"


# =========================================================================== subjects and composer

def subjects_from_inputs(image, mask, name: str, previous=None) -> tuple:
    """One Subject per image of the batch (a batch of masks: one per image, or one for all)."""
    if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[0] < 1:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"image: expected a ComfyUI IMAGE [B,H,W,3], got {shape}")
    masks = as_mask_batch(mask, "mask")
    b = image.shape[0]
    if masks.shape[0] not in (1, b):
        raise ValueError(f"mask: {masks.shape[0]} masks for {b} images; give one mask per image, or one for all")
    prev = tuple(previous or ())
    base = str(name or "").strip() or f"subject {len(prev) + 1}"
    out = []
    for i in range(b):
        out.append(make_subject(image[i], masks[i if masks.shape[0] == b else 0],
                                base if b == 1 else f"{base} {i + 1}"))
    return prev + tuple(out)


class PersonalizeSubject(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PersonalizeSubject",
            display_name="Subject (MuDI)",
            category=CATEGORY,
            description=(
                "One segmented subject for the Subject Composer: an image and the mask of the subject in it "
                "(hand-drawn, SAM, any MASK of the image's size). Chain several Subject nodes to give several "
                "subjects; an image batch gives one subject per image."),
            inputs=[
                io.Image.Input("image", tooltip="The subject's photo (a batch gives one subject per image)."),
                io.Mask.Input("mask", tooltip="The subject's mask, the image's size (pixels above 0.5 are the "
                                              "subject). A batch: one mask per image, or one for all."),
                io.String.Input("name", default="",
                                tooltip="A name for messages and the layout, e.g. 'cat'. Empty: 'subject N'."),
                Subjects.Input("subjects", optional=True,
                               tooltip="Subjects to chain onto; this node appends its own."),
            ],
            outputs=[Subjects.Output(display_name="subjects", tooltip="The chain of subjects so far, this one last.")],
        )

    @classmethod
    def execute(cls, image, mask, name="", subjects=None) -> io.NodeOutput:
        checked = check_inputs(cls, locals())
        image, mask = checked["image"], checked["mask"]
        return io.NodeOutput(subjects_from_inputs(image, mask, name, subjects))


class PersonalizeSubjectComposer(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PersonalizeSubjectComposer",
            display_name="Subject Composer (MuDI)",
            category=CATEGORY,
            description=(
                "Pastes the subjects, cut out by their masks, on a plain canvas as MuDI's Seg-Mix does: each "
                "subject is scaled to a random fraction of the largest size that fits one of N equal columns, "
                "placed at random (or left to right) and pasted in a random order. Outputs the image, each "
                "subject's visible mask, and the layout as JSON. Deterministic for a seed."),
            inputs=[
                Subjects.Input("subjects", tooltip="From Subject (MuDI) nodes, chained."),
                io.Int.Input("width", default=1024, min=64, max=8192, step=8,
                             tooltip="Canvas width in pixels (Seg-Mix: 1024 for SDXL)."),
                io.Int.Input("height", default=1024, min=64, max=8192, step=8,
                             tooltip="Canvas height in pixels."),
                io.Combo.Input("placement", options=list(PLACEMENTS), default=PLACEMENTS[0],
                               tooltip="random: anywhere on the canvas, overlaps limited by max_overlap; "
                                       "left to right: subject i inside the i-th of N equal columns, in the "
                                       "order the subjects are chained (never overlapping)."),
                io.Float.Input("scale_min", advanced=True, default=0.75, min=0.05, max=1.0, step=0.01,
                               tooltip="Smallest scale, as a fraction of the largest one that fits a column "
                                       "(Seg-Mix: 0.75)."),
                io.Float.Input("scale_max", advanced=True, default=1.0, min=0.05, max=1.0, step=0.01,
                               tooltip="Largest scale, as a fraction of the largest one that fits a column "
                                       "(Seg-Mix: 1.0). Equal to scale_min fixes the size."),
                io.Float.Input("max_overlap", advanced=True, default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="random placement: the largest overlap of two subjects, as a fraction "
                                       "of the smaller one's pixels (0: never touching; 1: anything goes)."),
                io.Combo.Input("background", options=list(BACKGROUNDS), default="white",
                               tooltip="Colour of every pixel no subject covers (Seg-Mix: white)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                             tooltip="Seed of the scales, positions and paste order."),
                io.Int.Input("margin", advanced=True, default=32, min=0, max=1024, step=1,
                             tooltip="Pixels kept free in each column and in the height when computing the "
                                     "largest scale (Seg-Mix: 32)."),
            ],
            outputs=[io.Image.Output(display_name="image", tooltip="The composed image of the subjects."),
                     io.Mask.Output(display_name="masks", tooltip="Each subject's mask in the composed image."),
                     io.String.Output(display_name="layout", tooltip="Each subject's box and scale, as JSON.")],
        )

    @classmethod
    def execute(cls, subjects, width=1024, height=1024, placement="random", scale_min=0.75, scale_max=1.0,
                max_overlap=0.0, background="white", seed=0, margin=32) -> io.NodeOutput:
        check_inputs(cls, locals())
        comp = compose_subjects(subjects, width, height, placement, scale_min, scale_max, max_overlap,
                                background, seed, margin)
        return io.NodeOutput(comp.image, comp.masks, comp.layout_json())


class MeanShiftedNoiseNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PersonalizeMeanShiftedNoise",
            display_name="Mean-Shifted Noise (MuDI)",
            category="personalize/mudi",
            description=(
                "MuDI's initialisation: the starting noise of SamplerCustomAdvanced, shifted toward the latent of "
                "the composed subjects where they are, so each subject gets its own place in the picture and none "
                "goes missing. noise = eps + gamma/sigma_max * mask * (latent - background mean); gamma 0 is exactly "
                "the RandomNoise of the same seed. The paper's code for this step is not public: the formula is a "
                "reconstruction (see the README)."),
            inputs=[
                io.Model.Input("model", tooltip="The model you sample with (its latent format and noise schedule)."),
                io.Float.Input("gamma", default=1.0, min=0.0, max=10.0, step=0.05,
                               tooltip="Strength of the subjects' latent in the starting point: 0 is plain noise, 1 "
                                       "adds it at full strength (as an image-to-image start at full denoise)."),
                io.Int.Input("noise_seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the noise (the same noise as RandomNoise with this seed)."),
                io.Image.Input("image", optional=True,
                               tooltip="The composed subjects (Subject Composer's image); encoded with 'vae'."),
                io.Vae.Input("vae", optional=True, tooltip="The VAE that encodes 'image' (your checkpoint's)."),
                io.Latent.Input("latent", optional=True,
                                tooltip="The composed subjects already VAE-encoded (instead of image + vae)."),
                io.Mask.Input("masks", optional=True,
                              tooltip="The subject masks of the composed image (Subject Composer's masks). The shift "
                                      "is applied inside them only. Unconnected: everywhere, relative to the "
                                      "latent's mean."),
            ],
            outputs=[io.Noise.Output(tooltip="The mean-shifted initial noise, for SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, model, gamma=1.0, noise_seed=0, image=None, vae=None, latent=None, masks=None) -> io.NodeOutput:
        checked = check_inputs(cls, locals())
        image, latent, masks = checked["image"], checked["latent"], checked["masks"]
        if latent is not None:
            if image is not None:
                raise ValueError("latent: connect either the composed image (with a vae) or its latent, not both")
            z = latent["samples"] if isinstance(latent, dict) else latent
        elif image is not None:
            if vae is None:
                raise ValueError("vae: the composed image needs a VAE to be encoded; connect your checkpoint's VAE")
            z = vae.encode(image[..., :3])
        else:
            raise ValueError("image: connect the composed image (Subject Composer) with a vae, or its latent")
        if not isinstance(z, torch.Tensor) or z.dim() != 4:
            raise ValueError(f"latent: expected an image latent [B,C,H,W], got "
                             f"{tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}")
        want = model.model.latent_format.latent_channels
        if z.shape[1] != want:
            raise ValueError(f"vae: the composed image's latent has {z.shape[1]} channels but this model works on {want}; "
                             f"encode it with the VAE of the checkpoint you sample with")
        z = model.model.process_latent_in(z.float().cpu())
        shift = shift_latent(z, masks)
        sigma_max = float(model.get_model_object("model_sampling").sigma_max)
        return io.NodeOutput(MeanShiftedNoise(noise_seed, shift, gamma, sigma_max))


NODES = [PersonalizeSubject, PersonalizeSubjectComposer, MeanShiftedNoiseNode]
