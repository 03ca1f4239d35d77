"""Native reference control without ComfyUI: the grouped attention against an independent float64
computation of the whole ``L x L`` logits (masks, weights, regions, several references, batch > 1,
the call's own mask, core's K/V-cache layout), the override's handling of ComfyUI's attention
arguments, the block replace's chaining and the clear errors."""
from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from personalize_pack.attention.dit_blocks import PersonalizeBlock
from personalize_pack.attention.families import DiTSpec, native_reference_spec
from personalize_pack.attention.install import _check_overrides
from personalize_pack.attention.kernels import Rope
from personalize_pack.attention.native_refs import (REF_GRIDS_KEY, NativeReferenceAttention, NativeReferenceControl,
                                                    ReferenceControl, controlled_attention, plan)
from personalize_pack.attention.patch import LATENT_KEY, STATE_KEY, PersonalizeState, SigmaRange, Technique

SPEC = DiTSpec("flux", 2, 2, 2, Rope(10000.0, (4, 6, 6)))
EVERYWHERE = SigmaRange(1e9, 0.0)


# ---------------------------------------------------------------------------- independent reference

def dense(q, k, v, T, grid, counts, covers, weights, regions, mask=None):
    """float64 attention with the whole logit matrix: ``covers[r]`` the per-token subject coverage of
    reference r, ``regions[r]`` a bool per target token or None; the reference queries are native."""
    q, k, v = (np.asarray(t, dtype=np.float64) for t in (q, k, v))
    B, h, Lq, d = q.shape
    Lk = k.shape[2]
    N = grid[0] * grid[1]
    bias = np.zeros((Lq, Lk))
    start = T + N
    for r, n in enumerate(counts):
        for t in range(n):
            for i in range(min(Lq, T + N)):
                s = covers[r][t] * weights[r]
                if regions[r] is not None and i >= T and not regions[r][i - T]:
                    s = 0.0
                bias[i, start + t] = math.log(s) if s > 0 else -np.inf
        start += n
    logits = np.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(d) + bias
    if mask is not None:
        logits = logits + np.asarray(mask, dtype=np.float64).reshape(B, 1, 1, Lk)
    logits -= logits.max(-1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bhkd->bhqd", p, v)
    return out.transpose(0, 2, 1, 3).reshape(B, Lq, h * d)


def sdpa_attend(q, k, v, m):
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def qkv(B, h, Lq, Lk, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, h, Lq, d, generator=g, dtype=torch.float64),
            torch.randn(B, h, Lk, d, generator=g, dtype=torch.float64),
            torch.randn(B, h, Lk, d, generator=g, dtype=torch.float64))


T, GRID = 5, (4, 6)                          # 5 text tokens, a 4x6 target grid
REF_GRIDS = [(2, 3), (3, 3)]
COUNTS = [6, 9]
N = 24
L = T + N + sum(COUNTS)


def soft_mask(grid, seed):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(grid, generator=g, dtype=torch.float64)
    m[m < 0.3] = 0.0
    m[0, 0] = 1.0
    return m


def region(grid, rows):
    m = torch.zeros(grid, dtype=torch.float64)
    m[rows] = 1.0
    return m


# ---------------------------------------------------------------------------- the kernel

def test_neutral_controls_plan_nothing():
    assert plan([ReferenceControl(), ReferenceControl(torch.ones(8, 8))], T, GRID, REF_GRIDS, COUNTS, "cpu") is None


@pytest.mark.parametrize("batch", [1, 3])
def test_masks_weights_regions_match_the_dense_computation(batch):
    m0, m1 = soft_mask(REF_GRIDS[0], 1), soft_mask(REF_GRIDS[1], 2)
    reg0 = region(GRID, slice(0, 2))          # reference 1 acts on the top half only
    controls = [ReferenceControl(m0, 0.5, reg0), ReferenceControl(m1, 2.0)]
    p = plan(controls, T, GRID, REF_GRIDS, COUNTS, "cpu")
    assert len(p.groups) == 2                 # (text + top half: both references), (bottom half: reference 2)
    q, k, v = qkv(batch, 2, L, L)
    got = controlled_attention(sdpa_attend, q, k, v, p)
    want = dense(q, k, v, T, GRID, COUNTS, [m0.flatten(), m1.flatten()], [0.5, 2.0],
                 [reg0.flatten() > 0.5, None])
    np.testing.assert_allclose(got.numpy(), want, atol=1e-7, rtol=1e-6)   # the bias is built in float32


def test_mask_is_fitted_as_token_coverage():
    big = torch.zeros(8, 12, dtype=torch.float64)           # 4x the 2x3 grid of reference 1
    big[:4, :4] = 1.0                                        # token (0,0), 4x4 pixels, fully
    big[4:8, 0:2] = 1.0                                      # half of token (1,0)
    big[0:1, 8:12] = 1.0                                     # a quarter of token (0,2)
    cover = torch.tensor([1.0, 0.0, 0.25, 0.5, 0.0, 0.0], dtype=torch.float64)
    p = plan([ReferenceControl(big, 1.0), ReferenceControl()], T, GRID, REF_GRIDS, COUNTS, "cpu")
    q, k, v = qkv(2, 2, L, L, seed=3)
    got = controlled_attention(sdpa_attend, q, k, v, p)
    want = dense(q, k, v, T, GRID, COUNTS, [cover, torch.ones(9)], [1.0, 1.0], [None, None])
    np.testing.assert_allclose(got.numpy(), want, atol=1e-7, rtol=1e-6)   # the bias is built in float32


