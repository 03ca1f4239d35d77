"""The reference cache and once-per-run references inside a real ComfyUI (issue 18): tiny random
SD1.5 and FLUX models sampled with Reference Reuse, against the uncached technique. A warm run runs
no reference rows (the diffusion model sees the target rows only) and equals the uncached run; a
LoRA-strength change misses; unloading the model drops its rows. Skipped without ComfyUI."""
from __future__ import annotations

import pytest
import torch

from comfy_sampling import assert_same_sample, encode, sample
from comfy_techniques import DMSA_PROMPT as PROMPT
from comfy_techniques import dmsa_patch as dmsa
from comfy_techniques import flux_dmsa, flux_mrsa, flux_prompts as prompts, flux_sample, guided
from comfy_techniques import mrsa_patch as patch

ONCE, EVERY = "once per run", "every step (FreeCustom)"


@pytest.fixture(autouse=True)
def empty_store():
    from personalize_pack.attention.ref_cache import STORE
    STORE.drop()
    STORE.hits = STORE.misses = 0
    yield STORE
    STORE.drop()


def reuse(model, **kw):
    from personalize_pack.nodes.reference_cache import ReferenceReuseNode
    return ReferenceReuseNode.execute(model, **kw).result[0]


class RowSpy:
    """The batch size of every diffusion-model call."""

    def __init__(self, model):
        self.sizes = []
        self.handle = model.model.diffusion_model.register_forward_pre_hook(
            lambda mod, args, kwargs: self.sizes.append(int(args[0].shape[0])), with_kwargs=True)

    def take(self):
        out, self.sizes = self.sizes, []
        return out

    def close(self):
        self.handle.remove()


def test_warm_run_runs_no_reference_rows_and_equals_the_uncached_run(sd15, references, empty_store):
    model, clip, vae = sd15
    pos, neg = encode(clip, "a cat and a dog on a sofa"), encode(clip, "blurry")
    uncached = patch(model, references)
    cached = reuse(uncached)
    spy = RowSpy(model)
    try:
        expected = sample(uncached, pos, neg, steps=4)
        assert spy.take() == [4] * 4                     # cond + uncond + two references, every step
        cold = sample(cached, pos, neg, steps=4)
        assert spy.take() == [4] * 4 and len(empty_store) == 8     # two rows x four sigmas stored
        warm = sample(cached, pos, neg, steps=4)
        assert spy.take() == [2] * 4, "a warm run runs the target rows only"
        other_seed = sample(cached, pos, neg, steps=4, seed=11)
        assert spy.take() == [2] * 4, "a new seed for the image reuses the references"
    finally:
        spy.close()
    assert_same_sample(cold, expected, vae)
    assert_same_sample(warm, expected, vae)
    assert_same_sample(other_seed, sample(uncached, pos, neg, steps=4, seed=11), vae)
    assert "personalize" not in model.model_options.get("transformer_options", {})


def _lora(model, strength):
    import comfy.sd
    sd = model.model.diffusion_model.state_dict()
    name = "input_blocks.1.1.transformer_blocks.0.attn1.to_k"
    w = sd[name + ".weight"]
    g = torch.Generator().manual_seed(5)
    lora = {f"diffusion_model.{name}.diff": torch.randn(w.shape, generator=g) * float(w.std()) * 2}
    return comfy.sd.load_lora_for_models(model, None, lora, strength, 0.0)[0]


def test_a_lora_strength_change_misses(sd15, references):
    model, clip, vae = sd15
    pos, neg = encode(clip, "a cat and a dog on a sofa"), encode(clip, "blurry")
    strong, weak = _lora(model, 1.0), _lora(model, 0.5)
    assert strong.patches_uuid != weak.patches_uuid
    sample(reuse(patch(strong, references)), pos, neg)
    spy = RowSpy(model)
    try:
        got = sample(reuse(patch(weak, references)), pos, neg)
        assert spy.take() == [4] * 3, "another LoRA strength computes its own references"
        again = sample(reuse(patch(strong, references)), pos, neg)
        assert spy.take() == [2] * 3, "back to the first strength: its rows are still there"
    finally:
        spy.close()
    assert_same_sample(got, sample(patch(weak, references), pos, neg), vae)
    assert_same_sample(again, sample(patch(strong, references), pos, neg), vae)


def test_unloading_the_model_drops_its_rows(sd15, references, empty_store):
    import comfy.model_management as mm
    model, clip, _ = sd15
    pos, neg = encode(clip, "a dog"), encode(clip, "")
    m = reuse(patch(model, references))               # ComfyUI's output cache holds the patched MODEL
    sample(m, pos, neg)
    assert len(empty_store) == 6
    mm.unload_all_models()
    assert len(empty_store) == 0
    m2 = reuse(patch(model, references, seed=0))       # a re-run node: another clone of the same model
    sample(m2, pos, neg)
    assert len(empty_store) == 6 and empty_store.hits == 0
    sample(m, pos, neg)
    assert empty_store.hits == 6, "rows are shared by clones with the same weights and patches"


def test_memory_bound_and_masked_tokens(sd15, references, empty_store):
    model, clip, _ = sd15
    pos, neg = encode(clip, "a dog"), encode(clip, "")
    sample(reuse(patch(model, references)), pos, neg, steps=2)
    full = empty_store.bytes
    entry = next(iter(empty_store._entries.values()))
    kept = [(idx.numel() if idx is not None else n, n) for idx, _, _, n in entry.layers.values()]
    assert all(m < n for m, n in kept), "a masked reference keeps fewer tokens than the layer has"
    empty_store.drop()
    sample(reuse(patch(model, references), cache_mb=0), pos, neg, steps=2)
    assert len(empty_store) == 0 and full > 0


