"""A one-layer stand-in UNet for the reference pass's unit tests (``test_patch``, ``test_ref_cache``):
called the way ComfyUI calls ``BaseModel._apply_model``, one self-attention layer at the latent grid
with the pack's replace patch on block ``output 6``; and the references, options and MRSA patch those
tests build."""
from __future__ import annotations

import torch

from personalize_pack.attention.mrsa import MultiReferenceAttention
from personalize_pack.attention.patch import STATE_KEY, PersonalizeAttention, PersonalizeState, SigmaRange
from personalize_pack.references.reference import Reference

from fake_models import FakeBaseModel

HEADS, DIM = 2, 8
KEY = ("output", 6, 0)


class OneLayerUNet:
    """Stand-in for BaseModel._apply_model: one self-attention layer at the latent grid with the
    pack's replace patch on block ``output 6``. Records what it was called with."""

    def __init__(self, foreign=None):
        g = torch.Generator().manual_seed(0)
        self.wq, self.wk, self.wv = (torch.randn(4, HEADS * DIM, generator=g, dtype=torch.float64) for _ in range(3))
        self.patch = PersonalizeAttention("attn1", foreign)
        self.class_obj = FakeBaseModel()
        self.calls = []

    def __call__(self, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        self.calls.append(dict(x=x.clone(), t=t.clone(), c=c_crossattn, control=control, opts=transformer_options,
                               kwargs=kwargs))
        tok = x.double().flatten(2).transpose(1, 2)
        q, k, v = tok @ self.wq, tok @ self.wk, tok @ self.wv
        eo = {k_: v_ for k_, v_ in transformer_options.items() if k_ not in ("patches", "patches_replace")}
        eo.update(block=KEY[:2], block_index=0, n_heads=HEADS, dim_head=DIM, original_shape=list(x.shape))
        self.last_qkv = (q, k, v)
        out = self.patch(q, k, v, eo)
        self.last_out = out
        return out.sum(-1).reshape(x.shape[0], 1, *x.shape[2:]).expand(-1, 4, -1, -1)


def make_reference(seed=0, weight=3.0, mask=None, caption=None, size=4):
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(1, 4, size, size, generator=g)
    if mask is None:
        mask = torch.zeros(size * 8, size * 8)
        mask[8:24, 8:24] = 1
    return Reference(latent=latent, mask=mask, weight=weight, caption=caption)


def options(technique, labels, sigma=5.0, rows=2, extra=None):
    state = PersonalizeState().with_technique(technique)
    opts = {STATE_KEY: state, "cond_or_uncond": labels, "sigmas": torch.full((rows,), sigma)}
    opts.update(extra or {})
    return opts


def mrsa(refs, sf=1.0, sigma_range=(10.0, 1.0)):
    return MultiReferenceAttention(refs, [KEY], SigmaRange(*sigma_range), style_fidelity=sf, seed=7)
