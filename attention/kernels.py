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
    """The reference part of an MRSA key set at one layer: the selected tokens of every reference,
    kept as per-reference parts (views where a whole reference is selected, so nothing is copied
    until the one concatenation with the target's own keys), and their logit bias. Parts are
    ``[M_r, h*d]`` (shared by every target row); ``bias`` is ``[sum M_r]``."""
    k: list
    v: list
    bias: torch.Tensor

    @property
    def count(self) -> int:
        return int(self.bias.shape[0])


def token_selection(mask: torch.Tensor, weight: float):
    """Which tokens of one reference take part, and their logit bias ``w * m``: ``(idx, bias)``
    with ``idx`` None when every token does. A token takes part when its mask value and the weight
    are non-zero (FreeCustom: ``0 * mask`` counts as outside, so weight 0 removes the reference).
    None when nothing takes part."""
    if weight == 0:
        return None
    idx = torch.nonzero(mask != 0, as_tuple=False).flatten()
    if idx.numel() == 0:
        return None
    bias = mask.index_select(0, idx).to(torch.promote_types(mask.dtype, torch.float32)) * float(weight)
    return (None if idx.numel() == mask.numel() else idx), bias


def gather_reference_keys(kvs: list, selections: list) -> ReferenceKeys | None:
    """The key set of every reference: ``kvs[r] = (k_r, v_r)`` ``[N_r, h*d]``, ``selections[r]``
    from ``token_selection``. None when no token takes part."""
    ks, vs, bs = [], [], []
    for (k, v), sel in zip(kvs, selections):
        if sel is None:
            continue
        idx, bias = sel
        ks.append(k if idx is None else k.index_select(0, idx))
        vs.append(v if idx is None else v.index_select(0, idx))
        bs.append(bias)
    if not ks:
        return None
    return ReferenceKeys(ks, vs, torch.cat(bs))


def select_reference_keys(ref_k: torch.Tensor, ref_v: torch.Tensor, masks: list[torch.Tensor],
                          weights: list[float]) -> ReferenceKeys | None:
    """The reference key set from per-reference keys ``ref_k[r]`` ``[N_r, h*d]``, flattened layer
    masks ``masks[r]`` ``[N_r]`` and weights; None when no token takes part."""
    sels = [token_selection(m.to(ref_k.device), w) for m, w in zip(masks, weights)]
    return gather_reference_keys([(ref_k[r], ref_v[r]) for r in range(len(sels))], sels)


def standardize_tokens(x: torch.Tensor, dim: int = -2) -> torch.Tensor:
    """Standardise every channel over the token axis ``dim``: ``(x - mean) / std`` with the
    unbiased std (FreeMix's spatial normalisation, docs/algorithms.md §2.2). On ``[..., N, h*d]``
    tensors each column is one (head, channel) pair, so this is the per-head normalisation.
    Computed in at least float32; a constant channel becomes 0 instead of NaN."""
    y = x.to(torch.promote_types(x.dtype, torch.float32))
    mean = y.mean(dim=dim, keepdim=True)
    std = y.std(dim=dim, keepdim=True).clamp_min(1e-12)
    return ((y - mean) / std).to(x.dtype)


def mrsa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, refs: ReferenceKeys | None,
                   heads: int, ref_query: torch.Tensor | None = None) -> torch.Tensor:
    """MRSA for target rows ``q, k, v`` ``[B, N, h*d]`` over own keys plus ``refs``.

    Returns ``[B, N, h*d]``. Without reference tokens this is plain self-attention.

    ``ref_query`` (``[B, N, h*d]``): the reference block of the logits is computed with these
    queries instead of ``q`` (``s * ref_query K_ref^T``, the own block stays ``s * q K_own^T``), as
    FreeMix's spatial normalisation does with standardised queries and keys. It runs as one SDPA
    call over an augmented head dim, ``[q, ref_query]`` against ``[K_own, 0]`` and ``[0, K_ref]``
    with the scale of the original head dim, so no ``N x keys`` logits are built either.
    """
    if refs is None or refs.count == 0:
        return sdpa_attention(q, k, v, heads)
    b = q.shape[0]
    shared = lambda parts, like: [p.to(like.dtype).unsqueeze(0).expand(b, -1, -1) for p in parts]
    vv = torch.cat([v] + shared(refs.v, v), dim=1)
    bias = torch.cat([torch.zeros(k.shape[1], device=q.device, dtype=q.dtype), refs.bias.to(q.device, q.dtype)])
    if ref_query is None:
        kk = torch.cat([k] + shared(refs.k, k), dim=1)
        return sdpa_attention(q, kk, vv, heads, bias.view(1, 1, 1, -1))
    if ref_query.shape != q.shape:
        raise ValueError(f"ref_query has shape {tuple(ref_query.shape)}, expected {tuple(q.shape)}")
    qh, kh = split_heads(q, heads), split_heads(k, heads)
    rh = split_heads(torch.cat(shared(refs.k, k), dim=1), heads)
    q_aug = torch.cat([qh, split_heads(ref_query.to(q.dtype), heads)], dim=-1)
    k_aug = torch.cat([torch.cat([kh, torch.zeros_like(kh)], dim=-1),
                       torch.cat([torch.zeros_like(rh), rh], dim=-1)], dim=2)
    out = F.scaled_dot_product_attention(q_aug, k_aug, split_heads(vv, heads), attn_mask=bias.view(1, 1, 1, -1),
                                         scale=qh.shape[-1] ** -0.5)
    return merge_heads(out)


