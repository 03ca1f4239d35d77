"""Attention computed independently of the pack, for the kernel and patch tests: FreeCustom's MRSA
formula written out in float64 numpy, the two example masks of docs/algorithms.md §1.8, the layout
converters between per-head arrays and the (batch, tokens, heads*dim) tensors ComfyUI hands a replace
patch, and the pack's own kernel called on the same numpy inputs."""
import numpy as np
import torch

from personalize_pack.attention.kernels import mrsa_attention, select_reference_keys


def reference_mrsa(q, k_own, v_own, k_refs, v_refs, masks, weights):
    """FreeCustom's formula, written out per head in float64 numpy: concatenated keys, bias
    ``w*m`` inside the mask and ``finfo.min`` outside, explicit softmax. q,k,v: (h, N, d)."""
    h, n, d = q.shape
    K = np.concatenate([k_own] + list(k_refs), axis=1)
    V = np.concatenate([v_own] + list(v_refs), axis=1)
    S = np.einsum("hnd,hmd->hnm", q, K) * d ** -0.5
    bias = [np.zeros(k_own.shape[1])]
    for m, w in zip(masks, weights):
        m = np.asarray(m, dtype=np.float64).reshape(-1)
        b = w * m
        bias.append(np.where(b != 0, b, np.finfo(np.float64).min))
    S = S + np.concatenate(bias)[None, None, :]
    S = S - S.max(-1, keepdims=True)
    P = np.exp(S)
    P /= P.sum(-1, keepdims=True)
    out = np.einsum("hnm,hmd->hnd", P, V)
    return out.transpose(1, 0, 2).reshape(n, h * d), P


def to_bnc(x):  # (h, N, d) -> (1, N, h*d) head-major, the layout ComfyUI hands to a replace patch
    h, n, d = x.shape
    return torch.from_numpy(np.ascontiguousarray(x.transpose(1, 0, 2).reshape(1, n, h * d)))


def run_ours(q, k, v, k_refs, v_refs, masks, weights, heads):
    refs = select_reference_keys(torch.cat([to_bnc(x) for x in k_refs]), torch.cat([to_bnc(x) for x in v_refs]),
                                 [torch.tensor(np.asarray(m, dtype=np.float64).reshape(-1)) for m in masks],
                                 weights)
    return mrsa_attention(to_bnc(q), to_bnc(k), to_bnc(v), refs, heads)[0].numpy()


M1 = [[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]
M2 = [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]


def heads_first(x, heads=2, dim=8):  # [N, h*d] -> (h, N, d); the stand-in models' 2 heads of 8 channels
    return x.reshape(x.shape[0], heads, dim).permute(1, 0, 2).numpy()
