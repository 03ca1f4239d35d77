"""The reference cache (issue 18) on the one-layer stand-in UNet of ``test_patch``: a warm call runs
no reference rows and equals the uncached call; every input that decides the reference rows' keys
and values misses; the store keeps only the masked tokens, within its bound; once-per-run
references are noised to one level and serve every step."""
from types import SimpleNamespace

import pytest
import torch

from personalize_pack.attention import ref_cache
from personalize_pack.attention.dmsa import DisentangleMixingAttention
from personalize_pack.attention.patch import ROWS_KEY, STATE_KEY, WRAPPER_KEY, SigmaRange
from personalize_pack.attention.ref_cache import (STORE, ReferencePolicy, ReferenceStore, RowEntry, drop_on_detach,
                                                  drop_on_new_run)
from personalize_pack.attention.ref_keys import KEEP_ALL, KEEP_MASK, kept_index, tensor_digest
from personalize_pack.attention.reference_pass import reference_pass

from one_layer_unet import HEADS, KEY, OneLayerUNet, make_reference, mrsa, options


@pytest.fixture(autouse=True)
def empty_store():
    STORE.drop()
    STORE.limit = ref_cache.DEFAULT_LIMIT_MB * 2 ** 20
    STORE.hits = STORE.misses = 0
    yield
    STORE.drop()


def cached(technique, labels, policy=None, sigma=5.0, rows=2, extra=None):
    opts = options(technique, labels, sigma, rows, extra)
    opts[STATE_KEY] = opts[STATE_KEY].with_policy(policy or ReferencePolicy())
    return opts


def run(unet, tech, x, c, sigma=5.0, labels=(1, 0), policy=None, extra=None, **kw):
    n = x.shape[0]
    return reference_pass(unet, x, torch.full((n,), sigma), None, c, None,
                          cached(tech, list(labels), policy, sigma, n, extra), **kw)


def rows_run(unet) -> int:
    return unet.calls[-1]["x"].shape[0]


def inputs(seed=0, n=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 4, 4, generator=g), torch.randn(n, 77, 16, generator=g)


def test_warm_call_runs_no_reference_rows_and_equals_the_uncached_call():
    refs = [make_reference(0), make_reference(1, weight=2.0)]
    x, c = inputs()
    plain = OneLayerUNet()
    expected = reference_pass(plain, x, torch.full((2,), 5.0), None, c, None, options(mrsa(refs), [1, 0]))
    unet = OneLayerUNet()
    tech = mrsa(refs)
    cold = run(unet, tech, x, c)
    assert rows_run(unet) == 4 and len(STORE) == 2 and STORE.misses == 1
    torch.testing.assert_close(cold, expected)
    x2, c2 = inputs(1)             # another seed and prompt for the target: references unchanged
    c2[:, :] = c                   # (the references borrow the cond prompt, so it stays)
    warm = run(unet, tech, x2, c2)
    assert rows_run(unet) == 2, "a warm call runs the target rows only"
    assert unet.calls[-1]["opts"][ROWS_KEY].mode == "read" and STORE.hits == 2
    expected2 = reference_pass(OneLayerUNet(), x2, torch.full((2,), 5.0), None, c2, None, options(mrsa(refs), [1, 0]))
    torch.testing.assert_close(warm, expected2)


def test_the_separate_pass_fills_the_cache_too():
    refs = [make_reference(0), make_reference(1, weight=2.0)]
    x, c = inputs()
    seen = []

    def foreign(q, k, v, eo):
        seen.append(q.shape[0])
        from personalize_pack.attention.kernels import sdpa_attention
        return sdpa_attention(q, k, v, eo["n_heads"])

    unet = OneLayerUNet(foreign)
    extra = {"patches_replace": {"attn1": {KEY: unet.patch}}}
    tech = mrsa(refs)
    cold = run(unet, tech, x, c, extra=extra)
    assert [call["x"].shape[0] for call in unet.calls] == [2, 2]
    warm = run(unet, tech, x, c, extra=extra)
    assert len(unet.calls) == 3 and rows_run(unet) == 2
    torch.testing.assert_close(warm, cold)


def _miss(unet, tech, x, c, **kw):
    before = len(unet.calls)
    run(unet, tech, x, c, **kw)
    return rows_run(unet) > x.shape[0] and len(unet.calls) == before + 1


