"""MIP-Adapter's weighted merge (docs/algorithms.md §3) against an independent float64 computation
written out per head, the documented §3.9 figures, and the technique called the way ComfyUI calls
an attn2 replace."""
import numpy as np
import pytest
import torch

from personalize_pack.attention.kernels import sdpa_attention
from personalize_pack.attention.mip import EncodedPrompt, MultiImagePromptAttention, mip_delta, word_maps
from personalize_pack.attention.patch import (ROWS_KEY, STATE_KEY, PersonalizeAttention, PersonalizeState,
                                              RowLayout, SigmaRange)


def softmax(x, axis=-1):
    x = x - x.max(axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis, keepdims=True)


def heads(x, h):  # (n, h*d) -> (h, n, d)
    n, c = x.shape
    return x.reshape(n, h, c // h).transpose(1, 0, 2)


def attend(q, k, v, h):
    """Multi-head attention of one row, float64, explicit softmax over keys."""
    Q, K, V = heads(q, h), heads(k, h), heads(v, h)
    P = softmax(np.einsum("hnd,hmd->hnm", Q, K) / np.sqrt(Q.shape[-1]))
    return np.einsum("hnm,hmd->hnd", P, V).transpose(1, 0, 2).reshape(q.shape[0], -1)


def reference_mip(X, c_txt, c_ip, e, lengths, Wq, Wk, Wv, Wk_ip, Wv_ip, u, h, lam, weights=None, masks=None):
    """The paper's layer output before ``to_out``, for one sample, written plainly from §3.1.
    ``c_ip[i]`` tokens of object i, ``e[i]`` its entity embedding (token 0 = BOS), ``masks[i]``
    a per-position weight or None. Returns (out, w, t)."""
    M = len(c_ip)
    weights = [1.0] * M if weights is None else weights
    q = X @ Wq.T
    T = attend(q, c_txt @ Wk.T, c_txt @ Wv.T, h)
    O = [lam * attend(q, c_ip[i] @ Wk_ip.T, c_ip[i] @ Wv_ip.T, h) for i in range(M)]
    Q = heads(q, h)
    d = Q.shape[-1]
    A = []
    for i in range(M):
        Ke = heads(e[i] @ Wk.T, h)                                   # (h, tokens, d)
        P = softmax(np.einsum("hld,hnd->hln", Ke, Q) / np.sqrt(d), axis=-1)   # softmax over positions
        A.append(P.mean(0)[1:1 + lengths[i]].mean(0))
    A = np.stack(A)
    if masks is None or all(m is None for m in masks):
        w = A / A.sum(0, keepdims=True)
    else:
        w = np.zeros_like(A)
        claimed = np.zeros(A.shape[1])
        for i, m in enumerate(masks):
            if m is not None:
                w[i] = m
                claimed += m
        free = [i for i, m in enumerate(masks) if m is None]
        if free:
            w[free] = A[free] / A[free].sum(0, keepdims=True) * np.clip(1 - claimed, 0, None)
    sig = 1 / (1 + np.exp(-(T @ u)))
    t = sig / sig.mean()
    out = T + sum(w[i][:, None] * t[:, None] * weights[i] * O[i] for i in range(M))
    return out, w, t


def ours(X, c_txt, c_ip, e, lengths, Wq, Wk, Wv, Wk_ip, Wv_ip, u, h, lam, weights=None, masks=None):
    t64 = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float64))
    M = len(c_ip)
    weights = [1.0] * M if weights is None else weights
    q = t64(X @ Wq.T)[None]
    T = sdpa_attention(q, t64(c_txt @ Wk.T)[None], t64(c_txt @ Wv.T)[None], h)
    ip_k = [t64(c_ip[i] @ Wk_ip.T) for i in range(M)]
    ip_v = [t64(c_ip[i] @ Wv_ip.T) * lam * weights[i] for i in range(M)]
    ent = [t64(e[i][1:1 + lengths[i]] @ Wk.T) for i in range(M)]
    tm = None if masks is None else [None if m is None else t64(m) for m in masks]
    gate = None if u is None else t64(u)
    return (T + mip_delta(q, T, ip_k, ip_v, ent, h, tm, gate))[0].numpy()


