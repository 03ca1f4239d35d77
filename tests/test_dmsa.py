"""FreeMix DMSA (docs/algorithms.md §2): the appearance substitution, the structure phase, the
spatial normalisation and the blend mask against independent float64 computations (§2.9), and the
technique called through the reference pass on a stand-in UNet with attn1 and attn2 blocks."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from personalize_pack.attention.blocks import DMSA_PRESETS, discover_attention_blocks
from personalize_pack.attention.dmsa import DisentangleMixingAttention
from personalize_pack.attention.dmsa_kernels import (BlendMapStore, appearance_attention, appearance_source_index,
                                                     blend_map, blend_mask, cross_attention_maps, structure_attention)
from personalize_pack.attention.kernels import (mrsa_attention, sdpa_attention, select_reference_keys,
                                                standardize_tokens, token_selection)
from personalize_pack.attention.patch import COND, ROWS_KEY, STATE_KEY, PersonalizeState, SigmaRange
from personalize_pack.attention.reference_pass import reference_pass
from personalize_pack.references.prompt_tokens import find_token_positions
from personalize_pack.references.reference import Reference

from attention_reference import M1, M2, heads_first, reference_mrsa, to_bnc
from fake_models import SD15, SDXL
from standin_unet import HEADS, StandinUNet

MS_DOC = [[0, 0, 0, 0], [0, 1, 1, 1], [0, 1, 1, 1], [0, 0, 0, 0]]


@pytest.fixture
def doc_inputs():
    rng = np.random.default_rng(0)
    return [rng.standard_normal((2, 16, 4)) for _ in range(7)]


# --------------------------------------------------------------------------- independent float64 formulas

def np_softmax(s):
    s = s - s.max(-1, keepdims=True)
    p = np.exp(s)
    return p / p.sum(-1, keepdims=True)


def np_attention(q, K, V):
    """q (h, N, d), K (h, M, d), V (h, M, dv) -> (N, h*dv), explicit logits."""
    P = np_softmax(np.einsum("hnd,hmd->hnm", q, K) * q.shape[-1] ** -0.5)
    out = np.einsum("hnm,hmd->hnd", P, V)
    return out.transpose(1, 0, 2).reshape(q.shape[1], -1)


def np_appearance(q, ko, vo, ka, va, ms, ma):
    """FreeMix's appearance phase written out: for each target position p inside M_s (raster
    order), own key/value p <- appearance token sel[p mod n]; attention over the N keys."""
    ms = np.asarray(ms).reshape(-1)
    sel = [i for i, m in enumerate(np.asarray(ma).reshape(-1)) if m != 0]
    K, V = ko.copy(), vo.copy()
    for p in range(ko.shape[1]):
        if ms[p]:
            K[:, p], V[:, p] = ka[:, sel[p % len(sel)]], va[:, sel[p % len(sel)]]
    return np_attention(q, K, V)


def np_standardize(x):  # (h, N, d): every channel of every head over the tokens, unbiased std
    return (x - x.mean(1, keepdims=True)) / x.std(1, ddof=1, keepdims=True)


def np_structure_norm(q, ko, vo, kr, vr, m, w):
    """FreeMix's structure phase with spatial normalisation: the reference logits are
    s * norm(q) norm(k_ref)^T, then the mask bias (finfo.min outside), one softmax over both."""
    s = q.shape[-1] ** -0.5
    own = np.einsum("hnd,hmd->hnm", q, ko) * s
    ref = np.einsum("hnd,hmd->hnm", np_standardize(q), np_standardize(kr)) * s
    b = w * np.asarray(m, dtype=np.float64).reshape(-1)
    ref = ref + np.where(b != 0, b, np.finfo(np.float64).min)[None, None]
    P = np_softmax(np.concatenate([own, ref], -1))
    out = np.einsum("hnm,hmd->hnd", P, np.concatenate([vo, vr], 1))
    return out.transpose(1, 0, 2).reshape(q.shape[1], -1)


def np_word_map(q, k, cols):
    """Head-mean softmax over all text tokens, summed over the word's columns. q (h,N,d), k (h,L,d)."""
    P = np_softmax(np.einsum("hnd,hld->hnl", q, k) * q.shape[-1] ** -0.5)
    return P.mean(0)[:, cols].sum(-1)


# --------------------------------------------------------------------------- §2.9 (a) appearance phase