def test_every_input_of_the_reference_rows_misses():
    x, c = inputs()
    base = make_reference(0)
    unet = OneLayerUNet()
    unet.class_obj.current_patcher = SimpleNamespace(patches_uuid="lora-a", object_patches={}, hook_patches={},
                                                     current_hooks=None)
    tech = mrsa([base])
    assert _miss(unet, tech, x, c)
    assert not _miss(unet, tech, x, c), "the same inputs hit"
    assert not _miss(unet, mrsa([base]), x, c), "another technique object with the same references hits"
    mask = base.mask.clone()
    mask[0, 0] = 1
    changes = {
        "reference image": dict(tech=mrsa([make_reference(5)])),
        "reference mask": dict(tech=mrsa([make_reference(0, mask=mask)])),
        "caption": dict(tech=mrsa([make_reference(0, caption=torch.randn(1, 77, 16))])),
        "sigma": dict(sigma=4.0),
        "prompt the reference borrows": dict(c=torch.randn(2, 77, 16)),
        "latent size": dict(x=torch.randn(2, 4, 8, 8), c=c),
        "dtype": dict(x=x.double()),
        "other model input": dict(y=torch.randn(2, 3)),
    }
    for name, change in changes.items():
        t = change.pop("tech", tech)
        xx, cc = change.pop("x", x), change.pop("c", c)
        assert _miss(unet, t, xx, cc, **change), f"a changed {name} must miss"
    seeded = mrsa([base])
    seeded.seed = 8
    assert _miss(unet, seeded, x, c), "a changed reference seed must miss"
    unet.class_obj.current_patcher.patches_uuid = "lora-b"         # another LoRA strength: new weight patches
    assert _miss(unet, tech, x, c), "changed weight patches must miss"
    unet.class_obj.current_patcher.object_patches = {"model_sampling": object()}
    assert _miss(unet, tech, x, c), "an object patch must miss"
    other = OneLayerUNet()
    assert _miss(other, tech, x, c), "another model object must miss"


def test_another_packs_patch_and_hooks():
    x, c = inputs()
    tech = mrsa([make_reference(0)])
    unet = OneLayerUNet()
    run(unet, tech, x, c)
    freeu = lambda h, *a: h
    assert _miss(unet, tech, x, c, extra={"patches": {"output_block_patch": [freeu]}})
    assert not _miss(unet, tech, x, c, extra={"patches": {"output_block_patch": [freeu]}})
    wrapper = lambda executor, *a, **k: executor(*a, **k)
    own = {"wrappers": {"apply_model": {WRAPPER_KEY: [wrapper]}}}
    assert not _miss(unet, tech, x, c, extra=own), "the pack's own reference pass is not another pack's"
    other = {"wrappers": {"apply_model": {"other.pack": [wrapper]}}}
    assert _miss(unet, tech, x, c, extra=other) and not _miss(unet, tech, x, c, extra=other)
    unet.class_obj.current_patcher = SimpleNamespace(patches_uuid="u", object_patches={}, hook_patches={"h": 1},
                                                     current_hooks=None)
    n = len(STORE)
    assert _miss(unet, tech, x, c) and _miss(unet, tech, x, c), "weight hooks: every call computes its references"
    assert len(STORE) == n


def test_only_the_masked_tokens_are_kept_within_the_bound():
    mask = torch.zeros(32, 32)
    mask[:16, :8] = 1                                  # 2 of the 16 tokens of the 4x4 grid
    refs = [make_reference(0, mask=mask)]
    x, c = inputs()
    unet = OneLayerUNet()
    run(unet, mrsa(refs), x, c)
    (entry,) = STORE._entries.values()
    idx, k, v, n = entry.layers[KEY]
    assert n == 16 and idx.tolist() == [0, 4] and k.shape == (2, HEADS * 8) and k.device.type == "cpu"
    assert entry.nbytes == 2 * 2 * HEADS * 8 * 8 and STORE.bytes == entry.nbytes
    q_k = unet.calls[-1]  # the reference row's keys at the kept tokens are what the layer computed
    tok = q_k["x"][2:3].double().flatten(2).transpose(1, 2) @ unet.wk
    torch.testing.assert_close(k, tok[0, [0, 4]])
    # the bound: a run that does not fit keeps its first steps (it never evicts its own rows) ...
    two = ReferencePolicy(limit_bytes=2 * entry.nbytes)
    for sigma in (4.0, 3.0):
        run(unet, mrsa(refs), x, c, sigma=sigma, policy=two)
    assert len(STORE) == 2 and STORE.bytes == 2 * entry.nbytes
    assert not _miss(unet, mrsa(refs), x, c, sigma=5.0, policy=two) and _miss(unet, mrsa(refs), x, c, sigma=3.0,
                                                                                policy=two)
    # ... and a later run evicts the rows of earlier runs, least recently used first
    STORE.new_run()
    run(unet, mrsa(refs), x, c, sigma=3.0, policy=two)
    assert len(STORE) == 2 and STORE.bytes == 2 * entry.nbytes
    assert not _miss(unet, mrsa(refs), x, c, sigma=3.0, policy=two)
    assert _miss(unet, mrsa(refs), x, c, sigma=4.0, policy=two), "sigma 4, the least recently used, went"
    STORE.new_run()
    assert not STORE.put("too big", entry, limit=entry.nbytes - 1) and len(STORE) == 0


