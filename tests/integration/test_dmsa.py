"""FreeMix DMSA inside a real ComfyUI with the tiny random SD1.5 model. Skipped without ComfyUI."""
from __future__ import annotations

import pytest
import torch

from comfy_sampling import assert_same_sample, encode, sample
from comfy_techniques import DMSA_PROMPT as PROMPT
from comfy_techniques import dmsa_patch as dmsa

def test_dmsa_changes_the_sample_and_disabled_equals_plain(sd15, references):
    model, clip, vae = sd15
    cat, dog = references[:1], references[1:]
    pos, neg = encode(clip, PROMPT), encode(clip, "blurry")
    before = dict(model.model_options.get("transformer_options", {}))
    plain = sample(model, pos, neg, steps=4)
    mixed = sample(dmsa(model, clip, dog, cat), pos, neg, steps=4)
    assert (mixed - plain).abs().max() > 1e-3
    off = sample(dmsa(model, clip, dog, cat, structure_phase=False, appearance_phase=False), pos, neg, steps=4)
    assert_same_sample(off, plain, vae)
    only_structure = sample(dmsa(model, clip, dog, cat, appearance_phase=False), pos, neg, steps=4)
    assert (only_structure - mixed).abs().max() > 1e-4, "the appearance phase acts in the late steps"
    assert dict(model.model_options.get("transformer_options", {})) == before


def test_spatial_normalisation_option(sd15, references):
    model, clip, _ = sd15
    pos, neg = encode(clip, PROMPT), encode(clip, "")
    a = sample(dmsa(model, clip, references[1:], references[:1]), pos, neg, steps=3)
    b = sample(dmsa(model, clip, references[1:], references[:1], spatial_norm_start=0.0), pos, neg, steps=3)
    assert (a - b).abs().max() > 1e-4


def test_dmsa_bad_inputs(sd15, references):
    model, clip, _ = sd15
    with pytest.raises(ValueError, match="blend_word: not found in the prompt"):
        dmsa(model, clip, references[1:], references[:1], blend_word="giraffe")
    with pytest.raises(ValueError, match="blend_word: empty"):
        dmsa(model, clip, references[1:], references[:1], blend_word=" ")
    with pytest.raises(ValueError, match="structure: expected exactly one reference, got 2"):
        dmsa(model, clip, references, references[:1])
    with pytest.raises(ValueError, match="appearance: no references"):
        dmsa(model, clip, references[1:], ())
    # a multi-token blend word is found token by token
    from personalize_pack.references.prompt_tokens import blend_word_tokens
    tokens, n = blend_word_tokens(clip, "a watercolour teapot on a table", "watercolour teapot")
    assert len(tokens) >= 2 and tokens == sorted(tokens) and n >= 77


def test_dmsa_bad_settings(sd15, references):
    model, clip, _ = sd15
    with pytest.raises(ValueError, match="preset: unknown 'SD3'"):
        dmsa(model, clip, references[1:], references[:1], preset="SD3")
    with pytest.raises(ValueError, match="output:0"):      # the SDXL preset's blocks are missing in SD1.5
        dmsa(model, clip, references[1:], references[:1], preset="SDXL FreeMix analogue")
    with pytest.raises(ValueError, match="mask_threshold: must lie in 0..1"):
        dmsa(model, clip, references[1:], references[:1], mask_threshold=1.5)
    with pytest.raises(ValueError, match="start_percent/end_percent|must not be after"):
        dmsa(model, clip, references[1:], references[:1], appearance_start=0.9, appearance_end=0.2)


# ---------------------------------------------------------------------- runs leave nothing behind
# The blend-word maps are state of one sampling run: a run before (another scheduler, another step
# count) or a second KSampler on the same DMSA MODEL must not change the image.

