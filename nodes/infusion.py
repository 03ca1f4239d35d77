"""Apply Infusion: a trained Infusion file (learned cross-attention offsets of one concept) on a
MODEL. Schema, input checks and wiring only (the work is in ``training/infusion.py`` and
``attention/infusion.py``)."""
from __future__ import annotations

import folder_paths
from comfy_api.latest import io

from ..attention.infusion import apply_infusion
from ..training.infusion import load_offsets_cached
from .checks import check_inputs
from .model_files import file_default, missing_file_message

FOLDER = "model_patches"              # core ComfyUI's folder for model patches


INFUSION_HINT = ("Put an Infusion file there: one trained with Train Infusion, or an official Infusion checkpoint "
                 "(.ckpt) of the zwl666666/infusion code")


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
                io.Combo.Input("infusion_name", options=files, default=file_default(files, FOLDER),
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
            outputs=[io.Model.Output(tooltip="A patched copy of the input model with the Infusion offsets; the input model is unchanged.")],
        )

    @classmethod
    def validate_inputs(cls, infusion_name=None):  # None: an empty folder's combo sends no value
        if not infusion_name or folder_paths.get_full_path(FOLDER, infusion_name) is None:
            return missing_file_message(FOLDER, infusion_name, INFUSION_HINT)
        return True

    @classmethod
    def execute(cls, model, infusion_name, clip, prompt, concept_word="", strength=1.0) -> io.NodeOutput:
        check_inputs(cls, locals())
        path = folder_paths.get_full_path(FOLDER, infusion_name) if infusion_name else None
        if path is None:
            raise FileNotFoundError("infusion_name: " + missing_file_message(FOLDER, infusion_name, INFUSION_HINT))
        loaded = load_offsets_cached(path, name=f"infusion_name: '{infusion_name}'")
        return io.NodeOutput(apply_infusion(model, loaded, clip, prompt, concept_word, strength,
                                            f"infusion_name: '{infusion_name}'"))

NODES = [InfusionApply]
