"""A stand-in UNet for technique tests that need several blocks and cross-attention: each block
has its own token grid (the latent average-pooled by ``pool``), runs attn1 then attn2 through the
pack's shared replace objects with ComfyUI-like ``extra_options``, and records what every patch
saw. Called like ``BaseModel._apply_model`` (the executor of the ``apply_model`` wrapper)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from personalize_pack.attention.patch import PersonalizeAttention

from fake_models import FakeBaseModel

HEADS, DIM, CTX = 2, 8, 16


class StandinUNet:
    def __init__(self, blocks, seed=0, foreign=None):
        """``blocks``: ``[(key, pool), ...]`` in execution order, ``key = (name, id, index)``.
        ``foreign``: ``{key: fn}`` another pack's attn1 replaces, wrapped by the pack's patch."""
        g = torch.Generator().manual_seed(seed)
        rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
        self.blocks = list(blocks)
        self.w = {key: dict(q1=rnd(4, HEADS * DIM), k1=rnd(4, HEADS * DIM), v1=rnd(4, HEADS * DIM),
                            q2=rnd(4, HEADS * DIM), k2=rnd(CTX, HEADS * DIM), v2=rnd(CTX, HEADS * DIM))
                  for key, _ in self.blocks}
        foreign = foreign or {}
        self.attn1 = {key: PersonalizeAttention("attn1", foreign.get(key)) for key, _ in self.blocks}
        self.attn2 = {key: PersonalizeAttention("attn2") for key, _ in self.blocks}
        self.class_obj = FakeBaseModel()
        self.calls = []

    def replace_table(self):
        return {"attn1": dict(self.attn1), "attn2": dict(self.attn2)}

    def __call__(self, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        seen = {}
        self.calls.append(dict(x=x.clone(), t=t.clone(), c=c_crossattn, opts=transformer_options, seen=seen))
        base = {k: v for k, v in transformer_options.items() if k not in ("patches", "patches_replace")}
        b, _, H, W = x.shape
        total = torch.zeros(b, 1, H, W, dtype=torch.float64)
        ctx = c_crossattn.double()
        for key, pool in self.blocks:
            xs = F.avg_pool2d(x.double(), pool) if pool > 1 else x.double()
            h, w = xs.shape[-2:]
            tok = xs.flatten(2).transpose(1, 2)
            eo = dict(base, block=key[:2], block_index=key[2], n_heads=HEADS, dim_head=DIM,
                      original_shape=list(x.shape))
            wt = self.w[key]
            q, k, v = tok @ wt["q1"], tok @ wt["k1"], tok @ wt["v1"]
            o1 = self.attn1[key](q, k, v, dict(eo))
            seen[("attn1", key)] = (q, k, v, o1)
            q2, k2, v2 = tok @ wt["q2"], ctx @ wt["k2"], ctx @ wt["v2"]
            o2 = self.attn2[key](q2, k2, v2, dict(eo))
            seen[("attn2", key)] = (q2, k2, v2, o2)
            plane = (o1 + o2).sum(-1).reshape(b, 1, h, w)
            total = total + F.interpolate(plane, size=(H, W), mode="nearest")
        return total.expand(-1, 4, -1, -1).to(x.dtype)