def test_an_earlier_run_with_another_schedule_does_not_change_the_next(sd15, references):
    model, clip, _ = sd15
    pos, neg = encode(clip, PROMPT), encode(clip, "blurry")
    alone = sample(dmsa(model, clip, references[1:], references[:1]), pos, neg, steps=5, scheduler="karras")
    shared = dmsa(model, clip, references[1:], references[:1])
    for scheduler, steps in (("normal", 5), ("exponential", 5), ("karras", 4), ("sgm_uniform", 5)):
        sample(shared, pos, neg, steps=steps, scheduler=scheduler)
    after = sample(shared, pos, neg, steps=5, scheduler="karras")
    assert float((after - alone).abs().max()) == 0.0


def test_one_dmsa_model_feeding_two_samplers_gives_each_its_own_image(sd15, references):
    model, clip, _ = sd15
    pos, neg = encode(clip, PROMPT), encode(clip, "blurry")
    shared = dmsa(model, clip, references[1:], references[:1])
    first = sample(shared, pos, neg, steps=4, seed=1)
    second = sample(shared, pos, neg, steps=6, seed=2, scheduler="karras")
    assert float((sample(dmsa(model, clip, references[1:], references[:1]), pos, neg, steps=6, seed=2,
                         scheduler="karras") - second).abs().max()) == 0.0
    assert float((sample(shared, pos, neg, steps=4, seed=1) - first).abs().max()) == 0.0


# ---------------------------------------------------------------------- one prompt, not two copies

def _dmsa_node(model, clip, structure, appearance, **kw):
    from personalize_pack.nodes.attention import DisentangleMixingAttentionNode
    args = dict(prompt=PROMPT, blend_word="dog", preset="SD1.5 FreeMix")
    args.update(kw)
    return DisentangleMixingAttentionNode.execute(model, structure, appearance, clip, **args).result


def test_the_positive_output_is_the_prompt_as_clip_text_encode_makes_it(sd15, references):
    model, clip, _ = sd15
    patched, positive = _dmsa_node(model, clip, references[1:], references[:1])
    own = encode(clip, PROMPT)
    assert len(positive) == len(own) == 1
    assert float((positive[0][0] - own[0][0]).abs().max()) == 0.0
    neg = encode(clip, "blurry")
    assert float((sample(patched, positive, neg, steps=3) - sample(patched, own, neg, steps=3)).abs().max()) == 0.0


@pytest.mark.parametrize("sampled", [
    "a photo of a cat in the grass",                              # edited only in the Prompt node
    "a photo of a dog in the grass, " + "very detailed, " * 20,   # longer: 154 tokens against the node's 77
])
def test_sampling_another_prompt_than_the_nodes_is_a_clear_error(sd15, references, sampled):
    model, clip, _ = sd15
    patched, _ = _dmsa_node(model, clip, references[1:], references[:1])
    with pytest.raises(ValueError, match=r"prompt: the positive conditioning being sampled is not .*'a photo of a "
                                         r"dog in the grass'.*'positive' output"):
        sample(patched, encode(clip, sampled), encode(clip, "blurry"), steps=3)


def test_a_long_node_prompt_against_the_short_one_sampled_is_the_same_clear_error(sd15, references):
    # the case: a 154-token copy in the node against a 77-token conditioning
    model, clip, _ = sd15
    long_prompt = "very detailed, " * 20 + "a photo of a dog in the grass"
    patched, _ = _dmsa_node(model, clip, references[1:], references[:1], prompt=long_prompt)
    with pytest.raises(ValueError, match="prompt: the positive conditioning being sampled is not"):
        sample(patched, encode(clip, PROMPT), encode(clip, "blurry"), steps=3)


def test_the_prompt_is_not_checked_without_the_appearance_phase(sd15, references):
    # the blend word is read only by the appearance phase; structure alone works with any prompt
    model, clip, _ = sd15
    patched, _ = _dmsa_node(model, clip, references[1:], references[:1], appearance_phase=False)
    out = sample(patched, encode(clip, "a photo of a cat"), encode(clip, "blurry"), steps=3)
    assert torch.isfinite(out).all()
