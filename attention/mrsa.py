"""FreeCustom multi-reference self-attention (MRSA) as a technique of the shared machinery
(docs/algorithms.md §1). Pure torch.

Cond rows of the target attend over their own keys plus the masked, weighted keys of every
reference (``kernels.mrsa_attention``); uncond rows use plain self-attention, or with
``style_fidelity < 1`` the blend ``(1 - sf) * MRSA(uncond references) + sf * plain``; reference rows
use plain self-attention (their features never depend on the target).
"""
from __future__ import annotations

import torch

from ..references.masks import layer_mask, token_grid

from .kernels import ReferenceKeys, mrsa_attention, select_reference_keys
from .layers import SigmaRange
from .patch import COND, UNCOND, RefRequest


def _index(rows: list[int], device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long, device=device)


class MultiReferenceAttention:
    """One MRSA patch: references, the self-attention keys it patches, a sigma range."""

    name = "FreeCustom MRSA"

    def __init__(self, references, layer_keys, sigma_range: SigmaRange, style_fidelity: float = 1.0,
                 seed: int = 0):
        if not references:
            raise ValueError("references: at least one reference is needed")
        if not 0.0 <= style_fidelity <= 1.0:
            raise ValueError(f"style_fidelity must lie in 0..1, got {style_fidelity}")
        if all(float(r.weight) == 0.0 for r in references):
            raise ValueError("references: every reference has weight 0, which removes it (FreeCustom "
                             "treats weight 0 as 'outside the mask'); give at least one a non-zero weight")
        self.references = tuple(references)
        self.attn1_keys = frozenset(layer_keys)
        self.sigmas = sigma_range
        self.style_fidelity = float(style_fidelity)
        self.seed = int(seed)
        self._masks: dict = {}

    # -- technique protocol -------------------------------------------------------------
    def keys(self, kind: str) -> frozenset:
        return self.attn1_keys if kind == "attn1" else frozenset()

    def active(self, sigma: float) -> bool:
        return sigma in self.sigmas

    def active_at(self, layout, extra_options) -> bool:
        return layout is not None and self.active(layout.sigma)

    def reference_requests(self, labels: set) -> list[RefRequest]:
        out = []
        wanted = [COND] if COND in labels else []
        if self.style_fidelity < 1.0 and UNCOND in labels:
            wanted.append(UNCOND)
        for label in wanted:
            out.extend(RefRequest(r, label, self.seed, i) for i, r in enumerate(self.references))
        return out

    # -- attention ----------------------------------------------------------------------
    def layer_masks(self, n_tokens: int, hw: tuple) -> list[torch.Tensor]:
        key = (n_tokens, hw)
        hit = self._masks.get(key)
        if hit is None:
            h, w = token_grid(n_tokens, *hw)
            hit = [layer_mask(r.fitted(*hw)[1], h, w, r.soft_mask) for r in self.references]
            self._masks[key] = hit
        return hit

    def reference_keys(self, layout, key, k, v, label: int) -> ReferenceKeys | None:
        ks, vs, ms, ws = [], [], [], []
        masks = self.layer_masks(k.shape[1], layout.latent_hw)
        for ref, m in zip(self.references, masks):
            kv = layout.reference_kv(key, k, v, ref, label)
            if kv is None:
                continue
            if kv[0].shape[0] != m.shape[0]:
                raise ValueError(f"reference '{ref.name}': {kv[0].shape[0]} reference tokens but a "
                                 f"{m.shape[0]}-token mask at block {key}")
            ks.append(kv[0])
            vs.append(kv[1])
            ms.append(m)
            ws.append(float(ref.weight))
        if not ks:
            return None
        return select_reference_keys(torch.stack(ks), torch.stack(vs), ms, ws)

    def attn1(self, q, k, v, extra_options, *, inner, layout, key, subset_ok=False):
        heads = extra_options["n_heads"]
        n = q.shape[0]
        cond_rows = layout.target_rows(COND)
        if not cond_rows and self.style_fidelity >= 1.0:
            return inner(q, k, v, extra_options)
        refs_c = self.reference_keys(layout, key, k, v, COND) if cond_rows else None
        mrsa_rows = cond_rows if refs_c is not None and refs_c.count else []
        other = [i for i in range(n) if i not in set(mrsa_rows)]

        if not subset_ok:
            out = inner(q, k, v, extra_options).clone()
        else:
            out = torch.empty_like(q)
            if other:
                idx = _index(other, q.device)
                out[idx] = inner(q[idx], k[idx], v[idx], extra_options)
        if mrsa_rows:
            idx = _index(mrsa_rows, q.device)
            out[idx] = mrsa_attention(q[idx], k[idx], v[idx], refs_c, heads)
        if self.style_fidelity < 1.0:
            un_rows = layout.target_rows(UNCOND)
            refs_u = self.reference_keys(layout, key, k, v, UNCOND) if un_rows else None
            if refs_u is not None and refs_u.count:
                idx = _index(un_rows, q.device)
                sf = self.style_fidelity
                out[idx] = (1.0 - sf) * mrsa_attention(q[idx], k[idx], v[idx], refs_u, heads) + sf * out[idx]
        return out
