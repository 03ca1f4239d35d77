"""Native reference control nodes: per-reference subject masks, weights and target regions for the
reference images FLUX.1 Kontext, FLUX.2 and Qwen-Image-Edit take themselves. Schema, input checks
and wiring only; the math is ``attention/native_refs.py``.

Design: the references stay where the user already put them (core's ``ReferenceLatent`` chain, or
``TextEncodeQwenImageEditPlus``), and this is a MODEL patch that takes one control per reference
in the order they were added. The attention that needs the controls lives in the model, and the
same controls then apply to the positive and the negative conditioning (which usually carry the
same references), whatever node put them there.
"""
from __future__ import annotations

from comfy_api.latest import io

from ..attention.families import native_reference_spec
from ..attention.install import install_technique
from ..attention.native_refs import NativeReferenceControl, ReferenceControl
from ..attention.patch import SigmaRange
from ..references.masks import as_mask_batch
from .checks import check_inputs

NativeReferences = io.Custom("PERSONALIZE_NATIVE_REFERENCES")
MAX_WEIGHT = 10.0


def _one_mask(mask, name: str):
    if mask is None:
        return None
    m = as_mask_batch(mask, name)
    if m.shape[0] != 1:
        raise ValueError(f"{name}: expected one mask, got a batch of {m.shape[0]}; chain one Native Reference node "
                         f"per reference")
    return m[0]


class NativeReferenceNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PersonalizeNativeReference",
            display_name="Native Reference (mask, weight, region)",
            category="personalize/native references",
            description=(
                "The control of one reference image of FLUX.1 Kontext, FLUX.2 or Qwen-Image-Edit: which part of it is "
                "the subject, how strongly it counts, and where in the output it may act. Chain one node per "
                "reference, in the order the references were added (the first ReferenceLatent, or image1 of "
                "TextEncodeQwenImageEditPlus, first), then connect the chain to Native Reference Control."),
            inputs=[
                io.Float.Input("weight", default=1.0, min=0.0, max=MAX_WEIGHT, step=0.05,
                               tooltip="How strongly the image attends to this reference: its attention is "
                                       "multiplied by the weight before normalising. 1 = the model as trained, "
                                       "0 = the reference is ignored, 2 = twice its share."),
                io.Mask.Input("subject_mask", optional=True,
                              tooltip="The subject on the reference image (any size, same aspect). Reference tokens "
                                      "outside it are not attended, so its background stays out of the image. "
                                      "Leave empty to use the whole reference."),
                io.Mask.Input("target_region", optional=True,
                              tooltip="Where in the output this reference may act (same aspect as the output). Only "
                                      "the image inside the region attends to it, so two people in one prompt stop "
                                      "blending. Leave empty for everywhere."),
                NativeReferences.Input("previous", optional=True,
                                       tooltip="The controls of the references added before this one."),
            ],
            outputs=[NativeReferences.Output(display_name="native_references",
                                             tooltip="The chain of reference controls so far, this one last.")],
        )

    @classmethod
    def execute(cls, weight=1.0, subject_mask=None, target_region=None, previous=None) -> io.NodeOutput:
        checked = check_inputs(cls, locals())
        subject_mask, target_region = checked["subject_mask"], checked["target_region"]
        if not 0.0 <= float(weight) <= MAX_WEIGHT:
            raise ValueError(f"weight: expected 0..{MAX_WEIGHT}, got {weight}")
        chain = tuple(previous or ())
        control = ReferenceControl(_one_mask(subject_mask, "subject_mask"), float(weight),
                                   _one_mask(target_region, "target_region"))
        if control.mask is not None and not bool((control.mask > 0).any()):
            raise ValueError(f"subject_mask: the mask of reference {len(chain) + 1} is empty; it would remove the "
                             f"reference (use weight 0 for that)")
        return io.NodeOutput(chain + (control,))


class NativeReferenceControlNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PersonalizeNativeReferenceControl",
            display_name="Native Reference Control",
            category="personalize/native references",
            description=(
                "Per-reference subject masks, weights and target regions on the reference images that FLUX.1 "
                "Kontext, FLUX.2 dev/klein (ReferenceLatent) and Qwen-Image-Edit (TextEncodeQwenImageEditPlus) take "
                "natively. It changes the model's own attention to the reference tokens in every block, without an "
                "extra model pass. Neutral controls (no masks, weight 1, no regions) give the model's "
                "native result exactly."),
            inputs=[
                io.Model.Input("model", tooltip="A FLUX.1 Kontext, FLUX.2 or Qwen-Image-Edit model (a patched copy is "
                                                "returned)."),
                NativeReferences.Input("native_references",
                                       tooltip="One control per reference image, from a chain of Native Reference "
                                               "nodes in the order the references were added."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the schedule at which the controls start acting."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the schedule at which the controls stop acting (the model's "
                                       "native attention after it)."),
            ],
            outputs=[io.Model.Output(tooltip="A patched copy of the input model with the reference controls; the input model is unchanged.")],
        )

    @classmethod
    def execute(cls, model, native_references, start_percent=0.0, end_percent=1.0) -> io.NodeOutput:
        check_inputs(cls, locals())
        controls = tuple(native_references or ())
        if not controls or not all(isinstance(c, ReferenceControl) for c in controls):
            raise ValueError("native_references: connect a chain of Native Reference nodes, one per reference image")
        spec = native_reference_spec(model.model.diffusion_model)
        sigmas = SigmaRange.from_percents(model.model.model_sampling, start_percent, end_percent)
        tech = NativeReferenceControl(controls, spec, spec.keys(), sigmas)
        return io.NodeOutput(install_technique(model, tech))


NODES = [NativeReferenceNode, NativeReferenceControlNode]