def test_appearance_substitution_documented_values(doc_inputs):
    q, ko, vo, k1, v1, k2, v2 = doc_inputs
    ms, ma = np.array(MS_DOC).reshape(-1), np.array(M2).reshape(-1)
    src = appearance_source_index(16, torch.tensor(ma))
    assert {p: int(src[p]) for p in range(16) if ms[p]} == {5: 1, 6: 4, 7: 5, 9: 1, 10: 4, 11: 5}
    expected = np_appearance(q, ko, vo, k2, v2, ms, ma)
    # the figures written down in docs/algorithms.md §2.9 (a)
    assert expected.sum() == pytest.approx(-8.8037681, abs=1e-6)
    np.testing.assert_allclose(expected[0, :4], [-0.7021704, -0.1541141, 0.0816306, 0.0533692], atol=1e-6)
    ours = appearance_attention(to_bnc(q), to_bnc(ko), to_bnc(vo), to_bnc(k2)[0], to_bnc(v2)[0],
                                torch.tensor(ms), torch.tensor(ma), heads=2)
    np.testing.assert_allclose(ours[0].numpy(), expected, atol=1e-10)


def test_appearance_per_row_masks_and_empty_mask_is_plain():
    rng = np.random.default_rng(3)
    h, n, d = 2, 36, 4
    rows = [[rng.standard_normal((h, n, d)) for _ in range(3)] for _ in range(3)]
    ka, va = rng.standard_normal((h, n, d)), rng.standard_normal((h, n, d))
    ma = (rng.uniform(size=n) > 0.7).astype(float)
    ms = np.stack([rng.uniform(size=n) > 0.5, np.zeros(n, bool), rng.uniform(size=n) > 0.2])
    q, k, v = (torch.cat([to_bnc(r[i]) for r in rows]) for i in range(3))
    ours = appearance_attention(q, k, v, to_bnc(ka)[0], to_bnc(va)[0], torch.tensor(ms), torch.tensor(ma), heads=h)
    for i, (qi, ki, vi) in enumerate(rows):
        np.testing.assert_allclose(ours[i].numpy(), np_appearance(qi, ki, vi, ka, va, ms[i], ma), atol=1e-10)
    plain = sdpa_attention(q[1:2], k[1:2], v[1:2], h)
    torch.testing.assert_close(ours[1:2], plain)            # the row with an empty M_s
    zero = appearance_attention(q, k, v, to_bnc(ka)[0], to_bnc(va)[0], torch.zeros(n), torch.zeros(n), heads=h)
    torch.testing.assert_close(zero, sdpa_attention(q, k, v, h))   # empty M_s: plain, even with no app tokens


def test_appearance_bad_shapes():
    q = torch.randn(1, 16, 8)
    with pytest.raises(ValueError, match="struct_mask"):
        appearance_attention(q, q, q, q[0], q[0], torch.ones(15), torch.ones(16), 2)
    with pytest.raises(ValueError, match="app_mask"):
        appearance_attention(q, q, q, q[0], q[0], torch.ones(16), torch.ones(9), 2)
    with pytest.raises(ValueError, match="no appearance token"):
        appearance_attention(q, q, q, q[0], q[0], torch.ones(16), torch.zeros(16), 2)


# --------------------------------------------------------------------------- §2.9 (b) structure phase

def test_structure_phase_is_the_mrsa_kernel_with_one_reference(doc_inputs):
    q, ko, vo, k1, v1, k2, v2 = doc_inputs
    expected, _ = reference_mrsa(q, ko, vo, [k1], [v1], [M1], [3.0])
    sel = token_selection(torch.tensor(np.array(M1, dtype=np.float64).reshape(-1)), 3.0)
    ours = structure_attention(to_bnc(q), to_bnc(ko), to_bnc(vo), to_bnc(k1)[0], to_bnc(v1)[0], sel, heads=2)
    np.testing.assert_allclose(ours[0].numpy(), expected, atol=1e-10)
    plain = structure_attention(to_bnc(q), to_bnc(ko), to_bnc(vo), to_bnc(k1)[0], to_bnc(v1)[0], None, heads=2)
    torch.testing.assert_close(plain, sdpa_attention(to_bnc(q), to_bnc(ko), to_bnc(vo), 2))


@pytest.mark.parametrize("weight", [3.0, -1.5])
def test_spatial_normalisation_against_explicit_float64(weight):
    rng = np.random.default_rng(4)
    h, n, d = 2, 36, 8
    q, ko, vo, kr, vr = (rng.standard_normal((h, n, d)) * rng.uniform(0.5, 3.0, (1, 1, d)) + rng.uniform(-2, 2)
                         for _ in range(5))
    m = (rng.uniform(size=n) > 0.4).astype(float)
    expected = np_structure_norm(q, ko, vo, kr, vr, m, weight)
    sel = token_selection(torch.tensor(m), weight)
    ours = structure_attention(to_bnc(q), to_bnc(ko), to_bnc(vo), to_bnc(kr)[0], to_bnc(vr)[0], sel, heads=h,
                               normalise=True)
    np.testing.assert_allclose(ours[0].numpy(), expected, atol=1e-10)
    # the kernel variant directly: ref_query against already standardised reference keys
    refs = select_reference_keys(standardize_tokens(to_bnc(kr)), to_bnc(vr), [torch.tensor(m)], [weight])
    direct = mrsa_attention(to_bnc(q), to_bnc(ko), to_bnc(vo), refs, h, ref_query=standardize_tokens(to_bnc(q)))
    np.testing.assert_allclose(direct[0].numpy(), expected, atol=1e-10)
    # float32 through the fused kernels stays close
    f32 = structure_attention(*(to_bnc(x).float() for x in (q, ko, vo)), to_bnc(kr)[0].float(),
                              to_bnc(vr)[0].float(), sel, heads=h, normalise=True)
    np.testing.assert_allclose(f32[0].numpy(), expected, atol=1e-4)


