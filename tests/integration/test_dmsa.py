"""FreeMix DMSA inside a real ComfyUI with the tiny random SD1.5 model. Skipped without ComfyUI."""
from __future__ import annotations

import pytest

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
