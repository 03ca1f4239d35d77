"""The image-projection models of IP-Adapter / MIP-Adapter checkpoints (docs/algorithms.md §3.4): CLIP
vision output -> the extra context tokens. Parameter names follow the checkpoint keys, so a state dict
loads with ``strict=True``. Pure torch; ``attention/ip_adapter.py`` recognises which one a file holds.

* ``ImageProjModel`` (linear): ``proj`` Linear ``E -> tokens*ctx``, then LayerNorm ``norm`` per token.
* ``MLPProjModel`` (full face): ``Linear, GELU, Linear, LayerNorm`` on every CLIP token.
* ``Resampler`` (plus): learned queries cross-attending (``PerceiverAttention``) to the CLIP tokens.
"""
from __future__ import annotations

import torch
from torch import nn


class ImageProjModel(nn.Module):
    """``LayerNorm(proj(e).reshape(B, tokens, ctx))`` for CLIP image embeds ``e [B, E]``."""

    def __init__(self, embed_dim: int, tokens: int, ctx: int):
        super().__init__()
        self.tokens, self.ctx = tokens, ctx
        self.proj = nn.Linear(embed_dim, tokens * ctx)
        self.norm = nn.LayerNorm(ctx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).reshape(x.shape[0], self.tokens, self.ctx))


class MLPProjModel(nn.Module):
    """Full-face projection of every CLIP token: ``LayerNorm(W2 GELU(W1 x + b1) + b2)``."""

    def __init__(self, embed_dim: int, hidden: int, ctx: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(embed_dim, hidden), nn.GELU(), nn.Linear(hidden, ctx),
                                  nn.LayerNorm(ctx))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class PerceiverAttention(nn.Module):
    """The latents (queries) attend over the image features and themselves:
    ``softmax(q k^T / sqrt(d)) v`` with ``q = W_q LN2(lat)``, ``[k; v] = W_kv [LN1(x); LN2(lat)]``,
    then ``W_out``. The ``1/sqrt(d)`` is applied as ``d^-1/4`` on each of q and k, as the
    official code does for half-precision range."""

    def __init__(self, dim: int, inner: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x)
        latents = self.norm2(latents)
        b, n, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        q, k, v = (t.reshape(b, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))
        s = q.shape[-1] ** -0.25
        w = torch.softmax(((q * s) @ (k * s).transpose(-1, -2)).float(), dim=-1).to(v.dtype)
        out = (w @ v).transpose(1, 2).reshape(b, n, -1)
        return self.to_out(out)


def _feed_forward(dim: int, inner: int) -> nn.Sequential:
    """``x -> W2 GELU(W1 LN(x))`` without biases (keys ``0`` LayerNorm, ``1`` and ``3`` Linear)."""
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(),
                         nn.Linear(inner, dim, bias=False))


class Resampler(nn.Module):
    """IP-Adapter Plus projection: ``x' = proj_in(x)``; per layer ``lat += attn(x', lat)``,
    ``lat += ff(lat)``; output ``norm_out(proj_out(lat))`` of shape ``[B, queries, out]``."""

    def __init__(self, embed_dim: int, dim: int, inner: int, heads: int, queries: int, depth: int,
                 ff_inner: int, out_dim: int):
        super().__init__()
        self.latents = nn.Parameter(torch.empty(1, queries, dim))
        self.proj_in = nn.Linear(embed_dim, dim)
        self.proj_out = nn.Linear(dim, out_dim)
        self.norm_out = nn.LayerNorm(out_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, inner, heads), _feed_forward(dim, ff_inner)])
            for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        latents = self.latents.expand(x.shape[0], -1, -1)
        x = self.proj_in(x)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


__all__ = ["ImageProjModel", "MLPProjModel", "PerceiverAttention", "Resampler"]