def test_standardize_tokens_matches_numpy_and_handles_constant_channels():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 10, 6))
    np.testing.assert_allclose(standardize_tokens(torch.tensor(x)).numpy(),
                               (x - x.mean(1, keepdims=True)) / x.std(1, ddof=1, keepdims=True), atol=1e-12)
    c = torch.ones(1, 5, 3)
    assert torch.equal(standardize_tokens(c), torch.zeros_like(c))


# --------------------------------------------------------------------------- §2.9 (c) blend mask

def test_cross_attention_maps_against_numpy_and_multi_token_words():
    rng = np.random.default_rng(6)
    h, n, d, L = 2, 16, 4, 77
    q, k = rng.standard_normal((h, n, d)), rng.standard_normal((h, L, d))
    ours = cross_attention_maps(to_bnc(q), to_bnc(k), h, [5, 6])
    assert ours.shape == (1, n) and ours.dtype == torch.float32
    np.testing.assert_allclose(ours[0].numpy(), np_word_map(q, k, [5, 6]), atol=1e-6)
    one = cross_attention_maps(to_bnc(q), to_bnc(k), h, [5])
    assert bool((ours > one).all())                   # a two-token word sums both columns
    # the prompt repeated to a longer common length: every repeat counted gives the same map
    rep = torch.cat([to_bnc(k)] * 2, dim=1)
    torch.testing.assert_close(cross_attention_maps(to_bnc(q), rep, h, [5, 6, 82, 83]), ours)
    with pytest.raises(ValueError, match="outside the 77 text tokens"):
        cross_attention_maps(to_bnc(q), to_bnc(k), h, [77])


def test_blend_mask_threshold_normalisation_and_resizing():
    base = torch.tensor([[0.0, 1.0, 2.0, 3.0],
                         [4.0, 5.0, 6.0, 7.0],
                         [8.0, 9.0, 10.0, 11.0],
                         [12.0, 13.0, 14.0, 15.0]])
    # min-max to 0..1 (k/15), then strictly > 0.2: 3/15 = 0.2 is out, 4/15 in; scale/offset invariant
    maps = [[(base * 2 + 5).reshape(1, 16)]]      # exact in float32
    norm = blend_map(maps, (16, 16))
    torch.testing.assert_close(norm[0], base / 15)
    m = blend_mask(maps, (16, 16), (4, 4))
    assert m.dtype == torch.bool and m.shape == (1, 4, 4)
    assert m[0].reshape(-1).tolist() == [False] * 4 + [True] * 12
    # mean over steps and layers before the normalisation
    flip = base.flip(-1).reshape(1, 16)
    two = blend_map([[base.reshape(1, 16)], [flip, flip]], (16, 16))
    agg = (base + base.flip(-1)) / 2
    torch.testing.assert_close(two[0], (agg - agg.min()) / (agg.max() - agg.min()))
    # upsampling: nearest (each map token becomes a 2x2 block)
    up = blend_mask(maps, (16, 16), (8, 8))
    assert torch.equal(up[0], (base / 15 > 0.2).repeat_interleave(2, 0).repeat_interleave(2, 1))
    # downsampling: area average of the normalised map, then the threshold
    down = blend_mask(maps, (16, 16), (2, 2))
    exp = F.avg_pool2d((base / 15)[None, None], 2)[0, 0] > 0.2
    assert torch.equal(down[0], exp)
    # a constant map normalises to 0: empty mask
    assert not blend_mask([[torch.full((1, 16), 0.3)]], (16, 16), (4, 4)).any()
    with pytest.raises(ValueError, match="does not fit"):
        blend_mask([[torch.rand(1, 15)]], (16, 16), (4, 4))
    with pytest.raises(ValueError, match="no cross-attention maps"):
        blend_mask([], (16, 16), (4, 4))


def test_blend_mask_layers_of_different_resolution():
    rng = np.random.default_rng(7)
    fine = rng.uniform(size=(2, 8, 6))              # a 16x12 latent: layers of 8x6 and 4x3 tokens
    coarse = rng.uniform(size=(2, 4, 3))
    maps = [[torch.tensor(fine).reshape(2, 48), torch.tensor(coarse).reshape(2, 12)]]
    up = F.interpolate(torch.tensor(coarse)[:, None], size=(8, 6), mode="bilinear", align_corners=False)[:, 0]
    agg = (torch.tensor(fine) + up) / 2
    lo, hi = agg.amin((1, 2), keepdim=True), agg.amax((1, 2), keepdim=True)
    norm = (agg - lo) / (hi - lo)
    torch.testing.assert_close(blend_map(maps, (16, 12)), norm.float())
    out = blend_mask(maps, (16, 12), (16, 12))
    assert out.shape == (2, 16, 12)
    assert torch.equal(out, (norm > 0.2).repeat_interleave(2, 1).repeat_interleave(2, 2))