# --------------------------------------------------------------------------- DiT joint attention

def joint_reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, refs: ReferenceKeys | None,
                              heads: int, image: slice) -> torch.Tensor:
    """MRSA inside a DiT's joint attention (docs/algorithms.md §1.6): ``q, k, v`` ``[B, L, h*d]``
    hold the text and image tokens of the target; ``image`` is the slice of its image tokens.

    Image queries attend over every own key (text and image) plus the reference image tokens of
    ``refs`` with their logit bias (``mrsa_attention``); every other query (the text tokens) attends
    over the own keys only, as in plain joint attention. Without reference tokens this is plain
    joint attention. Returns ``[B, L, h*d]``.
    """
    out = sdpa_attention(q, k, v, heads)
    if refs is None or refs.count == 0:
        return out
    out[:, image] = mrsa_attention(q[:, image], k, v, refs, heads)
    return out


@dataclass(frozen=True)
class Rope:
    """The rotary position embedding of a DiT (FLUX): base ``theta`` and the split of the head dim
    over the position axes, ``axes_dim`` (FLUX.1: 16 for the image index, 56 for the row, 56 for
    the column; pairs of channels ``(2i, 2i+1)`` are rotated, the pairs of axis ``a`` come after
    those of the axes before it, and pair ``j`` of an axis of ``d`` channels turns by
    ``position * theta^(-2j/d)``)."""
    theta: float
    axes_dim: tuple

    @property
    def head_dim(self) -> int:
        return int(sum(self.axes_dim))

    def angles(self, positions: torch.Tensor) -> torch.Tensor:
        """Rotation angles ``[..., head_dim / 2]`` (float64) of ``positions`` ``[..., n_axes]``."""
        parts = []
        for a, d in enumerate(self.axes_dim):
            omega = float(self.theta) ** (-torch.arange(d // 2, dtype=torch.float64) * 2.0 / d)
            parts.append(positions[..., a:a + 1].to(torch.float64) * omega.to(positions.device))
        return torch.cat(parts, dim=-1)

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``x`` ``[..., N, h*d]`` (heads merged) with every head turned by the rotation of
        ``positions`` (``[n_axes]`` for all tokens, or ``[N, n_axes]`` per token). RoPE rotations
        compose by adding positions, so turning a key that already carries position ``p`` by
        ``delta`` gives the key at ``p + delta``."""
        d = self.head_dim
        if x.shape[-1] % d:
            raise ValueError(f"rope: {x.shape[-1]} channels are not a whole number of {d}-channel heads")
        pos = torch.as_tensor(positions, device=x.device)
        ang = self.angles(pos if pos.dim() > 1 else pos.unsqueeze(0))          # [N or 1, d/2]
        cos = ang.cos().to(torch.float32).unsqueeze(-2)                         # [N or 1, 1, d/2]
        sin = ang.sin().to(torch.float32).unsqueeze(-2)
        shape = x.shape
        pairs = x.to(torch.float32).reshape(*shape[:-1], shape[-1] // d, d // 2, 2)
        x0, x1 = pairs[..., 0], pairs[..., 1]
        out = torch.stack([cos * x0 - sin * x1, sin * x0 + cos * x1], dim=-1)
        return out.reshape(shape).to(x.dtype)