def test_weight_zero_removes_the_reference():
    p = plan([ReferenceControl(), ReferenceControl(weight=0.0)], T, GRID, REF_GRIDS, COUNTS, "cpu")
    q, k, v = qkv(2, 2, L, L, seed=4)
    got = controlled_attention(sdpa_attend, q, k, v, p)
    keep = T + N + COUNTS[0]
    front = T + N
    without = sdpa_attend(q[:, :, :front], k[:, :, :keep], v[:, :, :keep], None)
    torch.testing.assert_close(got[:, :front], without, atol=1e-12, rtol=0)
    torch.testing.assert_close(got[:, front:], sdpa_attend(q[:, :, front:], k, v, None), atol=1e-12, rtol=0)


def test_the_calls_own_mask_is_kept():
    m0 = soft_mask(REF_GRIDS[0], 5)
    controls = [ReferenceControl(m0, 1.5, region(GRID, slice(2, 4))), ReferenceControl(weight=0.7)]
    p = plan(controls, T, GRID, REF_GRIDS, COUNTS, "cpu")
    q, k, v = qkv(2, 2, L, L, seed=6)
    own = torch.zeros(2, 1, L, dtype=torch.float64)           # Qwen's text padding mask, [B, 1, keys]
    own[1, 0, 3:T] = -torch.finfo(torch.float64).max
    got = controlled_attention(sdpa_attend, q, k, v, p, own)
    want = dense(q, k, v, T, GRID, COUNTS, [m0.flatten(), torch.ones(9)], [1.5, 0.7],
                 [region(GRID, slice(2, 4)).flatten() > 0.5, None], own.numpy())
    np.testing.assert_allclose(got.numpy(), want, atol=1e-7, rtol=1e-6)   # the bias is built in float32


def test_cached_reference_keys_layout():
    """Core's FluxKVCache drops the reference queries after the first step and appends their cached
    keys: queries = text + target only."""
    m1 = soft_mask(REF_GRIDS[1], 7)
    controls = [ReferenceControl(weight=3.0, region=region(GRID, slice(1, 3))), ReferenceControl(m1)]
    p = plan(controls, T, GRID, REF_GRIDS, COUNTS, "cpu")
    q, k, v = qkv(2, 2, T + N, L, seed=8)
    got = controlled_attention(sdpa_attend, q, k, v, p)
    want = dense(q, k, v, T, GRID, COUNTS, [torch.ones(6), m1.flatten()], [3.0, 1.0],
                 [region(GRID, slice(1, 3)).flatten() > 0.5, None])
    np.testing.assert_allclose(got.numpy(), want, atol=1e-7, rtol=1e-6)   # the bias is built in float32


def test_bad_layouts_are_clear_errors():
    with pytest.raises(ValueError, match="received 2 reference image.*1 reference control"):
        plan([ReferenceControl(weight=2.0)], T, GRID, REF_GRIDS, COUNTS, "cpu")
    with pytest.raises(ValueError, match="subject_mask of reference 2 is 4x12 pixels"):
        plan([ReferenceControl(), ReferenceControl(torch.ones(12, 4), 2.0)], T, GRID, REF_GRIDS, COUNTS, "cpu")
    with pytest.raises(ValueError, match="target_region of reference 1"):
        plan([ReferenceControl(region=torch.ones(6, 4)), ReferenceControl()], T, GRID, REF_GRIDS, COUNTS, "cpu")
    with pytest.raises(ValueError, match="matches no reference latent grid"):
        plan([ReferenceControl(weight=2.0), ReferenceControl()], T, GRID, [(2, 2), (3, 3)], COUNTS, "cpu")
    p = plan([ReferenceControl(weight=2.0), ReferenceControl()], T, GRID, REF_GRIDS, COUNTS, "cpu")
    q, k, v = qkv(1, 2, L + 1, L + 1)
    with pytest.raises(ValueError, match="another patch changes the token layout"):
        controlled_attention(sdpa_attend, q, k, v, p)


# ---------------------------------------------------------------------------- the override