def draw_39():
    rng = np.random.default_rng(2)
    X = rng.standard_normal((4, 4))
    c_txt = rng.standard_normal((3, 6))
    c_ip = rng.standard_normal((2, 2, 6))
    e = rng.standard_normal((2, 3, 6))
    Wq, Wk, Wv, Wk_ip, Wv_ip = (rng.standard_normal(s) for s in [(4, 4), (4, 6), (4, 6), (4, 6), (4, 6)])
    u = rng.standard_normal(4)
    return X, c_txt, c_ip, e, [1, 1], Wq, Wk, Wv, Wk_ip, Wv_ip, u


def test_documented_figures_39():
    args = draw_39()
    out, w, t = reference_mip(*args, h=2, lam=0.75)
    assert out.sum() == pytest.approx(-9.4554776, abs=1e-6)
    np.testing.assert_allclose(out[0], [1.4576045, -1.8664023, -2.7707238, -1.676199], atol=1e-6)
    np.testing.assert_allclose(w, [[0.9530002, 0.0962696, 0.3423791, 0.0823992],
                                   [0.0469998, 0.9037304, 0.6576209, 0.9176008]], atol=1e-6)
    np.testing.assert_allclose(t, [0.9686033, 1.015934, 1.0135212, 1.0019415], atol=1e-6)
    np.testing.assert_allclose(ours(*args, h=2, lam=0.75), out, atol=1e-10)


def random_case(seed, M, n=6, c=8, ctx=5, n_tok=3, L=(1, 2, 3)):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, c))
    c_txt = rng.standard_normal((4, ctx))
    c_ip = rng.standard_normal((M, n_tok, ctx))
    lengths = [L[i % len(L)] for i in range(M)]
    e = rng.standard_normal((M, 5, ctx))
    W = [rng.standard_normal((c, c))] + [rng.standard_normal((c, ctx)) for _ in range(4)]
    u = rng.standard_normal(c)
    return X, c_txt, c_ip, e, lengths, *W, u


@pytest.mark.parametrize("M", [1, 2, 3])
@pytest.mark.parametrize("gated", [False, True])
def test_merge_matches_independent(M, gated):
    X, c_txt, c_ip, e, L, Wq, Wk, Wv, Wki, Wvi, u = random_case(10 + M, M)
    u = u if gated else np.zeros_like(u)
    weights = [1.0, 0.5, 1.7][:M]
    want, w, _ = reference_mip(X, c_txt, c_ip, e, L, Wq, Wk, Wv, Wki, Wvi, u, h=2, lam=0.6, weights=weights)
    got = ours(X, c_txt, c_ip, e, L, Wq, Wk, Wv, Wki, Wvi, u if gated else None, h=2, lam=0.6, weights=weights)
    np.testing.assert_allclose(got, want, atol=1e-10)
    np.testing.assert_allclose(w.sum(0), 1.0, atol=1e-12)      # the split always sums to one


@pytest.mark.parametrize("which", [[0], [0, 2], [0, 1, 2]])
def test_masks_override_word_maps(which):
    X, c_txt, c_ip, e, L, Wq, Wk, Wv, Wki, Wvi, u = random_case(5, 3)
    rng = np.random.default_rng(9)
    masks = [rng.uniform(0, 0.5, size=X.shape[0]) if i in which else None for i in range(3)]
    want, w, _ = reference_mip(X, c_txt, c_ip, e, L, Wq, Wk, Wv, Wki, Wvi, u, h=2, lam=1.0, masks=masks)
    got = ours(X, c_txt, c_ip, e, L, Wq, Wk, Wv, Wki, Wvi, u, h=2, lam=1.0, masks=masks)
    np.testing.assert_allclose(got, want, atol=1e-10)
    for i in which:
        np.testing.assert_allclose(w[i], masks[i])
    # Where the masks claim everything, the unmasked references get nothing.
    full = [np.ones(X.shape[0]) if i == 0 else None for i in range(3)]
    _, w_full, _ = reference_mip(X, c_txt, c_ip, e, L, Wq, Wk, Wv, Wki, Wvi, u, h=2, lam=1.0, masks=full)
    np.testing.assert_allclose(w_full[1:], 0.0)


