"""The pack's self-attention technique nodes applied the way the integration tests apply them (their
defaults spelled out once): MRSA and DMSA on the tiny SD1.5, and on the tiny FLUX with its guidance and
sampling settings."""
from __future__ import annotations

import torch

from comfy_sampling import encode

SD15_MRSA = "SD1.5 FreeCustom (output 6-11)"
DMSA_PROMPT = "a photo of a dog in the grass"
FLUX_SINGLE = "FLUX dev/schnell: single blocks"
FLUX_DOUBLE = "FLUX dev/schnell: double blocks"
FLUX_ALL = "FLUX dev/schnell: all blocks"


def mrsa_patch(model, refs, preset=SD15_MRSA, **kw):
    """Multi-Reference Attention over the whole schedule, style fidelity 1, seed 0 unless ``kw`` says."""
    from personalize_pack.nodes.attention import MultiReferenceAttentionNode
    args = dict(custom_blocks="", start_percent=0.0, end_percent=1.0, style_fidelity=1.0, seed=0)
    args.update(kw)
    return MultiReferenceAttentionNode.execute(model, refs, preset, **args).result[0]


def dmsa_patch(model, clip, structure, appearance, **kw):
    """Disentangle-Mixing Attention with FreeMix's SD1.5 preset, blending "dog" of ``DMSA_PROMPT``."""
    from personalize_pack.nodes.attention import DisentangleMixingAttentionNode
    args = dict(prompt=DMSA_PROMPT, blend_word="dog", preset="SD1.5 FreeMix")
    args.update(kw)
    return DisentangleMixingAttentionNode.execute(model, structure, appearance, clip, **args).result[0]


def guided(cond, value=3.5):
    import node_helpers
    return node_helpers.conditioning_set_values(cond, {"guidance": value})


def flux_sample(model, pos, neg, cfg=1.0, batch=1, steps=3, size=(8, 8), seed=3):
    import comfy.sample
    latent = torch.zeros(batch, 16, *size)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", pos, neg, latent, disable_pbar=True,
                               seed=seed)


def flux_mrsa(model, refs, preset=FLUX_SINGLE, positions="shifted (side by side)", **kw):
    return mrsa_patch(model, refs, preset, reference_positions=positions, **kw)


def flux_prompts(clip):
    return guided(encode(clip, "a cat and a dog on a sofa")), guided(encode(clip, "blurry"))


def flux_dmsa(model, clip, structure, appearance, prompt, **kw):
    from personalize_pack.nodes.attention import DisentangleMixingAttentionNode
    args = dict(blend_word="cat", preset="FLUX dev/schnell FreeMix analogue", appearance_start=0.3)
    args.update(kw)
    return DisentangleMixingAttentionNode.execute(model, structure, appearance, clip, prompt, **args).result[0]