@pytest.mark.parametrize("seed", range(20))
def test_blend_mask_argmax_inside_argmin_outside(seed):
    g = torch.Generator().manual_seed(seed)
    maps = [[torch.rand(1, 64, generator=g) ** 3, torch.rand(1, 16, generator=g)] for _ in range(3)]
    norm = blend_map(maps, (16, 16))[0].reshape(-1)
    m = blend_mask(maps, (16, 16), (8, 8))[0].reshape(-1)
    assert bool(m[int(norm.argmax())]) and not bool(m[int(norm.argmin())])
    up = blend_mask(maps, (16, 16), (16, 16))[0]
    i, j = divmod(int(norm.argmax()), 8)
    assert bool(up[2 * i:2 * i + 2, 2 * j:2 * j + 2].all())


def test_find_token_positions():
    prompt = [49406, 320, 1125, 539, 320, 1929, 530, 518, 1929, 49407, 49407]
    assert find_token_positions(prompt, [1929]) == [5, 8]              # every occurrence
    assert find_token_positions(prompt, [530, 518]) == [6, 7]          # a multi-token word
    with pytest.raises(ValueError, match="not found in the prompt"):
        find_token_positions(prompt, [2368], "blend word 'cat'")
    with pytest.raises(ValueError, match="no tokens"):
        find_token_positions(prompt, [])


def test_map_store_keeps_only_maps_of_the_current_run():
    st = BlendMapStore()
    sched = (8.0, 6.0, 4.0, 0.0)
    for s in sched[:-1]:
        st.record(0, s, "a", torch.full((4,), s), sched)
    assert [float(m[0][0]) for m in st.completed(0, 4.0, sched)] == [8.0, 6.0]
    assert st.completed(0, 8.0, sched) == []
    assert st.completed(0, 5.0, (9.0, 5.0, 0.0)) == []       # another schedule: none of these sigmas
    st.record(0, 8.0, "a", torch.full((4,), -1.0), sched)     # a new run: the lower sigmas are stale
    assert [float(m[0][0]) for m in st.completed(0, 4.0, sched)] == [-1.0]
    assert st.completed(1, 4.0, sched) == []                  # rows are separate


# --------------------------------------------------------------------------- presets

def test_presets_resolve_on_sd15_and_sdxl():
    s, a, m = DMSA_PRESETS["SD1.5 FreeMix"].keys(discover_attention_blocks(SD15))
    assert s == tuple(("output", i, 0) for i in range(4, 12))
    assert a == tuple(("output", i, 0) for i in range(9, 12))
    assert m == (("input", 7, 0), ("input", 8, 0), ("output", 3, 0), ("output", 4, 0), ("output", 5, 0))
    p = DMSA_PRESETS["SD1.5 FreeMix"]
    assert (p.appearance_percents, p.structure_weight, p.threshold, p.norm_percents) == ((0.4, 1.0), 3.0, 0.2, None)
    s, a, m = DMSA_PRESETS["SDXL FreeMix analogue"].keys(discover_attention_blocks(SDXL))
    assert len(s) == 36 and len(a) == 6 and len(m) == 50
    with pytest.raises(ValueError, match="structure layers: the preset names blocks this model does not have"):
        DMSA_PRESETS["SD1.5 FreeMix"].keys(discover_attention_blocks(SDXL))


# --------------------------------------------------------------------------- the technique on a stand-in UNet

MAP_A, MAP_B = ("input", 7, 0), ("input", 8, 0)
STRUCT, APP = ("output", 4, 0), ("output", 9, 0)
BLOCKS = [(MAP_A, 2), (MAP_B, 4), (STRUCT, 2), (APP, 1)]      # 8x8 latent: 4x4, 2x2, 4x4 and 8x8 tokens
SCHEDULE = torch.tensor([8.0, 6.0, 4.0, 2.0, 0.0])
BLEND = (5, 6)


def pixel_mask(rows, cols):
    m = torch.zeros(64, 64)
    m[rows[0]:rows[1], cols[0]:cols[1]] = 1
    return m


def make_refs(struct_mask=None):
    g = torch.Generator().manual_seed(11)
    s = Reference(latent=torch.randn(1, 4, 8, 8, generator=g),
                  mask=pixel_mask((16, 48), (8, 40)) if struct_mask is None else struct_mask, name="structure")
    a = Reference(latent=torch.randn(1, 4, 8, 8, generator=g), mask=pixel_mask((8, 32), (24, 56)), name="appearance")
    return s, a


