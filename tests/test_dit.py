"""The DiT (FLUX) path of the self-attention techniques without ComfyUI: the joint-attention kernel
with reference tokens against an independent float64 computation, RoPE rotations against complex
arithmetic, the attention override of a patched block on a hand-made batch, the block replace's
row handling, presets and the model-family check."""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from personalize_pack.attention.blocks import (DOUBLE, FLUX_ALL, FLUX_DOUBLE, FLUX_SINGLE, SINGLE, DiTSpec,
                                               model_family, parse_dit_blocks, resolve_dit_blocks)
from personalize_pack.attention.dit import ALIGNED, SHIFTED, RopeGrid
from personalize_pack.attention.dit_blocks import JointAttention, PersonalizeBlock
from personalize_pack.attention.dmsa_kernels import appearance_attention
from personalize_pack.attention.kernels import Rope, joint_reference_attention, select_reference_keys, sdpa_attention
from personalize_pack.attention.mrsa import MultiReferenceAttention
from personalize_pack.attention.patch import LATENT_KEY, ROWS_KEY, STATE_KEY, PersonalizeState, RowLayout, SigmaRange
from personalize_pack.references.reference import Reference


# ---------------------------------------------------------------------------- independent references

def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_joint(q, k, v, refs, heads, T, N):
    """float64 joint attention of one row: q, k, v [L, h*d]; refs: list of (k_r [M, h*d], v_r, bias [M])
    (selected tokens only). Text queries (outside T..T+N) attend over the own keys; image queries over
    own keys plus the reference tokens with their bias."""
    L, C = q.shape
    d = C // heads
    out = np.zeros((L, C))
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        for i in range(L):
            keys, vals, bias = [k[:, sl]], [v[:, sl]], [np.zeros(L)]
            if T <= i < T + N:
                for kr, vr, br in refs:
                    keys.append(kr[:, sl])
                    vals.append(vr[:, sl])
                    bias.append(br)
            K, V, b = np.concatenate(keys), np.concatenate(vals), np.concatenate(bias)
            p = softmax(q[i, sl] @ K.T / np.sqrt(d) + b)
            out[i, sl] = p @ V
    return out