def comfy_attention(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False,
                    **kwargs):
    """ComfyUI's attention_pytorch in miniature: [B, L, h*d] or (skip_reshape) [B, h, L, d] in."""
    if not skip_reshape:
        q, k, v = (t.view(t.shape[0], -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
    if mask is not None:
        if mask.ndim == 2:
            mask = mask.unsqueeze(0)
        if mask.ndim == 3:
            mask = mask.unsqueeze(1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if skip_output_reshape:
        return out
    return out.transpose(1, 2).reshape(out.shape[0], -1, heads * out.shape[-1])


def technique(controls, sigmas=EVERYWHERE):
    return NativeReferenceControl(controls, SPEC, SPEC.keys(), sigmas)


def call_options(counts=COUNTS, labels=(0, 1)):
    return {"reference_image_num_tokens": list(counts), LATENT_KEY: (8, 12), REF_GRIDS_KEY: REF_GRIDS,
            "cond_or_uncond": list(labels), "sigmas": torch.tensor([1.0])}


@pytest.mark.parametrize("skip", [True, False])
def test_override_equals_the_kernel_in_either_tensor_layout(skip):
    m0 = soft_mask(REF_GRIDS[0], 9)
    controls = [ReferenceControl(m0, 2.0, region(GRID, slice(0, 1))), ReferenceControl(weight=0.5)]
    tech = technique(controls)
    calls = []

    def previous(func, *args, **kwargs):          # another override (e.g. core's attention backend): chained
        calls.append(args[0].shape)
        return func(*args, **kwargs)

    q, k, v = qkv(2, 2, L, L, seed=10)
    want = dense(q, k, v, T, GRID, COUNTS, [m0.flatten(), torch.ones(9)], [2.0, 0.5],
                 [region(GRID, slice(0, 1)).flatten() > 0.5, None])
    override = tech.override(previous, T)
    assert isinstance(override, NativeReferenceAttention)
    if skip:
        out = override(comfy_attention, q, k, v, 2, skip_reshape=True, transformer_options=call_options())
    else:
        flat = [t.transpose(1, 2).reshape(2, L, -1) for t in (q, k, v)]
        out = override(comfy_attention, *flat, 2, None, skip_output_reshape=True, transformer_options=call_options())
        out = out.transpose(1, 2).reshape(2, L, -1)
    np.testing.assert_allclose(out.numpy(), want, atol=1e-7, rtol=1e-6)   # the bias is built in float32
    assert len(calls) == 3                        # two query groups and the reference queries, all through it


def test_override_is_native_when_neutral_or_inactive():
    q, k, v = qkv(1, 2, L, L, seed=11)
    seen = []

    def func(*args, **kwargs):
        seen.append((args, kwargs))
        return comfy_attention(*args, **kwargs)

    neutral = technique([ReferenceControl(), ReferenceControl()]).override(None, T)
    out = neutral(func, q, k, v, 2, skip_reshape=True, transformer_options=call_options())
    assert len(seen) == 1 and seen[0][0][0] is q
    torch.testing.assert_close(out, comfy_attention(q, k, v, 2, skip_reshape=True), atol=0, rtol=0)
    late = technique([ReferenceControl(weight=2.0), ReferenceControl()], SigmaRange(0.5, 0.0))
    assert not late.active_at(None, call_options())
    assert late.active_at(None, dict(call_options(), sigmas=torch.tensor([0.25])))


def test_override_without_references():
    q, k, v = qkv(1, 2, T + N, T + N)
    override = technique([ReferenceControl(weight=2.0)]).override(None, T)
    opts = call_options(counts=[], labels=(1,))
    out = override(comfy_attention, q, k, v, 2, skip_reshape=True, transformer_options=opts)
    torch.testing.assert_close(out, comfy_attention(q, k, v, 2, skip_reshape=True), atol=0, rtol=0)
    with pytest.raises(ValueError, match="positive conditioning reaches the model without reference images"):
        override(comfy_attention, q, k, v, 2, skip_reshape=True, transformer_options=call_options(counts=[]))


# ---------------------------------------------------------------------------- the block replace, install, family

def test_block_replace_chains_the_override_onto_the_existing_one():
    tech = technique([ReferenceControl(weight=2.0), ReferenceControl()])
    before = object()
    seen = {}

    def original(args):
        seen["override"] = args["transformer_options"]["optimized_attention_override"]
        return {"img": args["img"], "txt": args["txt"]}

    opts = dict(call_options(), optimized_attention_override=before, **{STATE_KEY: PersonalizeState((tech,))})
    args = {"img": torch.zeros(1, N + 15, 4), "txt": torch.zeros(1, T, 4), "transformer_options": opts}
    PersonalizeBlock(("double_block", 0), SPEC)(args, {"original_block": original})
    o = seen["override"]
    assert isinstance(o, NativeReferenceAttention) and o.previous is before and o.txt_len == T
    assert opts["optimized_attention_override"] is before          # the caller's dict is not changed


def test_it_combines_with_no_other_joint_attention_technique():
    native = technique([ReferenceControl(weight=2.0)])
    other = Technique()
    other.name, other.dit = "FreeCustom MRSA", SPEC
    with pytest.raises(ValueError, match="Native Reference Control and FreeCustom MRSA both rewrite"):
        _check_overrides(PersonalizeState((other, native)))
    with pytest.raises(ValueError, match="already carries a Native Reference Control"):
        _check_overrides(PersonalizeState((native, technique([ReferenceControl()]))))
    _check_overrides(PersonalizeState((native,)))


def test_models_without_native_references_are_refused():
    unet = types.SimpleNamespace(input_blocks=[], output_blocks=[])
    with pytest.raises(ValueError, match="UNet.*takes no reference images of its own"):
        native_reference_spec(unet)