def grid_mask(mask, n):  # pixel mask -> layer grid (area, kept when covered at least half), as the pack does
    return mask.reshape(n, 64 // n, n, 64 // n).mean((1, 3)).ge(0.5).double().reshape(-1).numpy()


def dmsa(refs, structure=(10.0, 0.0), appearance=(4.5, 0.0), norm=None, maps=(MAP_A, MAP_B), **kw):
    kw.setdefault("threshold", 0.2)
    return DisentangleMixingAttention(refs[0], refs[1], [STRUCT, APP], [APP], list(maps),
                                      SigmaRange(*structure) if structure else None,
                                      SigmaRange(*appearance) if appearance else None,
                                      blend_tokens=BLEND, prompt_tokens=77,
                                      norm_range=SigmaRange(*norm) if norm else None, seed=3, **kw)


def sample(unet, tech, x, c, labels, schedule=SCHEDULE, extra=None):
    """One model call per step of ``schedule`` (the same x: no sampler needed for these checks)."""
    n, outs = x.shape[0], []
    for s in schedule[:-1].tolist():
        opts = {STATE_KEY: PersonalizeState().with_technique(tech), "cond_or_uncond": labels,
                "sigmas": torch.full((n,), s), "sample_sigmas": schedule}
        opts.update(extra or {})
        outs.append(reference_pass(unet, x, torch.full((n,), s), None, c, None, opts))
    return outs


def expected_blend(calls, row):
    """M_s on the 8x8 appearance grid from the attn2 calls of the completed steps, independently:
    numpy word maps, the 2x2 layer upsampled (bilinear) to 4x4, mean over layers then steps,
    min-max, > 0.2, nearest x2."""
    steps = []
    for call in calls:
        qa, ka = call["seen"][("attn2", MAP_A)][:2]
        qb, kb = call["seen"][("attn2", MAP_B)][:2]
        a = np_word_map(heads_first(qa[row]), heads_first(ka[row]), list(BLEND)).reshape(4, 4)
        b = np_word_map(heads_first(qb[row]), heads_first(kb[row]), list(BLEND)).reshape(2, 2)
        b = F.interpolate(torch.tensor(b)[None, None], size=(4, 4), mode="bilinear", align_corners=False)[0, 0]
        steps.append((a + b.numpy()) / 2)
    agg = np.mean(steps, 0)
    norm = (agg - agg.min()) / (agg.max() - agg.min())
    return np.kron(norm > 0.2, np.ones((2, 2), bool)).reshape(-1)


def ref_kv(call, key, ref, n):
    layout = call["opts"][ROWS_KEY]
    q, k, v, _ = call["seen"][("attn1", key)]
    row = n + layout.rows[(ref, COND)]
    return heads_first(k[row]), heads_first(v[row])


def plain_row(call, key, row):
    q, k, v, _ = call["seen"][("attn1", key)]
    return sdpa_attention(q[row:row + 1], k[row:row + 1], v[row:row + 1], HEADS)[0].numpy()


def structure_row(call, key, row, ref, n, grid):
    q, k, v, _ = call["seen"][("attn1", key)]
    ks, vs = ref_kv(call, key, ref, n)
    exp, _ = reference_mrsa(heads_first(q[row]), heads_first(k[row]), heads_first(v[row]), [ks], [vs],
                            [grid_mask(ref.mask, grid)], [3.0])
    return exp


def appearance_row(call, row, ref, n, ms):
    q, k, v, _ = call["seen"][("attn1", APP)]
    ka, va = ref_kv(call, APP, ref, n)
    return np_appearance(heads_first(q[row]), heads_first(k[row]), heads_first(v[row]), ka, va, ms,
                         grid_mask(ref.mask, 8))


@pytest.mark.parametrize("labels,batch", [([1, 0], 1), ([0, 1], 2), ([0], 1)])
def test_phases_switch_by_sigma(labels, batch):
    refs = make_refs()
    tech = dmsa(refs)
    unet = StandinUNet(BLOCKS)
    n = batch * len(labels)
    g = torch.Generator().manual_seed(1)
    x, c = torch.randn(n, 4, 8, 8, generator=g), torch.randn(n, 77, 16, generator=g)
    outs = sample(unet, tech, x, c, labels)
    assert all(o.shape == x.shape for o in outs)
    # structure phase only at 8 and 6 (one reference row), both references from 4.5 on
    assert [call["x"].shape[0] for call in unet.calls] == [n + 1, n + 1, n + 2, n + 2]
    cond = [i for j, lab in enumerate(labels) if lab == 0 for i in range(j * batch, (j + 1) * batch)]
    for step, call in enumerate(unet.calls):
        sigma = float(SCHEDULE[step])
        for row in range(n):
            got_s = call["seen"][("attn1", STRUCT)][3][row].numpy()
            got_a = call["seen"][("attn1", APP)][3][row].numpy()
            if row not in cond:   # uncond rows: plain everywhere
                np.testing.assert_allclose(got_s, plain_row(call, STRUCT, row), atol=1e-10)
                np.testing.assert_allclose(got_a, plain_row(call, APP, row), atol=1e-10)
                continue
            np.testing.assert_allclose(got_s, structure_row(call, STRUCT, row, refs[0], n, 4), atol=1e-9)
            if sigma > 4.5:
                np.testing.assert_allclose(got_a, structure_row(call, APP, row, refs[0], n, 8), atol=1e-9)
            else:
                ms = expected_blend(unet.calls[:step], row)
                assert 0 < ms.sum() < 64, "a meaningful blend mask"
                np.testing.assert_allclose(got_a, appearance_row(call, row, refs[1], n, ms), atol=1e-9)
        for r in range(n, call["x"].shape[0]):   # reference rows: plain
            np.testing.assert_allclose(call["seen"][("attn1", APP)][3][r].numpy(), plain_row(call, APP, r),
                                       atol=1e-10)
    # attn2 output is never changed
    for call in unet.calls:
        q2, k2, v2, o2 = call["seen"][("attn2", MAP_A)]
        torch.testing.assert_close(o2, sdpa_attention(q2, k2, v2, HEADS))


def test_maps_of_an_earlier_run_are_never_used():
    refs = make_refs()
    tech = dmsa(refs, appearance=(10.0, 0.0))          # appearance phase from the first step on
    unet = StandinUNet(BLOCKS)
    g = torch.Generator().manual_seed(2)
    labels, n = [1, 0], 2
    x1, x2, x3 = (torch.randn(n, 4, 8, 8, generator=g) for _ in range(3))
    c = torch.randn(n, 77, 16, generator=g)
    sample(unet, tech, x1, c, labels)                  # run 1: schedule 8, 6, 4, 2
    first = len(unet.calls)
    other = torch.tensor([7.0, 3.0, 0.0])
    sample(unet, tech, x2, c, labels, other)           # run 2: another schedule
    c0, c1 = unet.calls[first:]
    # its first step: run 1's maps at 8 are above 7 but not of this schedule -> no maps, structure phase
    np.testing.assert_allclose(c0["seen"][("attn1", APP)][3][1].numpy(), structure_row(c0, APP, 1, refs[0], n, 8),
                               atol=1e-9)
    # its second step: only the maps of its own first step
    np.testing.assert_allclose(c1["seen"][("attn1", APP)][3][1].numpy(),
                               appearance_row(c1, 1, refs[1], n, expected_blend([c0], 1)), atol=1e-9)
    # run 3 with run 1's schedule: its steps overwrite run 1's maps, nothing of run 1 leaks in
    third = len(unet.calls)
    sample(unet, tech, x3, c, labels)
    calls = unet.calls[third:]
    np.testing.assert_allclose(calls[0]["seen"][("attn1", APP)][3][1].numpy(),
                               structure_row(calls[0], APP, 1, refs[0], n, 8), atol=1e-9)
    for step in (1, 2, 3):
        np.testing.assert_allclose(calls[step]["seen"][("attn1", APP)][3][1].numpy(),
                                   appearance_row(calls[step], 1, refs[1], n, expected_blend(calls[:step], 1)),
                                   atol=1e-9)


def test_spatial_normalisation_switches_on_by_sigma():
    refs = make_refs()
    tech = dmsa(refs, appearance=None, norm=(6.5, 0.0))
    unet = StandinUNet(BLOCKS)
    g = torch.Generator().manual_seed(3)
    x, c = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 16, generator=g)
    sample(unet, tech, x, c, [1, 0], torch.tensor([8.0, 6.0, 0.0]))
    assert tech.keys("attn2") == frozenset()           # no appearance phase: no maps recorded
    c8, c6 = unet.calls
    np.testing.assert_allclose(c8["seen"][("attn1", STRUCT)][3][1].numpy(), structure_row(c8, STRUCT, 1, refs[0], 2, 4),
                               atol=1e-9)
    q, k, v, o = c6["seen"][("attn1", STRUCT)]
    ks, vs = ref_kv(c6, STRUCT, refs[0], 2)
    exp = np_structure_norm(heads_first(q[1]), heads_first(k[1]), heads_first(v[1]), ks, vs,
                            grid_mask(refs[0].mask, 4), 3.0)
    np.testing.assert_allclose(o[1].numpy(), exp, atol=1e-9)