def np_rotate(x, pos, axes_dim, theta):
    """RoPE by complex multiplication: channel pairs (2j, 2j+1) of every head as x0 + i*x1, turned by
    pos[axis] * theta^(-2j'/d_axis) for the pair's axis and index j' within it."""
    d = sum(axes_dim)
    angles = []
    for a, da in enumerate(axes_dim):
        for j in range(da // 2):
            angles.append(pos[..., a] * theta ** (-2.0 * j / da))
    ang = np.stack(angles, -1)                                   # [..., d/2]
    n, c = x.shape
    z = x.reshape(n, c // d, d // 2, 2)
    zc = (z[..., 0] + 1j * z[..., 1]) * np.exp(1j * ang)[:, None, :]
    return np.stack([zc.real, zc.imag], -1).reshape(n, c)


# ---------------------------------------------------------------------------- the kernel

def _case(seed=0, heads=2, d=8, T=3, N=6, M=(6, 6)):
    g = torch.Generator().manual_seed(seed)
    L = T + N
    q, k, v = (torch.randn(1, L, heads * d, generator=g, dtype=torch.float64) for _ in range(3))
    rk = [torch.randn(m, heads * d, generator=g, dtype=torch.float64) for m in M]
    rv = [torch.randn(m, heads * d, generator=g, dtype=torch.float64) for m in M]
    return q, k, v, rk, rv


def test_joint_kernel_matches_independent_computation():
    heads, T, N = 2, 3, 6
    q, k, v, rk, rv = _case(heads=heads, T=T, N=N)
    masks = [torch.tensor([0, 1, 1, 0, 1, 0], dtype=torch.float64), torch.tensor([1, 0, 0, 0, 0, 1.0])]
    weights = [2.5, -1.0]
    refs = select_reference_keys(torch.stack(rk), torch.stack(rv), masks, weights)
    out = joint_reference_attention(q, k, v, refs, heads, slice(T, T + N))
    sel = [(rk[r][m != 0].numpy(), rv[r][m != 0].numpy(), (weights[r] * m[m != 0]).numpy()) for r, m in enumerate(masks)]
    want = np_joint(q[0].numpy(), k[0].numpy(), v[0].numpy(), sel, heads, T, N)
    np.testing.assert_allclose(out[0].numpy(), want, rtol=1e-10, atol=1e-12)
    # text queries see only their own keys: exactly plain joint attention
    plain = sdpa_attention(q, k, v, heads)
    torch.testing.assert_close(out[:, :T], plain[:, :T], rtol=0, atol=0)
    # the references do change the image queries
    assert (out[:, T:] - plain[:, T:]).abs().max() > 1e-3


def test_joint_kernel_empty_masks_and_zero_weight_are_plain_joint_attention():
    heads, T, N = 2, 3, 6
    q, k, v, rk, rv = _case(seed=1, heads=heads, T=T, N=N)
    plain = sdpa_attention(q, k, v, heads)
    empty = select_reference_keys(torch.stack(rk), torch.stack(rv), [torch.zeros(6), torch.zeros(6)], [3.0, 3.0])
    assert empty is None
    torch.testing.assert_close(joint_reference_attention(q, k, v, empty, heads, slice(T, T + N)), plain)
    zero_w = select_reference_keys(torch.stack(rk), torch.stack(rv), [torch.ones(6), torch.ones(6)], [0.0, 0.0])
    torch.testing.assert_close(joint_reference_attention(q, k, v, zero_w, heads, slice(T, T + N)), plain)


# ---------------------------------------------------------------------------- RoPE

def test_rope_rotation_matches_complex_arithmetic_and_composes():
    rope = Rope(10000.0, (4, 6, 6))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 2 * 16, generator=g, dtype=torch.float64)
    pos = torch.tensor([[0, 1, 2], [0, 3, 0], [1, 0, 7], [0, 2, 5], [2, 4, 1]], dtype=torch.float64)
    got = rope.rotate(x, pos).double()
    want = np_rotate(x.numpy(), pos.numpy(), (4, 6, 6), 10000.0)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)    # computed in float32
    # turning by a then by b is turning by a + b, and a shared delta broadcasts over the tokens
    delta = torch.tensor([0.0, 0.0, 3.0])
    twice = rope.rotate(rope.rotate(x, pos), delta)
    torch.testing.assert_close(twice.double(), rope.rotate(x, pos + delta).double(), rtol=1e-5, atol=1e-5)
    # the score of a query and a key depends only on their position difference
    qx, kx = x[:1], x[1:2]
    s1 = (rope.rotate(qx, torch.tensor([0.0, 2, 3])) * rope.rotate(kx, torch.tensor([0.0, 1, 1]))).sum()
    s2 = (rope.rotate(qx, torch.tensor([0.0, 5, 9])) * rope.rotate(kx, torch.tensor([0.0, 4, 7]))).sum()
    assert float(s1) == pytest.approx(float(s2), rel=1e-5)


def test_rope_grid_positions_and_moves():
    grid = RopeGrid(Rope(10000.0, (4, 6, 6)), (2, 3))
    pos = grid.positions(6)
    assert pos[:, 1].tolist() == [0, 0, 0, 1, 1, 1] and pos[:, 2].tolist() == [0, 1, 2, 0, 1, 2]
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    beside = grid.beside(x, 2)                         # two grid widths (6 columns) to the right
    torch.testing.assert_close(beside, grid.rope.rotate(x, torch.tensor([0.0, 0.0, 6.0])))
    src, dst = torch.tensor([0, 5]), torch.tensor([4, 1])
    moved = grid.moved(x[:2], src, dst)               # token 0 -> position of 4, token 5 -> position of 1
    want = grid.rope.rotate(x[:2], pos[dst] - pos[src])
    torch.testing.assert_close(moved, want)
    with pytest.raises(ValueError, match="whole number of 16-channel heads"):
        grid.rope.rotate(torch.zeros(2, 20), torch.zeros(3))


# ---------------------------------------------------------------------------- the attention override

SPEC = DiTSpec("flux", 2, 2, 2, Rope(10000.0, (4, 6, 6)))
HW = (4, 6)                       # latent 4x6 -> 2x3 image tokens
HEADS, T, N = 2, 3, 6


