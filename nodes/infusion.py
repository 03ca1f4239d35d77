"""Apply Infusion: a trained Infusion file (learned cross-attention offsets of one concept) on a
MODEL. Schema, input checks and wiring only (the work is in ``training/infusion.py`` and
``attention/infusion.py``)."""
from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io

from ..attention.infusion import InfusionAttention
from ..attention.layers import transformer_blocks
from ..attention.patch import install_technique
from ..training.infusion import FAMILIES, concept_token_index, load_offsets, token_ids
from .folders import folder_list

FOLDER = "model_patches"              # core ComfyUI's folder for model patches
_ENCODER = {"SD1.x": "l", "SD2.x": "h"}  # the CLIP that conditions each family, as clip.tokenize names it
_cache: dict = {}


def missing_file_message(name: str) -> str:
    what = f"{name!r} is not" if name else "no file is"
    return (f"{what} in the model_patches folder ({folder_list(FOLDER)}). Put an Infusion file there: one trained "
            f"with Train Infusion, or an official Infusion checkpoint (.ckpt) of the zwl666666/infusion code")


def model_config_name(model) -> str:
    cfg = getattr(getattr(model, "model", None), "model_config", None)
    return type(cfg).__name__ if cfg is not None else type(getattr(model, "model", model)).__name__


def cross_attention_widths(model) -> tuple[dict, str]:
    """``({layer key: attn2 inner width}, family)`` of an SD1.x/SD2.x UNet; a clear error naming
    the model otherwise."""
    config = model_config_name(model)
    dm = getattr(getattr(model, "model", None), "diffusion_model", None)
    blocks = transformer_blocks(dm) if dm is not None else {}
    layers = {k: getattr(tb, "attn2", None) for k, tb in blocks.items()}
    layers = {k: a for k, a in layers.items() if a is not None and getattr(a, "to_k", None) is not None}
    if not layers:
        raise ValueError(f"model: Infusion supports SD1.x and SD2.x UNet models; this is a {config} model without "
                         f"UNet cross-attention layers")
    widths, contexts = {}, set()
    for k, a in layers.items():
        w = a.to_k.weight
        widths[k] = int(getattr(a.to_k, "out_features", w.shape[0]))
        contexts.add(int(getattr(a.to_k, "in_features", w.shape[1])))
    family = FAMILIES.get(next(iter(contexts))) if len(contexts) == 1 else None
    if family is None:
        ctx = ", ".join(str(c) for c in sorted(contexts))
        xl = " (the SDXL family)" if contexts == {2048} else ""
        raise ValueError(f"model: Infusion supports SD1.x and SD2.x models (768- or 1024-wide text conditioning); "
                         f"this is a {config} model with {ctx}-wide conditioning{xl}. The official Infusion code has no "
                         f"SDXL or FLUX version")
    return widths, family


def load_cached(path: str, name: str):
    st = os.stat(path)
    ck = (path, st.st_mtime_ns, st.st_size)
    hit = _cache.get(ck)
    if hit is None:
        hit = load_offsets(path, name=f"infusion_name: '{name}'")
        _cache.clear()
        _cache[ck] = hit
    return hit


def concept_position(clip, prompt: str, word: str, family: str) -> tuple[int, int]:
    """``(index of the concept word's first token, token count)`` in the prompt's conditioning, by
    the CLIP's own tokenizer (long prompts: chunks of 77 concatenated, so chunk c, index i is
    77 c + i)."""
    if not (prompt or "").strip():
        raise ValueError("prompt: empty; give the positive prompt you sample with, exactly as in your CLIP Text Encode")
    tokens = clip.tokenize(prompt)
    encoder = _ENCODER[family]
    if encoder not in tokens:
        if len(tokens) != 1:
            raise ValueError(f"clip: its tokenizer has the encoders {', '.join(sorted(tokens))}, not the {family} "
                             f"text encoder; use the CLIP of your {family} checkpoint")
        encoder = next(iter(tokens))
    ids = token_ids(tokens, encoder)
    special = token_ids(clip.tokenize(""), encoder)
    index = concept_token_index(ids, clip.tokenize(word), special, word=f"concept_word '{word}'", encoder=encoder)
    return index, len(ids)


class InfusionApply(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        files = folder_paths.get_filename_list(FOLDER)
        return io.Schema(
            node_id="PersonalizeApplyInfusion",
            display_name="Apply Infusion",
            category="personalize/infusion",
            description=(
                "Infusion: a concept learned as two small vectors per cross-attention layer, added to the key and "
                "value of the concept word's token in the conditional prompt (the negative prompt is untouched). "
                "Loads a file trained with Train Infusion or an official Infusion checkpoint from "
                "ComfyUI/models/model_patches. SD1.x and SD2.x models."),
            inputs=[
                io.Model.Input("model", tooltip="The SD1.x/SD2.x model the file was trained on (a patched copy is "
                                                "returned)."),
                io.Combo.Input("infusion_name", options=files, default=files[0] if files else None,
                               tooltip="An Infusion file in ComfyUI/models/model_patches (.safetensors from Train "
                                       "Infusion, or an official .ckpt)."),
                io.Clip.Input("clip", tooltip="The CLIP your prompt is encoded with (its tokenizer finds the concept "
                                              "word's token)."),
                io.String.Input("prompt", multiline=True, default="a photo of a cat on the beach",
                                tooltip="The positive prompt you sample with, exactly as in your CLIP Text Encode; it "
                                        "must contain the concept word."),
                io.String.Input("concept_word", default="",
                                tooltip="The word of the prompt that names the concept: the super-class word it was "
                                        "trained with (e.g. 'cat'). Empty: the word stored in the file (files from "
                                        "Train Infusion store it; official checkpoints do not)."),
                io.Float.Input("strength", default=1.0, min=-2.0, max=5.0, step=0.05,
                               tooltip="Multiplier on the learned offsets: 1 is the trained concept, 0 the plain "
                                       "model."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def validate_inputs(cls, infusion_name):
        if not infusion_name or folder_paths.get_full_path(FOLDER, infusion_name) is None:
            return missing_file_message(infusion_name)
        return True

    @classmethod
    def execute(cls, model, infusion_name, clip, prompt, concept_word="", strength=1.0) -> io.NodeOutput:
        path = folder_paths.get_full_path(FOLDER, infusion_name) if infusion_name else None
        if path is None:
            raise FileNotFoundError("infusion_name: " + missing_file_message(infusion_name))
        widths, family = cross_attention_widths(model)
        loaded = load_cached(path, infusion_name)
        if loaded.family is not None and loaded.family != family:
            raise ValueError(f"infusion_name: '{infusion_name}' was trained on an {loaded.family} model; this is an "
                             f"{family} model ({model_config_name(model)})")
        loaded.offsets.check_widths(widths, name=f"infusion_name: '{infusion_name}'")
        word = (concept_word or "").strip() or loaded.concept_word
        if not word:
            raise ValueError(f"concept_word: empty, and '{infusion_name}' stores no concept word (an official "
                             f"checkpoint); give the super-class word it was trained with, e.g. 'cat'")
        position, length = concept_position(clip, prompt, word, family)
        tech = InfusionAttention(loaded.offsets.offsets(), position, length, strength)
        return io.NodeOutput(install_technique(model, tech))


NODES = [InfusionApply]