def plain_outputs(x, c, labels, schedule=SCHEDULE):
    unet = StandinUNet(BLOCKS)
    n = x.shape[0]
    return [unet(x, torch.full((n,), s), None, c, None, {"cond_or_uncond": labels, "sigmas": torch.full((n,), s)})
            for s in schedule[:-1].tolist()]


def test_disabled_phases_and_empty_structure_mask_are_plain():
    g = torch.Generator().manual_seed(4)
    x, c = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 16, generator=g)
    plain = plain_outputs(x, c, [1, 0])
    off = dmsa(make_refs(), structure=None, appearance=None)
    assert off.keys("attn1") == frozenset() and not off.active(5.0)
    unet = StandinUNet(BLOCKS)
    for got, exp in zip(sample(unet, off, x, c, [1, 0]), plain):
        torch.testing.assert_close(got, exp)
    assert all(call["x"].shape[0] == 2 for call in unet.calls)
    empty = dmsa(make_refs(struct_mask=torch.zeros(64, 64)), appearance=None)
    for got, exp in zip(sample(StandinUNet(BLOCKS), empty, x, c, [1, 0]), plain):
        torch.testing.assert_close(got, exp)


def test_constant_blend_map_gives_plain_appearance_blocks():
    refs = make_refs()
    tech = dmsa(refs)
    unet = StandinUNet(BLOCKS)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 8, 8, generator=g)
    c = torch.randn(2, 1, 16, generator=g).expand(2, 77, 16).contiguous()   # identical text tokens: uniform maps
    sample(unet, tech, x, c, [1, 0])
    for call in unet.calls[2:]:
        np.testing.assert_allclose(call["seen"][("attn1", APP)][3][1].numpy(), plain_row(call, APP, 1), atol=1e-10)
        np.testing.assert_allclose(call["seen"][("attn1", STRUCT)][3][1].numpy(),
                                   structure_row(call, STRUCT, 1, refs[0], 2, 4), atol=1e-9)


