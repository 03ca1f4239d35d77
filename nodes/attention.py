"""Self-attention technique nodes: schema, input checks and wiring only."""
from __future__ import annotations

from comfy_api.latest import io

from ..attention.blocks import DMSA_BLOCKS, FASA_BLOCKS, MRSA_BLOCKS, prompt_encoders, resolve
from ..attention.dit import POSITIONS, REFERENCE_TOKENS, SHIFTED, SUBJECT, WHOLE
from ..attention.dmsa import DisentangleMixingAttention
from ..attention.fasa import FoundationAwareAttention, install_fasa
from ..attention.install import install_technique
from ..attention.mrsa import MultiReferenceAttention
from ..attention.patch import SigmaRange
from ..references.prompt_tokens import blend_word_tokens
from .checks import check_inputs
from .types import References, conditioning_tensor


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


LAYER_OPTIONS = list(MRSA_BLOCKS.options)
FASA_PRESETS = list(FASA_BLOCKS.options)
POSITIONS_TOOLTIP = ("RoPE models only (FLUX, FLUX.2, Chroma, Qwen-Image): where the reference tokens sit for the image's attention (RoPE). 'shifted': each "
                     "reference stands beside the image as in a wide picture, so the subject is matched by content "
                     "wherever it is (the default; closest to FreeCustom's UNet). 'aligned': the reference's grid "
                     "lies on the image's, so tokens prefer the reference at the same place (copies the layout).")


TOKENS_TOOLTIP = ("FLUX, FLUX.2 and Qwen-Image only: 'whole image' runs every reference on all its tokens (as FreeCustom does). 'subject "
                  "only (faster)' runs each reference on the tokens its mask touches, so a reference costs about "
                  "its subject's share of the image; the subject's features then come without its background "
                  "(with a full mask both are the same).")


def _subject_only(reference_tokens) -> bool:
    if reference_tokens not in REFERENCE_TOKENS:
        raise ValueError(f"reference_tokens: unknown '{reference_tokens}'; choose one of {REFERENCE_TOKENS}")
    return reference_tokens == SUBJECT


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
                "same model call as the image. Works with any sampler, scheduler, step count and batch size, on "
                "SD1.x/SDXL UNets and on FLUX.1, FLUX.2, Chroma, Qwen-Image and SD3, where the image tokens of the chosen DiT "
                "blocks attend over their own text and image tokens plus the references' image tokens."),
            inputs=[
                io.Model.Input("model", tooltip="The model to patch (a patched copy is returned)."),
                References.Input("references", tooltip="References from Reference Encode (chain for several)."),
                io.Combo.Input("layers", options=LAYER_OPTIONS, default=LAYER_OPTIONS[0],
                               tooltip="Which self-attention blocks use the references. FreeCustom's SD1.5 default "
                                       "is output blocks 6-11; use an SDXL preset for SDXL models, the preset of "
                                       "your DiT's family for FLUX, FLUX.2, Chroma (single blocks: the later half "
                                       "of the network), SD3 or Qwen-Image (the later half of the blocks)."),
                io.String.Input("custom_blocks", advanced=True, default="output:6-11",
                                tooltip="Used when layers is 'custom': blocks like 'output:6-11, middle:0, input:7' "
                                        "(UNet), 'double:0-18, single:0-37' (FLUX) or 'joint:12-23' (SD3)."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the schedule at which the references start acting."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the schedule at which the references stop acting."),
                io.Float.Input("style_fidelity", advanced=True, default=1.0, min=0.0, max=1.0, step=0.05,
                               tooltip="1: the negative (uncond) pass uses plain attention (FreeCustom's default). "
                                       "Below 1 it blends in MRSA over references run with the negative prompt."),
                io.Int.Input("seed", advanced=True, default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                             tooltip="Seed of the fresh noise the references are re-noised with at each step."),
                io.Combo.Input("reference_positions", advanced=True, options=POSITIONS, default=SHIFTED, optional=True,
                               tooltip=POSITIONS_TOOLTIP),
                io.Combo.Input("reference_tokens", advanced=True, options=REFERENCE_TOKENS, default=WHOLE, optional=True,
                               tooltip=TOKENS_TOOLTIP),
            ],
            outputs=[io.Model.Output(tooltip="A patched copy of the input model with MRSA (multi-reference self-attention) on; the input model is unchanged.")],
        )

    @classmethod
    def execute(cls, model, references, layers, custom_blocks="output:6-11", start_percent=0.0, end_percent=1.0,
                style_fidelity=1.0, seed=0, reference_positions=SHIFTED, reference_tokens=WHOLE) -> io.NodeOutput:
        check_inputs(cls, locals())
        refs = check_references(model, references)
        spec, keys = resolve(model.model.diffusion_model, MRSA_BLOCKS, layers, custom_blocks)
        sigmas = SigmaRange.from_percents(model.model.model_sampling, start_percent, end_percent)
        tech = MultiReferenceAttention(refs, keys, sigmas, style_fidelity, seed, dit=spec,
                                       positions=reference_positions,
                                       subject_tokens=_subject_only(reference_tokens))
        return io.NodeOutput(install_technique(model, tech))


