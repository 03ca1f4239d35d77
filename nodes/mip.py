"""MIP-Adapter nodes: loader, image prompt, apply. Schema, input checks and wiring only (the work
is in ``attention/ip_adapter.py``, ``attention/mip.py`` and ``references/image_prompt.py``)."""
from __future__ import annotations


import folder_paths
from comfy_api.latest import io

from ..attention.install import install_technique
from ..attention.ip_adapter import load_adapter
from ..attention.mip import EncodedPrompt, MultiImagePromptAttention, adapter_layers
from ..attention.patch import SigmaRange
from ..references.image_prompt import CROPS, encode_entities, encode_image_prompts, make_image_prompt
from .checks import check_inputs
from .model_files import file_default, missing_file_message, register_folder

# cubiq's IPAdapter pack keeps its files in models/ipadapter; users already have them there.
register_folder("ipadapter")

AdapterType = io.Custom("PERSONALIZE_IP_ADAPTER")
ImagePrompts = io.Custom("PERSONALIZE_IMAGE_PROMPT")


ADAPTER_HINT = ("Put MIP-Adapter's model_sdxl.bin or model_sdxl_plus.bin (huggingface.co/hqhQAQ/MIP-Adapter), or an "
                "IP-Adapter file (huggingface.co/h94/IP-Adapter, e.g. ip-adapter_sdxl.safetensors or "
                "ip-adapter_sd15.safetensors) there")


class MIPAdapterLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        files = folder_paths.get_filename_list("ipadapter")
        return io.Schema(
            node_id="PersonalizeMIPAdapterLoader",
            display_name="MIP-Adapter Loader",
            category="personalize/image prompts",
            description=(
                "Loads a MIP-Adapter checkpoint (model_sdxl.bin, model_sdxl_plus.bin) or a plain IP-Adapter "
                "checkpoint (SD1.5, SDXL, plus variants) from ComfyUI/models/ipadapter. The variant is read from "
                "the weights and reported in 'info'. Plain IP-Adapter weights have no learned text gate: MIP's "
                "per-object merge then runs training-free. Pickled .bin files are loaded as tensors only."),
            inputs=[
                io.Combo.Input("adapter_name", options=files, default=file_default(files, "ipadapter"),
                               tooltip="A file in ComfyUI/models/ipadapter (.safetensors or .bin)."),
            ],
            outputs=[AdapterType.Output(display_name="adapter", tooltip="The adapter, for MIP-Adapter Apply."),
                     io.String.Output(display_name="info", tooltip="Which adapter variant was recognised.")],
        )

    @classmethod
    def validate_inputs(cls, adapter_name=None):   # None: an empty folder's combo sends no value
        if not adapter_name or folder_paths.get_full_path("ipadapter", adapter_name) is None:
            return missing_file_message("ipadapter", adapter_name, ADAPTER_HINT)
        return True

    @classmethod
    def execute(cls, adapter_name) -> io.NodeOutput:
        path = folder_paths.get_full_path("ipadapter", adapter_name) if adapter_name else None
        if path is None:
            raise FileNotFoundError("adapter_name: " + missing_file_message("ipadapter", adapter_name, ADAPTER_HINT))
        adapter = load_adapter(path)
        info = adapter.describe()
        return io.NodeOutput(adapter, info, ui={"text": [info]})