def test_maps_recorded_before_the_structure_phase_starts():
    """Only the appearance phase: no reference rows before it starts, but the maps are recorded
    from the first step (calls without a reference layout)."""
    refs = make_refs()
    tech = dmsa(refs, structure=None)
    unet = StandinUNet(BLOCKS)
    g = torch.Generator().manual_seed(6)
    x, c = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 16, generator=g)
    outs = sample(unet, tech, x, c, [1, 0])
    plain = plain_outputs(x, c, [1, 0])
    assert [call["x"].shape[0] for call in unet.calls] == [2, 2, 3, 3]
    torch.testing.assert_close(outs[0], plain[0])
    torch.testing.assert_close(outs[1], plain[1])
    call = unet.calls[2]
    np.testing.assert_allclose(call["seen"][("attn1", APP)][3][1].numpy(),
                               appearance_row(call, 1, refs[1], 2, expected_blend(unet.calls[:2], 1)), atol=1e-9)
    np.testing.assert_allclose(call["seen"][("attn1", STRUCT)][3][1].numpy(), plain_row(call, STRUCT, 1), atol=1e-10)


def test_separate_pass_with_foreign_patches_equals_joint():
    """Also with a block that is both a structure block and a map block (SD1.5 output 4, 5): its
    cross-attention must not overwrite the banked self-attention keys of the references."""
    g = torch.Generator().manual_seed(7)
    x, c = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 16, generator=g)
    maps = (MAP_A, MAP_B, STRUCT)
    joint = sample(StandinUNet(BLOCKS), dmsa(make_refs(), maps=maps), x, c, [1, 0])
    seen = []

    def foreign(q, k, v, eo):
        seen.append(q.shape[0])
        return sdpa_attention(q, k, v, eo["n_heads"])

    unet = StandinUNet(BLOCKS, foreign={STRUCT: foreign})
    sep = sample(unet, dmsa(make_refs(), maps=maps), x, c, [1, 0], extra={"patches_replace": unet.replace_table()})
    assert len(unet.calls) == 8, "references in their own call before the target at every step"
    for a, b in zip(sep, joint):
        torch.testing.assert_close(a, b)


def test_uncond_only_calls_record_nothing_and_stay_plain():
    refs = make_refs()
    tech = dmsa(refs)
    unet = StandinUNet(BLOCKS)
    x, c = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 16)
    out = sample(unet, tech, x, c, [1])
    plain = plain_outputs(x, c, [1])
    for a, b in zip(out, plain):
        torch.testing.assert_close(a, b)
    assert tech.maps.completed(0, 0.0, tuple(SCHEDULE.tolist())) == []


def test_technique_rejects_bad_settings():
    refs = make_refs()
    with pytest.raises(ValueError, match="no token positions"):
        DisentangleMixingAttention(refs[0], refs[1], [STRUCT], [APP], [MAP_A], SigmaRange(10, 0), SigmaRange(4, 0),
                                   blend_tokens=())
    with pytest.raises(ValueError, match="outside the prompt's 77 tokens"):
        DisentangleMixingAttention(refs[0], refs[1], [STRUCT], [APP], [MAP_A], SigmaRange(10, 0), SigmaRange(4, 0),
                                   blend_tokens=(80,), prompt_tokens=77)
    with pytest.raises(ValueError, match="blend-map layers"):
        DisentangleMixingAttention(refs[0], refs[1], [STRUCT], [APP], [], SigmaRange(10, 0), SigmaRange(4, 0),
                                   blend_tokens=(5,))
    with pytest.raises(ValueError, match="threshold"):
        dmsa(refs, threshold=1.5)
    with pytest.raises(ValueError, match="structure reference and an appearance reference"):
        DisentangleMixingAttention(refs[0], None, [STRUCT], [APP], [MAP_A], None, None)
    # no appearance phase: the blend word is not needed
    DisentangleMixingAttention(refs[0], refs[1], [STRUCT], [APP], [MAP_A], SigmaRange(10, 0), None)