def test_dmsa_cached_equals_uncached(sd15, references):
    model, clip, vae = sd15
    pos, neg = encode(clip, PROMPT), encode(clip, "blurry")
    cat, dog = references[:1], references[1:]
    for kw in ({}, {"spatial_norm_start": 0.0}):
        uncached = dmsa(model, clip, dog, cat, **kw)
        expected = sample(uncached, pos, neg, steps=4)
        cached = reuse(uncached)
        sample(cached, pos, neg, steps=4)
        spy = RowSpy(model)
        try:
            warm = sample(cached, pos, neg, steps=4)
            assert max(spy.take()) == 2
        finally:
            spy.close()
        assert_same_sample(warm, expected, vae)


def test_flux_mrsa_and_dmsa_cached_equal_uncached(flux, sd15, flux_refs):
    pos, neg = prompts(sd15[1])
    uncached = flux_mrsa(flux, flux_refs)
    expected = flux_sample(uncached, pos, neg)
    cached = reuse(uncached)
    flux_sample(cached, pos, neg)
    spy = RowSpy(flux)
    try:
        warm = flux_sample(cached, pos, neg)
        assert spy.take() == [1] * 3
    finally:
        spy.close()
    scale = max(1.0, float(expected.abs().max()))
    assert float((warm - expected).abs().max()) <= 1e-4 * scale
    # DMSA on FLUX: the structure and appearance references read back the same
    prompt = "a cat on a sofa"
    pos, neg = guided(encode(sd15[1], prompt)), guided(encode(sd15[1], ""))
    s, a = (flux_refs[0],), (flux_refs[1],)
    uncached = flux_dmsa(flux, sd15[1], s, a, prompt)
    cached = reuse(uncached)
    flux_sample(cached, pos, neg, steps=4)
    spy = RowSpy(flux)
    try:
        expected = flux_sample(uncached, pos, neg, steps=4)
        per_step = spy.take()
        warm = flux_sample(cached, pos, neg, steps=4)
        assert spy.take() == [1] * 4
        once = flux_sample(reuse(uncached, references_run=ONCE, keep_across_runs=False), pos, neg, steps=4)
        first = spy.take()
    finally:
        spy.close()
    # once per run: each reference runs in the first step of its phase only
    assert first[0] > 1 and sum(first) < sum(per_step) and first.count(1) >= 2, (first, per_step)
    assert float((warm - expected).abs().max()) <= 1e-4 * max(1.0, float(expected.abs().max()))
    assert torch.isfinite(once).all() and (once - expected).abs().max() > 1e-4


def test_once_per_run(sd15, references, empty_store):
    model, clip, vae = sd15
    pos, neg = encode(clip, "a cat and a dog on a sofa"), encode(clip, "blurry")
    per_step = sample(patch(model, references), pos, neg, steps=4)
    once = reuse(patch(model, references), references_run=ONCE, keep_across_runs=False, reference_noise=1.0)
    spy = RowSpy(model)
    try:
        a = sample(once, pos, neg, steps=4)
        assert spy.take() == [4, 2, 2, 2], "the references run in the first step only"
        b = sample(once, pos, neg, steps=4)
        assert spy.take() == [4, 2, 2, 2], "and again in the next run (not kept across runs)"
        kept = reuse(patch(model, references), references_run=ONCE, keep_across_runs=True)
        sample(kept, pos, neg, steps=4)
        spy.take()
        c = sample(kept, pos, neg, steps=4)
        assert spy.take() == [2, 2, 2, 2]
    finally:
        spy.close()
    assert_same_sample(b, a, vae)
    assert_same_sample(c, a, vae)
    assert (a - per_step).abs().max() > 1e-3, "clean references are not FreeCustom's re-noised ones"
    mid = sample(reuse(patch(model, references), references_run=ONCE, reference_noise=0.5), pos, neg, steps=4)
    assert (mid - a).abs().max() > 1e-4


def test_reuse_without_a_technique_and_bad_settings(sd15, references):
    model, clip, vae = sd15
    pos, neg = encode(clip, "a dog"), encode(clip, "")
    first = reuse(model)                                   # before the technique: the policy waits for it
    assert_same_sample(sample(first, pos, neg), sample(model, pos, neg), vae)
    spy = RowSpy(model)
    try:
        m = patch(first, references)
        sample(m, pos, neg)
        spy.take()
        sample(m, pos, neg)
        assert spy.take() == [2] * 3
        off = reuse(patch(model, references), references_run=EVERY, keep_across_runs=False)
        sample(off, pos, neg)
        sample(off, pos, neg)
        assert spy.take() == [4] * 6, "every step without keeping: no cache"
    finally:
        spy.close()
    with pytest.raises(ValueError, match="references_run: unknown"):
        reuse(model, references_run="twice")
    with pytest.raises(ValueError, match="cache_device: unknown"):
        reuse(model, cache_device="disk")
    with pytest.raises(ValueError, match="reference_noise: must lie in 0..1"):
        reuse(model, references_run=ONCE, reference_noise=float("nan"))
    with pytest.raises(ValueError, match="cache_mb"):
        reuse(model, cache_mb=-5)