def _single(references, input_name):
    refs = tuple(references or ())
    if len(refs) != 1:
        raise ValueError(f"{input_name}: expected exactly one reference, got {len(refs)}; connect a single "
                         f"Reference Encode (with a one-image batch)")
    return refs[0]


class DisentangleMixingAttentionNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        presets = list(DMSA_BLOCKS.options)
        return io.Schema(
            node_id="PersonalizeDisentangleMixingAttention",
            display_name="Disentangle-Mixing Attention (FreeMix)",
            category="personalize/attention",
            description=(
                "FreeMix's disentangle-mixing self-attention (DMSA): the structure (shape, pose, layout) of one "
                "reference and the appearance (texture, identity) of another. Early in the schedule the image "
                "attends to the structure reference's masked tokens; later, in the highest-resolution decoder "
                "blocks, the region of the blend word (found from its cross-attention maps) takes its keys and "
                "values from the appearance reference's subject."),
            inputs=[
                io.Model.Input("model", tooltip="The model to patch (a patched copy is returned)."),
                References.Input("structure", tooltip="The reference that gives shape, pose and layout (Reference "
                                                       "Encode with its subject mask and caption)."),
                References.Input("appearance", tooltip="The reference that gives texture and identity (Reference "
                                                        "Encode with its subject mask and caption)."),
                io.Clip.Input("clip", tooltip="The CLIP your prompt is encoded with (to find the blend word's tokens)."),
                io.String.Input("prompt", multiline=True, default="a photo of a dog in the grass",
                                tooltip="The positive prompt. Connect the 'positive' output to the sampler, or write "
                                        "exactly this in your CLIP Text Encode: sampling another prompt is an "
                                        "error."),
                io.String.Input("blend_word", default="dog",
                                tooltip="The word of the prompt whose region takes the appearance (several tokens "
                                        "are fine; every occurrence counts)."),
                io.Combo.Input("preset", options=presets, default=presets[0],
                               tooltip="Blocks of the two phases and of the blend map: FreeMix's SD1.5 defaults, "
                                       "the SDXL analogue, the FLUX and Chroma analogues (structure in the single "
                                       "blocks, appearance in their last third, blend map from the double blocks) or "
                                       "the SD3 analogue (later half, last third, first half of the joint blocks)."),
                io.Float.Input("structure_start", advanced=True, default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the schedule where the structure phase starts."),
                io.Float.Input("structure_end", advanced=True, default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the schedule where the structure phase ends."),
                io.Float.Input("appearance_start", default=0.4, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the schedule where the appearance phase starts (FreeMix: step "
                                       "20 of 50). From then on the appearance blocks use it instead of the "
                                       "structure phase."),
                io.Float.Input("appearance_end", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the schedule where the appearance phase ends."),
                io.Boolean.Input("structure_phase", advanced=True, default=True, tooltip="Off: skip the structure phase."),
                io.Boolean.Input("appearance_phase", advanced=True, default=True, tooltip="Off: skip the appearance phase."),
                io.Float.Input("structure_weight", default=3.0, min=-20.0, max=20.0, step=0.1,
                               tooltip="Logit bias inside the structure reference's mask (FreeMix: 3.0)."),
                io.Float.Input("mask_threshold", advanced=True, default=0.2, min=0.0, max=1.0, step=0.01,
                               tooltip="The blend word's normalised cross-attention map above this is the "
                                       "subject region (FreeMix: 0.2)."),
                io.Float.Input("spatial_norm_start", advanced=True, default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the schedule from which the structure phase standardises "
                                       "queries and structure keys per channel (the paper's spatial "
                                       "normalisation, removing residual appearance). 1.0 = off, FreeMix's "
                                       "default."),
                io.Int.Input("seed", advanced=True, default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                             tooltip="Seed of the fresh noise the references are re-noised with at each step."),
                io.Combo.Input("reference_positions", advanced=True, options=POSITIONS, default=SHIFTED, optional=True,
                               tooltip=POSITIONS_TOOLTIP + " Applies to the structure reference; appearance tokens "
                                                           "always take the position they are put at."),
                io.Combo.Input("reference_tokens", advanced=True, options=REFERENCE_TOKENS, default=WHOLE, optional=True,
                               tooltip=TOKENS_TOOLTIP),
            ],
            outputs=[io.Model.Output(tooltip="A patched copy of the input model with DMSA (structure and appearance references) on; the input model is unchanged."),
                     io.Conditioning.Output(display_name="positive",
                                            tooltip="The prompt encoded with the clip, as CLIP Text Encode does: "
                                                    "connect it to the sampler's positive, so the prompt sampled "
                                                    "is the one the blend word is found in.")],
        )

    @classmethod
    def execute(cls, model, structure, appearance, clip, prompt, blend_word, preset, structure_start=0.0,
                structure_end=1.0, appearance_start=0.4, appearance_end=1.0, structure_phase=True,
                appearance_phase=True, structure_weight=3.0, mask_threshold=0.2, spatial_norm_start=1.0,
                seed=0, reference_positions=SHIFTED, reference_tokens=WHOLE) -> io.NodeOutput:
        check_inputs(cls, locals())
        s_ref = _single(check_references(model, structure, "structure"), "structure")
        a_ref = _single(check_references(model, appearance, "appearance"), "appearance")
        spec, keys = resolve(model.model.diffusion_model, DMSA_BLOCKS, preset)
        ms = model.model.model_sampling
        s_range = SigmaRange.from_percents(ms, structure_start, structure_end) if structure_phase else None
        a_range = SigmaRange.from_percents(ms, appearance_start, appearance_end) if appearance_phase else None
        n_range = SigmaRange.from_percents(ms, spatial_norm_start, 1.0) if spatial_norm_start < 1.0 else None
        tokens, n_tokens = (blend_word_tokens(clip, prompt, blend_word, prompt_encoders(spec)) if appearance_phase
                            else ((), None))
        positive = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
        tech = DisentangleMixingAttention(s_ref, a_ref, *keys, s_range, a_range, blend_tokens=tokens,
                                          prompt_tokens=n_tokens, structure_weight=structure_weight,
                                          threshold=mask_threshold, norm_range=n_range, seed=seed, dit=spec,
                                          positions=reference_positions,
                                          subject_tokens=_subject_only(reference_tokens),
                                          prompt_conds=[c[0] for c in positive], prompt_text=prompt)
        return io.NodeOutput(install_technique(model, tech), positive)


FOUNDATION_MODES = ["prompt without identity (PhotoMaker)", "model without identity patches (InstantID-style)",
                    "model without the LoRA hooks (identity LoRA)"]


class FoundationAwareAttentionNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PersonalizeFoundationAwareAttention",
            display_name="Foundation-Aware Attention (FreeCure)",
            category="personalize/attention",
            description=(
                "FreeCure's foundation-aware self-attention (FASA): gives the prompt back its control over facial "
                "attributes (hair, eyes, glasses, ...) in identity models such as PhotoMaker or InstantID. A "
                "foundation branch with the identity switched off runs beside your image from the same noise; in "
                "the late decoder blocks your image attends to the foundation image inside the attribute masks. "
                "Make the masks on the foundation image of a first run (same seed, the foundation conditioning), "
                "e.g. with Face Attribute Mask."),
            inputs=[
                io.Model.Input("model", tooltip="The identity model to patch (a patched copy is returned): e.g. the "
                                                "checkpoint used with PhotoMaker Encode, or the model from an "
                                                "InstantID apply node."),
                io.Mask.Input("masks", tooltip="Attribute masks on the foundation image (one, or one per image of the "
                                               "batch), e.g. from Face Attribute Mask. Same aspect ratio as the image."),
                io.Combo.Input("foundation_mode", options=FOUNDATION_MODES, default=FOUNDATION_MODES[0],
                               tooltip="How the identity is switched off in the foundation branch: PhotoMaker: the "
                                       "same model with the prompt without the identity embedding (connect it to "
                                       "'foundation'); InstantID-style: the branch runs without other packs' "
                                       "cross-attention patches (where the identity adapter lives); identity LoRA: "
                                       "the branch runs without the LoRA set on the prompt's conditioning as a hook "
                                       "(Create Hook LoRA + Cond Set Props), i.e. on the base model."),
                io.Conditioning.Input("foundation", optional=True,
                                      tooltip="The foundation branch's positive conditioning: CLIP Text Encode of "
                                              "your prompt (trigger word included) without PhotoMaker's identity. "
                                              "Required for the PhotoMaker mode; optional for the others (without "
                                              "it the foundation branch reads your prompt)."),
                io.Float.Input("weight", default=1.5, min=-10.0, max=10.0, step=0.1,
                               tooltip="Logit bias of the foundation tokens inside the masks (FreeCure: 1.5 for SDXL, "
                                       "0.5 for SD1.x). 0 switches FASA off."),
                io.Combo.Input("layers", options=FASA_PRESETS, default=FASA_PRESETS[0],
                               tooltip="Self-attention blocks FASA acts in: FreeCure's SDXL choice (transformer "
                                       "blocks 50-69), its SD1.x choice (output 6-11), the FLUX/SD3 analogue (the "
                                       "last 30% of the blocks; FLUX.1: single 20-37), all decoder blocks, or custom."),
                io.String.Input("custom_blocks", advanced=True, default="output:6-11",
                                tooltip="Used when layers is 'custom': blocks like 'output:3-5, output:2'."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the schedule at which FASA starts (FreeCure: all steps)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the schedule at which FASA stops."),
                io.Float.Input("mask_threshold", advanced=True, default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="Mask values below this are outside the attributes."),
            ],
            outputs=[io.Model.Output(tooltip="A patched copy of the input model with FreeCure's foundation-aware attention on; the input model is unchanged.")],
        )

    @classmethod
    def execute(cls, model, masks, foundation_mode=FOUNDATION_MODES[0], foundation=None, weight=1.5,
                layers=FASA_PRESETS[0], custom_blocks="output:6-11", start_percent=0.0, end_percent=1.0,
                mask_threshold=0.5) -> io.NodeOutput:
        checked = check_inputs(cls, locals())
        masks = checked["masks"]
        if foundation_mode not in FOUNDATION_MODES:
            raise ValueError(f"foundation_mode: unknown '{foundation_mode}'; choose one of {FOUNDATION_MODES}")
        strip = foundation_mode == FOUNDATION_MODES[1]
        hooks = foundation_mode == FOUNDATION_MODES[2]
        cond = None
        if foundation is not None:
            cond = conditioning_tensor(foundation, "foundation", first_row=False)
        elif not strip and not hooks:
            raise ValueError("foundation: not connected; the PhotoMaker mode needs the prompt without the identity "
                             "(CLIP Text Encode of the same text) as the foundation conditioning")
        spec, keys = resolve(model.model.diffusion_model, FASA_BLOCKS, layers, custom_blocks)
        sigmas = SigmaRange.from_percents(model.model.model_sampling, start_percent, end_percent)
        tech = FoundationAwareAttention(cond, masks, weight, keys, sigmas, strip_patches=strip,
                                        mask_threshold=mask_threshold, dit=spec, strip_hooks=hooks)
        return io.NodeOutput(install_fasa(model, tech))


NODES = [MultiReferenceAttentionNode, DisentangleMixingAttentionNode, FoundationAwareAttentionNode]