def test_one_reference_is_plain_ip_adapter():
    """N = 1, weight 1, no gate: T + lambda * O (IP-Adapter's decoupled cross-attention)."""
    X, c_txt, c_ip, e, L, Wq, Wk, Wv, Wki, Wvi, _ = random_case(3, 1)
    q = X @ Wq.T
    plain = attend(q, c_txt @ Wk.T, c_txt @ Wv.T, 2) + 0.8 * attend(q, c_ip[0] @ Wki.T, c_ip[0] @ Wvi.T, 2)
    got = ours(X, c_txt, c_ip, e, L, Wq, Wk, Wv, Wki, Wvi, None, h=2, lam=0.8)
    np.testing.assert_allclose(got, plain, atol=1e-10)


def test_identical_references_without_gate_reduce_to_one():
    """§3.9 property: c_ip,1 = c_ip,2 and u = 0 give T + lambda * O_1, whatever the word maps."""
    X, c_txt, c_ip, e, L, Wq, Wk, Wv, Wki, Wvi, _ = random_case(4, 2)
    c_ip[1] = c_ip[0]
    single = ours(X, c_txt, c_ip[:1], e[:1], L[:1], Wq, Wk, Wv, Wki, Wvi, None, h=2, lam=0.75)
    both = ours(X, c_txt, c_ip, e, L, Wq, Wk, Wv, Wki, Wvi, np.zeros(X.shape[1]), h=2, lam=0.75)
    np.testing.assert_allclose(both, single, atol=1e-10)


def test_word_maps_are_distributions_over_positions():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 9, 8, generator=g)
    ents = [torch.randn(1, 8, generator=g), torch.randn(3, 8, generator=g)]
    A = word_maps(q.half(), [x.half() for x in ents], 2)
    assert A.dtype == torch.float32 and A.shape == (2, 2, 9)
    torch.testing.assert_close(A.sum(-1), torch.ones(2, 2))


# --------------------------------------------------------------------------- the technique

HEADS, C, CTX, NTOK = 2, 8, 6, 2
KEY = ("output", 3, 0)