class MIPAdapterReference(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PersonalizeMIPAdapterReference",
            display_name="MIP-Adapter Reference",
            category="personalize/image prompts",
            description=(
                "One object for MIP-Adapter Apply: its reference image(s), the word of the prompt that names it, "
                "a weight and optionally the region of the picture it should take. Chain one node per object; "
                "any number of objects works."),
            inputs=[
                io.Image.Input("image", tooltip="The object's image; a batch gives several views of the same object "
                                                "(their image-prompt tokens are averaged). Object-centred images on a "
                                                "plain background work best."),
                io.String.Input("entity", default="cat",
                                tooltip="The word of your prompt that names this object, e.g. 'cat' in 'a cat and a "
                                        "dog on the beach'. Its attention map decides where the object goes."),
                io.Float.Input("weight", default=1.0, min=-1.0, max=5.0, step=0.05,
                               tooltip="Strength of this object's image prompt, on top of the adapter scale."),
                io.Combo.Input("crop", advanced=True, options=list(CROPS), default="center",
                               tooltip="center: crop a non-square image to its centre square (like CLIP Vision "
                                       "Encode); pad: pad it to a square with white (MIP-Adapter's training crops)."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Region of the generated picture this object takes (any size; stretched to "
                                      "the picture). Overrides the entity word's attention map. One mask."),
                ImagePrompts.Input("image_prompts", optional=True,
                                   tooltip="Objects to chain onto; this node appends its own."),
            ],
            outputs=[ImagePrompts.Output(display_name="image_prompts",
                                         tooltip="The chain of image prompts so far, this one last.")],
        )

    @classmethod
    def execute(cls, image, entity, weight=1.0, crop="center", mask=None, image_prompts=None) -> io.NodeOutput:
        checked = check_inputs(cls, locals())
        image, mask = checked["image"], checked["mask"]
        prev = tuple(image_prompts or ())
        new = make_image_prompt(image, entity, weight, mask, crop, name=f"reference {len(prev) + 1} ({entity.strip()})")
        return io.NodeOutput(prev + (new,))


class MIPAdapterApply(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PersonalizeMIPAdapterApply",
            display_name="MIP-Adapter Apply",
            category="personalize/image prompts",
            description=(
                "MIP-Adapter: several reference objects in one picture without their identities blending. Every "
                "cross-attention layer adds each object's IP-Adapter attention with a per-pixel weight taken from "
                "its entity word's attention map (or its mask), so each reference lands on its own object. Works "
                "with any number of objects, any sampler and CFG; cond and uncond as in the paper."),
            inputs=[
                io.Model.Input("model", tooltip="The model to patch (a patched copy is returned)."),
                AdapterType.Input("adapter", tooltip="From MIP-Adapter Loader."),
                io.ClipVision.Input("clip_vision",
                                    tooltip="The image encoder the adapter was trained with: ViT-bigG for "
                                            "model_sdxl.bin / ip-adapter_sdxl; ViT-H for model_sdxl_plus.bin, the SD1.5 "
                                            "and the *_vit-h adapters."),
                io.Clip.Input("clip", tooltip="The CLIP your prompt is encoded with (to embed the entity words)."),
                io.String.Input("prompt", multiline=True, default="a cat and a dog on the beach",
                                tooltip="The positive prompt, exactly as in your CLIP Text Encode; every entity word "
                                        "must appear in it."),
                ImagePrompts.Input("image_prompts", tooltip="Objects from MIP-Adapter Reference (chain one per object)."),
                io.Float.Input("scale", default=-1.0, min=-1.0, max=3.0, step=0.05,
                               tooltip="Strength of the image prompts (lambda). -1 (any negative value): the variant's default, 0.75 for "
                                       "MIP-Adapter SDXL, 0.65 for SDXL plus, 1.0 for plain IP-Adapter weights."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the schedule at which the image prompts start acting."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the schedule at which the image prompts stop acting."),
            ],
            outputs=[io.Model.Output(tooltip="A patched copy of the input model with MIP-Adapter on its cross-attention; the input model is unchanged.")],
        )

    @classmethod
    def execute(cls, model, adapter, clip_vision, clip, prompt, image_prompts, scale=-1.0, start_percent=0.0,
                end_percent=1.0) -> io.NodeOutput:
        check_inputs(cls, locals())
        prompts = tuple(image_prompts or ())
        if not prompts:
            raise ValueError("image_prompts: none connected; add a MIP-Adapter Reference node per object")
        layers, key_projection = adapter_layers(model, adapter)
        sigmas = SigmaRange.from_percents(model.model.model_sampling, start_percent, end_percent)
        entities = encode_entities(clip, prompt, prompts, adapter.context_dim)
        tokens, uncond = encode_image_prompts(adapter, clip_vision, prompts)
        encoded = [EncodedPrompt(p.name, tok, uncond, ent, unent, p.mask, p.weight)
                   for p, tok, (ent, unent) in zip(prompts, tokens, entities)]
        lam = adapter.default_scale if scale < 0 else float(scale)
        tech = MultiImagePromptAttention(encoded, layers, key_projection, sigmas, lam)
        return io.NodeOutput(install_technique(model, tech))


NODES = [MIPAdapterLoader, MIPAdapterReference, MIPAdapterApply]