def fake_attention(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False,
                   transformer_options=None, **kw):
    """ComfyUI's attention signature: [B, h, L, d] with skip_reshape, else [B, L, h*d]."""
    if not skip_reshape:
        b, n, c = q.shape
        q, k, v = (t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    if skip_output_reshape:
        return out
    return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)


def token_mask(tokens):
    """A 32x48 pixel mask (latent 4x6, downscale 8) covering the listed tokens of the 2x3 grid."""
    m = torch.zeros(32, 48)
    for t in tokens:
        r, c = divmod(t, 3)
        m[r * 16:(r + 1) * 16, c * 16:(c + 1) * 16] = 1
    return m


def _references():
    return (Reference(latent=torch.zeros(1, 16, *HW), mask=token_mask([1, 2, 4]), weight=2.0),
            Reference(latent=torch.zeros(1, 16, *HW), mask=token_mask([0, 5]), weight=-0.5))


def _call(positions, skip_output=False, style_fidelity=1.0):
    refs = _references()
    tech = MultiReferenceAttention(refs, [(SINGLE, 0)], SigmaRange(10.0, 0.0), style_fidelity, dit=SPEC,
                                   positions=positions)
    layout = RowLayout("joint", [0, 1], 2, HW, 1.0, {(refs[0], 0): 0, (refs[1], 0): 1})
    g = torch.Generator().manual_seed(4)
    L = T + N
    q, k, v = (torch.randn(4, HEADS, L, 16, generator=g, dtype=torch.float64) for _ in range(3))
    opts = {LATENT_KEY: HW, STATE_KEY: PersonalizeState((tech,)), ROWS_KEY: layout}
    override = JointAttention((SINGLE, 0), SPEC, [(tech, ("attn1",))], T, layout)
    out = override(fake_attention, q, k, v, HEADS, skip_reshape=True, skip_output_reshape=skip_output, mask=None,
                   transformer_options=opts)
    return refs, q, k, v, out


def merged(x):
    return x.transpose(0, 1).reshape(x.shape[1], -1)          # [h, L, d] -> [L, h*d]


