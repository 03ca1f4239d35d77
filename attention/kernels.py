"""Attention kernels. Pure torch; ComfyUI's attention function arrives as an argument.

The masked multi-reference self-attention (MRSA) of FreeCustom (docs/algorithms.md §0.3): the
target's queries attend over its own keys plus the keys of R references; a reference key inside
its mask gets the additive logit bias ``w_r * m_r``, a key outside it is removed.

Removing a key with a ``finfo.min`` bias (FreeCustom) and not attending to it at all give the same
softmax, so references enter the kernel as the *selected* tokens only: a compact key set, no
``-inf`` bias, and with every mask empty the kernel is plain self-attention exactly. The attention
itself runs in ``scaled_dot_product_attention`` with a broadcast ``[1, 1, 1, keys]`` additive bias,
which the fused CPU/GPU kernels take without building the ``N x keys`` logits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = x.shape
    if c % heads:
        raise ValueError(f"channels {c} are not divisible by {heads} heads")
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """Plain multi-head attention on ``[B, N, h*d]`` tensors, optional additive logit bias
    broadcastable to ``[B, h, N, keys]``."""
    out = F.scaled_dot_product_attention(split_heads(q, heads), split_heads(k, heads),
                                         split_heads(v, heads), attn_mask=bias)
    return merge_heads(out)


@dataclass
class ReferenceKeys:
    """The reference part of an MRSA key set at one layer: selected tokens of every reference,
    concatenated, with their logit bias. ``k``/``v`` are ``[M, h*d]`` (shared by every target
    row) and ``bias`` is ``[M]``. ``M`` may be 0."""
    k: torch.Tensor
    v: torch.Tensor
    bias: torch.Tensor

    @property
    def count(self) -> int:
        return int(self.k.shape[0])


def token_selection(mask: torch.Tensor, weight: float):
    """Indices of the tokens of one reference that take part, and their logit bias ``w * m``.
    A token takes part when its mask value and the weight are non-zero (FreeCustom: ``0 * mask``
    counts as outside, so weight 0 removes the reference). None when nothing takes part."""
    if weight == 0:
        return None
    idx = torch.nonzero(mask != 0, as_tuple=False).flatten()
    if idx.numel() == 0:
        return None
    return idx, mask.index_select(0, idx).to(torch.promote_types(mask.dtype, torch.float32)) * float(weight)


def gather_reference_keys(kvs: list, selections: list) -> ReferenceKeys | None:
    """Concatenate the selected tokens of every reference: ``kvs[r] = (k_r, v_r)`` ``[N_r, h*d]``,
    ``selections[r]`` from ``token_selection``. None when no token takes part."""
    ks, vs, bs = [], [], []
    for (k, v), sel in zip(kvs, selections):
        if sel is None:
            continue
        idx, bias = sel
        ks.append(k.index_select(0, idx))
        vs.append(v.index_select(0, idx))
        bs.append(bias)
    if not ks:
        return None
    return ReferenceKeys(torch.cat(ks), torch.cat(vs), torch.cat(bs))


def select_reference_keys(ref_k: torch.Tensor, ref_v: torch.Tensor, masks: list[torch.Tensor],
                          weights: list[float]) -> ReferenceKeys:
    """The reference key set from per-reference keys ``ref_k[r]`` ``[N_r, h*d]``, flattened layer
    masks ``masks[r]`` ``[N_r]`` and weights; an empty set when no token takes part."""
    sels = [token_selection(m.to(ref_k.device), w) for m, w in zip(masks, weights)]
    refs = gather_reference_keys([(ref_k[r], ref_v[r]) for r in range(len(sels))], sels)
    if refs is None:
        empty = ref_k.new_zeros((0, ref_k.shape[-1]))
        return ReferenceKeys(empty, empty, torch.zeros(0, device=ref_k.device))
    return refs


def mrsa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, refs: ReferenceKeys,
                   heads: int) -> torch.Tensor:
    """MRSA for target rows ``q, k, v`` ``[B, N, h*d]`` over own keys plus ``refs``.

    Returns ``[B, N, h*d]``. With ``refs.count == 0`` this is plain self-attention.
    """
    if refs.count == 0:
        return sdpa_attention(q, k, v, heads)
    b = q.shape[0]
    n = k.shape[1]
    kk = torch.cat([k, refs.k.to(k.dtype).unsqueeze(0).expand(b, -1, -1)], dim=1)
    vv = torch.cat([v, refs.v.to(v.dtype).unsqueeze(0).expand(b, -1, -1)], dim=1)
    bias = torch.cat([torch.zeros(n, device=q.device, dtype=q.dtype), refs.bias.to(q.device, q.dtype)])
    return sdpa_attention(q, kk, vv, heads, bias.view(1, 1, 1, -1))
