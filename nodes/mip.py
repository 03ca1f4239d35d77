"""MIP-Adapter nodes: loader, image prompt, apply. Schema, input checks and wiring only (the work
is in ``attention/ip_adapter.py``, ``attention/mip.py`` and ``references/image_prompt.py``)."""
from __future__ import annotations


import folder_paths
import torch
from comfy_api.latest import io

from ..attention.dmsa import find_token_positions
from ..attention.ip_adapter import load_adapter
from ..attention.layers import SigmaRange, transformer_blocks
from ..attention.mip import EncodedPrompt, MultiImagePromptAttention
from ..attention.patch import install_technique
from ..references.image_prompt import CROPS, framed, make_image_prompt, mean_colour_image
from .attention import prompt_token_ids
from .model_files import missing_file_message, register_folder

# cubiq's IPAdapter pack keeps its files in models/ipadapter; users already have them there.
register_folder("ipadapter")

AdapterType = io.Custom("PERSONALIZE_IP_ADAPTER")
ImagePrompts = io.Custom("PERSONALIZE_IMAGE_PROMPT")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)


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
                io.Combo.Input("adapter_name", options=files, default=files[0] if files else None,
                               tooltip="A file in ComfyUI/models/ipadapter (.safetensors or .bin)."),
            ],
            outputs=[AdapterType.Output(display_name="adapter"),
                     io.String.Output(display_name="info", tooltip="Which adapter variant was recognised.")],
        )

    @classmethod
    def validate_inputs(cls, adapter_name):
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
                io.Combo.Input("crop", options=list(CROPS), default="center",
                               tooltip="center: crop a non-square image to its centre square (like CLIP Vision "
                                       "Encode); pad: pad it to a square with white (MIP-Adapter's training crops)."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Region of the generated picture this object takes (any size; stretched to "
                                      "the picture). Overrides the entity word's attention map. One mask."),
                ImagePrompts.Input("image_prompts", optional=True,
                                   tooltip="Objects to chain onto; this node appends its own."),
            ],
            outputs=[ImagePrompts.Output(display_name="image_prompts")],
        )

    @classmethod
    def execute(cls, image, entity, weight=1.0, crop="center", mask=None, image_prompts=None) -> io.NodeOutput:
        prev = tuple(image_prompts or ())
        new = make_image_prompt(image, entity, weight, mask, crop, name=f"reference {len(prev) + 1} ({entity.strip()})")
        return io.NodeOutput(prev + (new,))


def cross_attention_layers(model) -> dict:
    """``{key: attn2 module}`` of the model's UNet in IP-Adapter's layer order."""
    dm = model.model.diffusion_model
    out = {k: getattr(tb, "attn2", None) for k, tb in transformer_blocks(dm).items()}
    out = {k: a for k, a in out.items() if a is not None and getattr(a, "to_k", None) is not None}
    if not out:
        raise ValueError(f"model: no UNet cross-attention layers found in {type(model.model).__name__}; "
                         f"MIP-Adapter needs an SD1.x/SD2.x/SDXL-style UNet model")
    return out


class UNetKeyProjection:
    """The UNet's own ``to_k`` of each cross-attention layer, called as a module at sampling time
    (so LoRA-patched and offloaded weights are handled by ComfyUI)."""

    def __init__(self, layers: dict):
        self.to_k = {k: a.to_k for k, a in layers.items()}

    def __call__(self, key, tokens: torch.Tensor) -> torch.Tensor:
        return self.to_k[key](tokens)


def encode_image_prompts(adapter, clip_vision, prompts) -> tuple[list, torch.Tensor]:
    """Image-prompt tokens ``[n_tok, ctx]`` per object (views averaged) and the empty image's tokens."""
    want = adapter.clip_output

    def feats(images, crop=True):
        out = clip_vision.encode_image(images, crop=crop)
        try:
            return out[want]
        except (KeyError, AttributeError):
            raise ValueError(f"clip_vision: this CLIP vision model gives no '{want}', which the adapter needs") from None

    tokens = []
    for p in prompts:
        with torch.no_grad():
            tokens.append(adapter.project(feats(framed(p)).float().cpu()).mean(0))
    with torch.no_grad():
        if want == "image_embeds":
            uncond = adapter.project(torch.zeros(1, adapter.clip_width))[0]
        else:
            mean = getattr(clip_vision, "image_mean", CLIP_MEAN)
            size = int(getattr(clip_vision, "image_size", 224))
            uncond = adapter.project(feats(mean_colour_image(mean, size)).float().cpu())[0]
    return tokens, uncond


def encode_entities(clip, prompt: str, prompts, context_dim: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per object: the entity word's embedding tokens ``1..L`` (after the start token) for the
    positive side and the empty prompt's tokens ``1..L`` for the negative side (§3.2)."""
    if not (prompt or "").strip():
        raise ValueError("prompt: empty; give the positive prompt, exactly as in your CLIP Text Encode")
    prompt_ids = prompt_token_ids(clip, prompt)
    special = set(prompt_token_ids(clip, ""))
    empty = clip.encode_from_tokens(clip.tokenize(""))
    if empty.shape[-1] != context_dim:
        raise ValueError(f"clip: its conditioning is {empty.shape[-1]} wide but the adapter was trained for "
                         f"{context_dim}; use the CLIP of the checkpoint the adapter belongs to")
    out = []
    for p in prompts:
        word_ids = [t for t in prompt_token_ids(clip, p.entity) if t not in special]
        find_token_positions(prompt_ids, word_ids, word=f"entity '{p.entity}' of {p.name}")
        n = len(word_ids)
        if n > empty.shape[1] - 2:
            raise ValueError(f"entity '{p.entity}': {n} tokens is too long; use the one or two words naming it")
        cond = clip.encode_from_tokens(clip.tokenize(p.entity))
        out.append((cond[0, 1:1 + n].float().cpu(), empty[0, 1:1 + n].float().cpu()))
    return out


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
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, adapter, clip_vision, clip, prompt, image_prompts, scale=-1.0, start_percent=0.0,
                end_percent=1.0) -> io.NodeOutput:
        prompts = tuple(image_prompts or ())
        if not prompts:
            raise ValueError("image_prompts: none connected; add a MIP-Adapter Reference node per object")
        attn2 = cross_attention_layers(model)
        widths = {k: (int(a.to_k.weight.shape[0]), int(a.to_k.weight.shape[1])) for k, a in attn2.items()}
        mapping = adapter.layer_keys(widths)
        sigmas = SigmaRange.from_percents(model.model.model_sampling, start_percent, end_percent)
        entities = encode_entities(clip, prompt, prompts, adapter.context_dim)
        tokens, uncond = encode_image_prompts(adapter, clip_vision, prompts)
        encoded = [EncodedPrompt(p.name, tok, uncond, ent, unent, p.mask, p.weight)
                   for p, tok, (ent, unent) in zip(prompts, tokens, entities)]
        layers = {}
        for key, n in mapping.items():
            wk, wv, gate = adapter.layers[n]
            layers[key] = (wk, wv, gate)
        lam = adapter.default_scale if scale < 0 else float(scale)
        tech = MultiImagePromptAttention(encoded, layers, UNetKeyProjection({k: attn2[k] for k in layers}), sigmas, lam)
        return io.NodeOutput(install_technique(model, tech))


NODES = [MIPAdapterLoader, MIPAdapterReference, MIPAdapterApply]