@pytest.mark.parametrize("positions", [SHIFTED, ALIGNED])
def test_override_equals_independent_joint_attention(positions):
    refs, q, k, v, out = _call(positions)
    L = T + N
    plain = fake_attention(q, k, v, HEADS, skip_reshape=True)
    # uncond target row and both reference rows: plain joint attention
    torch.testing.assert_close(out[1:], plain[1:], rtol=1e-12, atol=1e-12)
    # cond target row: text queries plain, image queries over own + masked reference image tokens
    sel = []
    for r, (ref, tokens) in enumerate(zip(refs, ([1, 2, 4], [0, 5]))):
        kr = merged(k[2 + r])[T:].numpy()
        if positions == SHIFTED:      # reference r stands (r + 1) grid widths (3 columns) to the right
            kr = np_rotate(kr, np.tile([0.0, 0.0, 3.0 * (r + 1)], (N, 1)), (4, 6, 6), 10000.0)
        vr = merged(v[2 + r])[T:].numpy()
        sel.append((kr[tokens], vr[tokens], np.full(len(tokens), ref.weight)))
    want = np_joint(merged(q[0]).numpy(), merged(k[0]).numpy(), merged(v[0]).numpy(), sel, HEADS, T, N)
    np.testing.assert_allclose(out[0].numpy(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[0, :T], plain[0, :T], rtol=1e-12, atol=1e-12)
    assert out.shape == (4, L, HEADS * 16)


def test_override_output_layout_and_positions_matter():
    _, _, _, _, a = _call(SHIFTED)
    _, _, _, _, b = _call(SHIFTED, skip_output=True)
    torch.testing.assert_close(b.transpose(1, 2).reshape(a.shape), a)
    _, _, _, _, c = _call(ALIGNED)
    assert (a[0, T:] - c[0, T:]).abs().max() > 1e-6
    torch.testing.assert_close(a[0, :T], c[0, :T])


def test_override_rejects_attention_masks_and_records_reference_banks():
    refs = _references()
    tech = MultiReferenceAttention(refs, [(SINGLE, 0)], SigmaRange(10.0, 0.0), dit=SPEC)
    q = k = v = torch.randn(2, HEADS, T + N, 16)
    opts = {LATENT_KEY: HW}
    layout = RowLayout("joint", [0], 1, HW, 1.0, {(refs[0], 0): 0})
    with pytest.raises(ValueError, match="attention mask"):
        JointAttention((SINGLE, 0), SPEC, [(tech, ("attn1",))], T, layout)(
            fake_attention, q, k, v, HEADS, skip_reshape=True, mask=torch.zeros(1), transformer_options=opts)
    with pytest.raises(ValueError, match="attention mask"):        # Qwen-Image: the mask as the fifth argument
        JointAttention((SINGLE, 0), SPEC, [(tech, ("attn1",))], T, layout)(
            fake_attention, q, k, v, HEADS, torch.zeros(2, 1, T + N), skip_reshape=True, transformer_options=opts)
    # a references-only call banks the image tokens' keys/values and runs plain attention
    bank = {}
    rec = RowLayout("record", [0], 2, HW, 1.0, {}, bank)
    out = JointAttention((SINGLE, 0), SPEC, [(tech, ("attn1",))], T, rec)(
        fake_attention, q, k, v, HEADS, skip_reshape=True, transformer_options=opts)
    torch.testing.assert_close(out, fake_attention(q, k, v, HEADS, skip_reshape=True))
    kb, vb = bank[(SINGLE, 0)]
    torch.testing.assert_close(kb, k[:, :, T:].transpose(1, 2).reshape(2, N, -1))
    torch.testing.assert_close(vb, v[:, :, T:].transpose(1, 2).reshape(2, N, -1))
    with pytest.raises(ValueError, match="latent size"):
        JointAttention((SINGLE, 0), SPEC, [(tech, ("attn1",))], T, layout)(
            fake_attention, q, k, v, HEADS, skip_reshape=True, transformer_options={})


def test_override_chains_a_previous_override():
    calls = []

    def previous(func, *args, **kwargs):
        calls.append(args[0].shape)
        return func(*args, **kwargs)

    refs = _references()
    tech = MultiReferenceAttention(refs, [(SINGLE, 0)], SigmaRange(10.0, 0.0), dit=SPEC)
    layout = RowLayout("joint", [0], 1, HW, 1.0, {(refs[0], 0): 0, (refs[1], 0): 1})
    q = k = v = torch.randn(3, HEADS, T + N, 16)
    ov = JointAttention((SINGLE, 0), SPEC, [(tech, ("attn1",))], T, layout, previous)
    ov(fake_attention, q, k, v, HEADS, skip_reshape=True, transformer_options={LATENT_KEY: HW})
    assert calls, "the plain parts go through the override that was there before"
    n_before = len(calls)
    ov(fake_attention, q, k, v, HEADS, skip_reshape=True, transformer_options={LATENT_KEY: HW})
    assert len(calls) == n_before + 1          # a second attention call in the block is passed through whole


# ---------------------------------------------------------------------------- the block replace

def _block_args(batch, kind=DOUBLE):
    g = torch.Generator().manual_seed(5)
    args = {"img": torch.randn(batch, N, 8, generator=g), "vec": torch.randn(batch, 8, generator=g),
            "pe": torch.randn(batch, 1, T + N, 8, 2, 2, generator=g), "attn_mask": None}
    if kind == DOUBLE:
        args["txt"] = torch.randn(batch, T, 8, generator=g)
    return args


def test_block_replace_runs_targets_only_after_the_last_patched_block():
    refs = _references()
    tech = MultiReferenceAttention(refs, [(DOUBLE, 0)], SigmaRange(10.0, 0.0), dit=SPEC)
    state = PersonalizeState((tech,))
    seen = []

    def original(args):
        seen.append((args["img"].shape[0], args["transformer_options"].get("optimized_attention_override")))
        return {"img": args["img"] * 2, "txt": args["txt"] * 2}

    joint = RowLayout("joint", [0], 1, HW, 1.0, {(refs[0], 0): 0, (refs[1], 0): 1})
    args = _block_args(3)
    args["transformer_options"] = {STATE_KEY: state, ROWS_KEY: joint, LATENT_KEY: HW}
    # the patched block: all rows, with the override in a copy of the options
    PersonalizeBlock((DOUBLE, 0), SPEC)(args, {"original_block": original})
    assert seen[-1][0] == 3 and isinstance(seen[-1][1], JointAttention)
    assert "optimized_attention_override" not in args["transformer_options"]
    # a later block: the target row only; the reference rows pass through unchanged
    out = PersonalizeBlock((DOUBLE, 1), SPEC)(args, {"original_block": original})
    assert seen[-1] == (1, None)
    torch.testing.assert_close(out["img"][0], args["img"][0] * 2)
    torch.testing.assert_close(out["img"][1:], args["img"][1:])
    torch.testing.assert_close(out["txt"][1:], args["txt"][1:])
    # a references-only call stops computing after the last patched block
    rec = dict(args, transformer_options={STATE_KEY: state, ROWS_KEY: RowLayout("record", [0], 2, HW, 1.0, {}, {}),
                                          LATENT_KEY: HW})
    n = len(seen)
    out = PersonalizeBlock((SINGLE, 0), SPEC)(rec, {"original_block": original})
    assert len(seen) == n and out["img"] is rec["img"]
    # without the pack's state or outside the schedule the block runs as it is
    plain = dict(args, transformer_options={})
    PersonalizeBlock((DOUBLE, 1), SPEC)(plain, {"original_block": original})
    assert seen[-1] == (3, None)


def test_block_replace_wraps_another_packs_replace():
    got = []

    def foreign(args, extra):
        got.append(args["transformer_options"].get("optimized_attention_override"))
        return extra["original_block"](args)

    refs = _references()
    tech = MultiReferenceAttention(refs, [(DOUBLE, 0)], SigmaRange(10.0, 0.0), dit=SPEC)
    args = _block_args(3)
    args["transformer_options"] = {STATE_KEY: PersonalizeState((tech,)), LATENT_KEY: HW,
                                   ROWS_KEY: RowLayout("joint", [0], 1, HW, 1.0, {(refs[0], 0): 0})}
    block = lambda a: {"img": a["img"], "txt": a["txt"]}
    out = PersonalizeBlock((DOUBLE, 0), SPEC, foreign)(args, {"original_block": block})
    assert isinstance(got[0], JointAttention) and out["img"] is args["img"]


# ---------------------------------------------------------------------------- presets and families

def test_block_lists_and_presets():
    spec = DiTSpec("flux", 19, 38, 2, None)
    assert parse_dit_blocks("double:0-2, single: 5") == ((DOUBLE, 0), (DOUBLE, 1), (DOUBLE, 2), (SINGLE, 5))
    assert resolve_dit_blocks(FLUX_SINGLE, "", spec) == tuple((SINGLE, i) for i in range(38))
    assert resolve_dit_blocks(FLUX_DOUBLE, "", spec) == tuple((DOUBLE, i) for i in range(19))
    assert len(resolve_dit_blocks(FLUX_ALL, "", spec)) == 57
    assert spec.order((SINGLE, 0)) == 19 and spec.image_tokens((128, 127)) == 64 * 64
    with pytest.raises(ValueError, match="cannot read 'output:6'"):
        parse_dit_blocks("output:6")
    with pytest.raises(ValueError, match="runs backwards"):
        parse_dit_blocks("single:5-2")
    with pytest.raises(ValueError, match="lacks single:38"):
        resolve_dit_blocks("custom", "single:30-38", spec)
    with pytest.raises(ValueError, match="is for UNet models, but this is a FLUX model"):
        resolve_dit_blocks("SD1.5 FreeCustom (output 6-11)", "", spec)


def test_model_family():
    unet = types.SimpleNamespace(input_blocks=[], output_blocks=[])
    assert model_family(unet) is None
    Flux = type("Flux", (), {"__module__": "comfy.ldm.flux.model"})
    flux = Flux()
    flux.params = types.SimpleNamespace(theta=10000, axes_dim=[16, 56, 56])
    flux.double_blocks, flux.single_blocks, flux.patch_size = [0] * 19, [0] * 38, 2
    spec = model_family(flux)
    assert (spec.family, spec.double, spec.single, spec.patch) == ("flux", 19, 38, 2)
    assert spec.rope == Rope(10000.0, (16, 56, 56))
    Wan = type("WanModel", (), {"__module__": "comfy.ldm.wan.model"})
    with pytest.raises(ValueError, match="WanModel .*not supported yet.*FLUX"):
        model_family(Wan())


# ---------------------------------------------------------------------------- DMSA's appearance phase in a DiT

def test_appearance_substitutes_only_image_keys_and_moves_them():
    heads = 2
    g = torch.Generator().manual_seed(6)
    q = torch.randn(1, N, 32, generator=g, dtype=torch.float64)
    k = torch.randn(1, T + N, 32, generator=g, dtype=torch.float64)
    v = torch.randn(1, T + N, 32, generator=g, dtype=torch.float64)
    k_app = torch.randn(N, 32, generator=g, dtype=torch.float64)
    v_app = torch.randn(N, 32, generator=g, dtype=torch.float64)
    ms = torch.tensor([0, 1, 1, 0, 0, 1])
    app = torch.tensor([0, 0, 1, 1, 0, 0.0])          # appearance tokens 2, 3, tiled: p -> sel[p mod 2]
    grid = RopeGrid(Rope(10000.0, (4, 6, 6)), (2, 3))
    out = appearance_attention(q, k, v, k_app, v_app, ms, app, heads, (T, T + N), grid.moved)
    kk, vv = k.clone(), v.clone()
    for p in range(N):
        if ms[p]:
            s = [2, 3][p % 2]
            kk[0, T + p] = grid.moved(k_app[s:s + 1], torch.tensor([s]), torch.tensor([p]))[0]
            vv[0, T + p] = v_app[s]
    torch.testing.assert_close(out, sdpa_attention(q, kk, vv, heads))
    with pytest.raises(ValueError, match="image_keys: 5 image keys for 6 image queries"):
        appearance_attention(q, k, v, k_app, v_app, ms, app, heads, (T, T + N - 1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_override_in_half_precision(dtype):
    """FLUX on a GPU runs in bf16/fp16: the override keeps the dtype and stays close to float64."""
    refs = _references()
    tech = MultiReferenceAttention(refs, [(SINGLE, 0)], SigmaRange(10.0, 0.0), dit=SPEC)
    layout = RowLayout("joint", [0, 1], 2, HW, 1.0, {(refs[0], 0): 0, (refs[1], 0): 1})
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(4, HEADS, T + N, 16, generator=g, dtype=torch.float64) for _ in range(3))
    opts = {LATENT_KEY: HW}

    def run(x):
        return JointAttention((SINGLE, 0), SPEC, [(tech, ("attn1",))], T, layout)(
            fake_attention, *(t.to(x) for t in (q, k, v)), HEADS, skip_reshape=True, transformer_options=opts)
    low, ref = run(dtype), run(torch.float64)
    assert low.dtype == dtype and torch.isfinite(low).all()
    torch.testing.assert_close(low.double(), ref, atol=0.05, rtol=0.05)


def test_subject_tokens_and_their_selection():
    from personalize_pack.attention.dit import select_tokens, subject_tokens
    ref = Reference(latent=torch.zeros(1, 16, *HW), mask=token_mask([1, 5]), weight=1.0)
    idx = subject_tokens(ref, HW, SPEC)
    assert idx.tolist() == [1, 5]
    corner = torch.zeros(32, 48)
    corner[15:17, 15:17] = 1                      # touches four tokens a little
    assert subject_tokens(Reference(latent=torch.zeros(1, 16, *HW), mask=corner), HW, SPEC).tolist() == [0, 1, 3, 4]
    nothing = Reference(latent=torch.zeros(1, 16, *HW), mask=torch.zeros(32, 48))
    assert subject_tokens(nothing, HW, SPEC).tolist() == list(range(6))
    img, ids = torch.randn(1, 6, 4), torch.randn(1, 6, 3)
    out = select_tokens(idx)({"img": img, "img_ids": ids, "txt": torch.zeros(1, 3, 4), "txt_ids": None})
    torch.testing.assert_close(out["img"], img[:, [1, 5]])
    torch.testing.assert_close(out["img_ids"], ids[:, [1, 5]])