def test_token_columns_follow_repeated_prompts():
    tech = dmsa(make_refs())
    assert tech.token_columns(77) == [5, 6]
    assert tech.token_columns(154) == [5, 6, 82, 83]


# --------------------------------------------------------------------------- runs and the sampled prompt

class _Patcher:                      # what install.new_run reads of a ModelPatcher
    def __init__(self, tech):
        self.model_options = {"transformer_options": {STATE_KEY: PersonalizeState().with_technique(tech)}}


def test_a_new_run_forgets_the_maps_of_the_last_one():
    """Two schedules whose first sigmas differ in the last bits: without the reset at the start of a
    run, the first run's map at 8.0 counts as a completed step of the second (the issue's stale map);
    with it (ComfyUI calls ``new_run`` through ON_PRE_RUN), the second run is exactly a fresh one."""
    from personalize_pack.attention.install import new_run
    refs = make_refs()
    g = torch.Generator().manual_seed(5)
    x1, x2 = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    c = torch.randn(2, 77, 16, generator=g)
    near = torch.tensor([8.0 * (1 + 3e-7), 6.0, 4.0, 2.0, 0.0])

    def second_run(reset):
        tech = dmsa(refs)
        sample(StandinUNet(BLOCKS), tech, x1, c, [1, 0])
        if reset:
            new_run(_Patcher(tech))
        return sample(StandinUNet(BLOCKS), tech, x2, c, [1, 0], near)

    fresh = sample(StandinUNet(BLOCKS), dmsa(refs), x2, c, [1, 0], near)
    stale = second_run(reset=False)
    assert max(float((a - b).abs().max()) for a, b in zip(stale, fresh)) > 1e-6   # the defect, without the reset
    for a, b in zip(second_run(reset=True), fresh):
        assert torch.equal(a, b)


def _checked(prompt, **kw):
    return dmsa(make_refs(), prompt_conds=[prompt], prompt_text="a photo of a dog", **kw)


def test_the_sampled_conditioning_must_be_the_nodes_prompt():
    g = torch.Generator().manual_seed(9)
    prompt = torch.randn(1, 77, 16, generator=g)
    tech = _checked(prompt)
    ctx = torch.cat([prompt, torch.randn(1, 77, 16, generator=g)])   # cond row, uncond row
    tech.check_call([COND, 1], ctx, 8.0)                              # the uncond row may be anything
    tech.check_call([COND, 1], torch.cat([prompt.repeat(1, 2, 1), torch.zeros(1, 154, 16)]), 8.0)  # repeated
    tech.check_call([COND], prompt + 1e-5, 8.0)                      # rounding
    other = prompt.clone()
    other[0, 6] += 0.5                                               # one token differs
    for bad in (other, prompt[:, :76], torch.cat([prompt, other], 1), torch.randn(1, 77, 32, generator=g)):
        with pytest.raises(ValueError, match=r"prompt: the positive conditioning being sampled is not the "
                                             r"encoding of this Disentangle-Mixing node's prompt \('a photo of a dog'\)"):
            tech.check_call([COND], bad, 8.0)
    with pytest.raises(ValueError, match="prompt: the positive"):
        tech.check_call([1, COND], torch.cat([prompt, other]), 8.0)      # the cond row is the second
    _checked(prompt, appearance=(4.5, 2.0)).check_call([COND], other, 1.0)   # after the phase, maps no longer count
    _checked(prompt, appearance=None).check_call([COND], other, 8.0)   # no appearance phase: no blend word
    dmsa(make_refs()).check_call([COND], other, 8.0)                 # built without the prompt: unchecked


def test_the_reference_pass_checks_every_call_before_it_runs():
    g = torch.Generator().manual_seed(4)
    prompt = torch.randn(1, 77, 16, generator=g)
    x = torch.randn(2, 4, 8, 8, generator=g)
    unet = StandinUNet(BLOCKS)
    outs = sample(unet, _checked(prompt), x, torch.cat([prompt, torch.zeros_like(prompt)]), [COND, 1])
    assert len(outs) == 4 and len(unet.calls) >= 4
    unet = StandinUNet(BLOCKS)
    with pytest.raises(ValueError, match="prompt: the positive conditioning being sampled"):
        sample(unet, _checked(prompt), x, torch.cat([prompt.flip(1), prompt]), [COND, 1])
    assert unet.calls == []                 # refused before the model ran
