"""Self-attention technique nodes: schema, input checks and wiring only."""
from __future__ import annotations

from comfy_api.latest import io

from ..attention.layers import PRESET_NAMES, SigmaRange, discover_attention_blocks, resolve_layers
from ..attention.mrsa import MultiReferenceAttention
from ..attention.patch import install_technique
from .references import References


def check_references(model, references, input_name="references"):
    refs = tuple(references or ())
    if not refs:
        raise ValueError(f"{input_name}: no references connected; add a Reference Encode node")
    want = model.model.latent_format.latent_channels
    for r in refs:
        if r.channels != want:
            raise ValueError(f"{input_name}: '{r.name}' was encoded by a VAE with {r.channels}-channel latents, "
                             f"but this model ({type(model.model).__name__}) works on {want}-channel latents; "
                             f"encode the reference with the VAE of the checkpoint you sample with")
    return refs


class MultiReferenceAttentionNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PersonalizeMultiReferenceAttention",
            display_name="Multi-Reference Attention (FreeCustom)",
            category="personalize/attention",
            description=(
                "FreeCustom's multi-reference self-attention (MRSA): in the chosen decoder blocks the image "
                "attends over its own tokens plus the masked tokens of every reference, each weighted by its "
                "reference weight. The references run once per step for all of them (cond only), inside the "
                "same UNet call as the image. Works with any sampler, scheduler, step count and batch size."),
            inputs=[
                io.Model.Input("model", tooltip="The model to patch (a patched copy is returned)."),
                References.Input("references", tooltip="References from Reference Encode (chain for several)."),
                io.Combo.Input("layers", options=PRESET_NAMES, default=PRESET_NAMES[0],
                               tooltip="Which self-attention blocks use the references. FreeCustom's SD1.5 default "
                                       "is output blocks 6-11; use an SDXL preset for SDXL models."),
                io.String.Input("custom_blocks", default="output:6-11",
                                tooltip="Used when layers is 'custom': blocks like 'output:6-11, middle:0, input:7'."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the schedule at which the references start acting."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the schedule at which the references stop acting."),
                io.Float.Input("style_fidelity", default=1.0, min=0.0, max=1.0, step=0.05,
                               tooltip="1: the negative (uncond) pass uses plain attention (FreeCustom's default). "
                                       "Below 1 it blends in MRSA over references run with the negative prompt."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                             tooltip="Seed of the fresh noise the references are re-noised with at each step."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, references, layers, custom_blocks="output:6-11", start_percent=0.0, end_percent=1.0,
                style_fidelity=1.0, seed=0) -> io.NodeOutput:
        refs = check_references(model, references)
        keys = resolve_layers(layers, custom_blocks, discover_attention_blocks(model.model.diffusion_model))
        sigmas = SigmaRange.from_percents(model.model.model_sampling, start_percent, end_percent)
        tech = MultiReferenceAttention(refs, keys, sigmas, style_fidelity, seed)
        return io.NodeOutput(install_technique(model, tech))


NODES = [MultiReferenceAttentionNode]