def make_technique(M=2, scale=0.7, masks=None, sigma_range=(10.0, 1.0), gate=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    prompts = [EncodedPrompt(f"obj{i}", r(NTOK, CTX), r(NTOK, CTX), r(i + 1, CTX), r(i + 1, CTX),
                             None if masks is None else masks[i], weight=1.0 + 0.5 * i) for i in range(M)]
    wk = r(C, CTX)
    layers = {KEY: (r(C, CTX), r(C, CTX), r(C) if gate else None)}
    tech = MultiImagePromptAttention(prompts, layers, lambda key, x: x @ wk.T.to(x.dtype), SigmaRange(*sigma_range),
                                     scale)
    return tech, prompts, layers, wk


def call(tech, q, k, v, labels, sigma=5.0, layout=None, hw=(2, 3)):
    state = PersonalizeState().with_technique(tech)
    eo = {STATE_KEY: state, "cond_or_uncond": labels, "sigmas": torch.full((q.shape[0],), sigma),
          "block": KEY[:2], "block_index": KEY[2], "n_heads": HEADS, "dim_head": C // HEADS,
          "original_shape": [q.shape[0], 4, *hw]}
    if layout is not None:
        eo[ROWS_KEY] = layout
    return PersonalizeAttention("attn2")(q, k, v, eo)


def expected_row(tech, prompts, layers, wk, q, k, v, label, masks=None):
    wki, wvi, gate = layers[KEY]
    toks = [p.tokens if label == 0 else p.uncond_tokens for p in prompts]
    ents = [p.entity if label == 0 else p.uncond_entity for p in prompts]
    T = sdpa_attention(q[None], k[None], v[None], HEADS)
    delta = mip_delta(q[None], T, [t @ wki.T for t in toks],
                      [t @ wvi.T * tech.scale * p.weight for t, p in zip(toks, prompts)],
                      [x @ wk.T for x in ents], HEADS, masks, gate)
    return (T + delta)[0]


def qkv(rows, n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, n, C, generator=g, dtype=torch.float64),
            torch.randn(rows, 4, C, generator=g, dtype=torch.float64),
            torch.randn(rows, 4, C, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("labels", [[1, 0], [0, 1], [0], [1, 0, 1, 0]])
def test_technique_uses_cond_and_uncond_prompts_by_label(labels):
    tech, prompts, layers, wk = make_technique()
    q, k, v = qkv(2 * len(labels))
    out = call(tech, q, k, v, labels)
    chunk = q.shape[0] // len(labels)
    for j, lab in enumerate(labels):
        for i in range(j * chunk, (j + 1) * chunk):
            torch.testing.assert_close(out[i], expected_row(tech, prompts, layers, wk, q[i], k[i], v[i], lab))
    # cond and uncond really differ (image tokens vs. the empty image's tokens)
    a = expected_row(tech, prompts, layers, wk, q[0], k[0], v[0], 0)
    b = expected_row(tech, prompts, layers, wk, q[0], k[0], v[0], 1)
    assert (a - b).abs().max() > 1e-3


def test_technique_masks_resized_to_the_layer_grid():
    mask0 = torch.zeros(8, 12)
    mask0[:, :6] = 1.0                       # left half of a 2x3 token grid: columns 0 and the half of 1
    tech, prompts, layers, wk = make_technique(masks=[mask0, None])
    q, k, v = qkv(2)
    out = call(tech, q, k, v, [1, 0])
    grid = torch.tensor([[1.0, 0.5, 0.0], [1.0, 0.5, 0.0]], dtype=torch.float64).reshape(-1)
    torch.testing.assert_close(out[1], expected_row(tech, prompts, layers, wk, q[1], k[1], v[1], 0, [grid, None]))


def test_technique_inactive_outside_sigma_range_and_at_scale_zero():
    q, k, v = qkv(2)
    plain = sdpa_attention(q, k, v, HEADS)
    tech, *_ = make_technique(sigma_range=(3.0, 1.0))
    torch.testing.assert_close(call(tech, q, k, v, [1, 0], sigma=5.0), plain)
    assert not torch.allclose(call(tech, q, k, v, [1, 0], sigma=2.0), plain)
    tech0, *_ = make_technique(scale=0.0)
    assert torch.equal(call(tech0, q, k, v, [1, 0], sigma=2.0), plain)


def test_reference_rows_of_another_technique_stay_plain():
    """With MRSA's reference rows in the batch (joint layout), only the target rows get the image prompts."""
    tech, prompts, layers, wk = make_technique()
    q, k, v = qkv(4)
    layout = RowLayout("joint", [1, 0], 2, (2, 3), 5.0)
    out = call(tech, q, k, v, [1, 0], layout=layout)
    plain = sdpa_attention(q, k, v, HEADS)
    torch.testing.assert_close(out[2:], plain[2:])
    torch.testing.assert_close(out[1], expected_row(tech, prompts, layers, wk, q[1], k[1], v[1], 0))


def test_wrapped_foreign_replace_is_called_and_kept():
    tech, prompts, layers, wk = make_technique(M=1, gate=False)
    q, k, v = qkv(2)
    seen = []

    def foreign(q_, k_, v_, eo):
        seen.append(q_.shape[0])
        return sdpa_attention(q_, k_, v_, HEADS) * 2.0
    state = PersonalizeState().with_technique(tech)
    eo = {STATE_KEY: state, "cond_or_uncond": [1, 0], "sigmas": torch.full((2,), 5.0), "block": KEY[:2],
          "block_index": 0, "n_heads": HEADS, "dim_head": C // HEADS, "original_shape": [2, 4, 2, 3]}
    out = PersonalizeAttention("attn2", foreign)(q, k, v, eo)
    assert seen == [2]
    wki, wvi, _ = layers[KEY]
    O = sdpa_attention(q[1:], (prompts[0].tokens @ wki.T)[None], (prompts[0].tokens @ wvi.T)[None], HEADS)
    torch.testing.assert_close(out[1:], 2.0 * sdpa_attention(q[1:], k[1:], v[1:], HEADS) + tech.scale * O)


# --------------------------------------------------------------------------- image prompts

def test_image_prompt_framing_and_checks():
    from personalize_pack.references.image_prompt import make_image_prompt, mean_colour_image, square_pad
    img = torch.rand(2, 30, 50, 3)
    sq = square_pad(img)
    assert sq.shape == (2, 50, 50, 3)
    torch.testing.assert_close(sq[:, 10:40], img)
    assert torch.all(sq[:, :10] == 1.0) and torch.all(sq[:, 40:] == 1.0)     # white bands, image untouched
    mean = (0.48145466, 0.4578275, 0.40821073)
    m = mean_colour_image(mean)
    assert m.shape == (1, 224, 224, 3)
    assert float((m[0, 0, 0] - torch.tensor(mean)).abs().max()) <= 0.5 / 255 + 1e-7
    p = make_image_prompt(torch.rand(1, 8, 8, 4), "  cat ", 0.5, torch.ones(16, 16) * 255)
    assert p.entity == "cat" and p.image.shape[-1] == 3 and float(p.mask.max()) == 1.0
    for bad, msg in ((dict(entity=""), "entity: empty"), (dict(crop="stretch"), "crop: unknown"),
                     (dict(mask=torch.ones(3, 8, 8)), "3 masks given"), (dict(mask=torch.zeros(8, 8)), "mask is empty")):
        kw = dict(image=torch.rand(1, 8, 8, 3), entity="cat")
        kw.update(bad)
        with pytest.raises(ValueError, match=msg):
            make_image_prompt(**kw)


def test_freecure_foundation_rows_get_no_image_prompts():
    """On a model that also runs FreeCure's foundation branch, the image prompts (an identity) act on
    the personalised rows only, and not at all in the foundation branch's own call."""
    from personalize_pack.attention.fasa import BRANCH_KEY, BranchLayout
    tech, prompts, layers, wk = make_technique()
    q, k, v = qkv(4)
    plain = sdpa_attention(q, k, v, HEADS)
    state = PersonalizeState().with_technique(tech)
    base = {STATE_KEY: state, "cond_or_uncond": [1, 0], "sigmas": torch.full((4,), 5.0), "block": KEY[:2],
            "block_index": 0, "n_heads": HEADS, "dim_head": C // HEADS, "original_shape": [4, 4, 2, 3]}
    joint = PersonalizeAttention("attn2")(q, k, v, dict(base, **{BRANCH_KEY: BranchLayout("joint", [1, 0], 1, 5.0)}))
    torch.testing.assert_close(joint[[1, 3]], plain[[1, 3]])                 # foundation rows untouched
    torch.testing.assert_close(joint[0], expected_row(tech, prompts, layers, wk, q[0], k[0], v[0], 1))
    torch.testing.assert_close(joint[2], expected_row(tech, prompts, layers, wk, q[2], k[2], v[2], 0))
    rec = PersonalizeAttention("attn2")(q, k, v, dict(base, **{BRANCH_KEY: BranchLayout("record", [1, 0], 2, 5.0)}))
    torch.testing.assert_close(rec, plain)