def test_kept_tokens_follow_the_techniques():
    mask = torch.zeros(32, 32)
    mask[:16, :16] = 1
    ref = make_reference(0, mask=mask)
    assert kept_index(ref, 16, (4, 4), KEEP_MASK).tolist() == [0, 1, 4, 5]
    assert kept_index(ref, 16, (4, 4), KEEP_ALL) is None
    tiny = torch.zeros(32, 32)
    tiny[:2, :2] = 1                                   # under half a token: DMSA's appearance fallback
    assert kept_index(make_reference(0, mask=tiny), 16, (4, 4), KEEP_MASK).tolist() == [0]
    s, a = make_reference(0), make_reference(1)
    keys = [KEY]
    normed = DisentangleMixingAttention(s, a, keys, [], [], SigmaRange(10, 0), None, norm_range=SigmaRange(10, 0))
    plain = DisentangleMixingAttention(s, a, keys, [], [], SigmaRange(10, 0), None)
    assert normed.cache_keep(s, 0) == KEEP_ALL and normed.cache_keep(a, 0) == KEEP_MASK
    assert plain.cache_keep(s, 0) == KEEP_MASK


def test_unloading_the_model_drops_its_rows():
    x, c = inputs()
    unet = OneLayerUNet()
    run(unet, mrsa([make_reference(0)]), x, c)
    other = OneLayerUNet()
    run(other, mrsa([make_reference(0)]), x, c)
    assert len(STORE) == 2
    drop_on_detach(SimpleNamespace(model=unet.class_obj), False)       # handed to another clone: kept
    assert len(STORE) == 2
    drop_on_detach(SimpleNamespace(model=unet.class_obj), True)        # unloaded
    assert len(STORE) == 1 and all(e.model_id == id(other.class_obj) for e in STORE._entries.values())


def test_rows_of_a_freed_model_object_are_invalid():
    store = ReferenceStore()
    anchor = torch.zeros(1)
    entry = RowEntry({KEY: (None, torch.zeros(2, 2), torch.zeros(2, 2), 2)}, 1, "runs", store.anchors([anchor]))
    store.put("k", entry)
    assert store.get("k") is entry
    del anchor
    assert store.get("k") is None and len(store) == 0


def test_once_per_run_references_serve_every_step():
    refs = [make_reference(0)]
    x, c = inputs()
    unet = OneLayerUNet()
    policy = ReferencePolicy(across_runs=False, once_per_run=True, reference_sigma=0.5)
    tech = mrsa(refs)
    out = run(unet, tech, x, c, sigma=5.0, policy=policy)
    first = unet.calls[-1]
    assert first["x"].shape[0] == 3 and float(first["t"][2]) == 0.5, "references at the fixed level"
    eps = (first["x"][2] - 0.18215 * refs[0].latent[0]) / 0.5
    assert abs(float(eps.std()) - 1.0) < 0.35
    for sigma in (4.0, 2.0):
        run(unet, tech, x, c, sigma=sigma, policy=policy)
        assert rows_run(unet) == 2 and unet.calls[-1]["opts"][ROWS_KEY].sigma == sigma
    # the same as computing the fixed-level references in a step of their own
    again = OneLayerUNet()
    STORE.drop()
    run(again, tech, x, c, sigma=2.0, policy=policy)
    torch.testing.assert_close(unet.calls[-1]["x"], again.calls[-1]["x"][:2])
    assert out.shape[0] == 2
    drop_on_new_run(SimpleNamespace(model=again.class_obj))            # the next run starts afresh
    assert len(STORE) == 0
    kept = ReferencePolicy(across_runs=True, once_per_run=True, reference_sigma=0.5)
    run(again, tech, x, c, policy=kept)
    drop_on_new_run(SimpleNamespace(model=again.class_obj))
    assert len(STORE) == 1, "kept across runs"


def test_policy_rejects_bad_settings():
    with pytest.raises(ValueError, match="cache_device"):
        ReferencePolicy(device="disk")
    with pytest.raises(ValueError, match="cache_mb"):
        ReferencePolicy(limit_bytes=-1)
    with pytest.raises(ValueError, match="reference noise"):
        ReferencePolicy(reference_sigma=float("nan"))


def test_tensor_digest_is_exact():
    a = torch.randn(3, 5, dtype=torch.bfloat16)
    b = a.clone()
    assert tensor_digest(a) == tensor_digest(b)
    b[1, 2] += 1
    assert tensor_digest(a) != tensor_digest(b)
    assert tensor_digest(a) != tensor_digest(a.float()) != tensor_digest(a.reshape(5, 3))
