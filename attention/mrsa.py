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

from .kernels import ReferenceKeys, gather_reference_keys, mrsa_attention, token_selection
from .dit import POSITIONS, SHIFTED, shift_reference
from .patch import COND, UNCOND, RefRequest, SigmaRange, Technique, apply_to_rows, row_runs


def reference_layer_mask(reference, n_tokens: int, latent_hw: tuple, touched: bool = False) -> torch.Tensor:
    """The mask of ``reference`` fitted to a ``latent_hw`` target latent, on the token grid of a
    layer with ``n_tokens`` tokens, flattened row-major ``[n_tokens]`` (``masks.layer_mask``:
    hard masks keep tokens covered at least half, soft masks keep the covered fraction). With
    ``touched``, a tiny subject that leaves no token gives every token it touches instead (the
    covered fraction)."""
    h, w = token_grid(n_tokens, *latent_hw)
    pixel = reference.fitted(*latent_hw)[1]
    m = layer_mask(pixel, h, w, reference.soft_mask)
    if touched and not bool((m != 0).any()):
        m = layer_mask(pixel, h, w, soft=True)
    return m


class MultiReferenceAttention(Technique):
    """One MRSA patch: references, the self-attention keys it patches, a sigma range."""

    name = "FreeCustom MRSA"

    def __init__(self, references, layer_keys, sigma_range: SigmaRange, style_fidelity: float = 1.0,
                 seed: int = 0, dit=None, positions: str = SHIFTED, subject_tokens: bool = False):
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
        if positions not in POSITIONS:
            raise ValueError(f"reference_positions: unknown '{positions}'; choose one of {POSITIONS}")
        self.dit = dit                  # blocks.DiTSpec on a DiT model (its layer keys are DiT blocks)
        self.positions = positions      # where a DiT with RoPE places the reference tokens
        self.subject_tokens = bool(subject_tokens)   # FLUX: references run on their subject's tokens only
        self._selections: dict = {}

    # -- technique protocol -------------------------------------------------------------
    def active_at(self, layout, extra_options) -> bool:
        return layout is not None and self.active(layout.sigma)

    def max_reference_rows(self) -> int:
        return len(self.references) * (2 if self.style_fidelity < 1.0 else 1)

    def reference_requests(self, labels: set, sigma: float | None = None) -> list[RefRequest]:
        out = []
        wanted = [COND] if COND in labels else []
        if self.style_fidelity < 1.0 and UNCOND in labels:
            wanted.append(UNCOND)
        for label in wanted:
            out.extend(RefRequest(r, label, self.seed, i, self.subject_tokens) for i, r in enumerate(self.references))
        return out

    # -- attention ----------------------------------------------------------------------
    def selections(self, n_tokens: int, hw: tuple, device) -> list:
        """Per reference: the tokens that take part at a layer of ``n_tokens`` tokens and their
        bias (``kernels.token_selection``). Computed once per layer size, latent size and device."""
        key = (n_tokens, hw, str(device))
        hit = self._selections.get(key)
        if hit is None:
            hit = [token_selection(reference_layer_mask(r, n_tokens, hw).to(device), float(r.weight))
                   for r in self.references]
            self._selections[key] = hit
        return hit

    def reference_keys(self, layout, key, k, v, label: int, n_tokens: int, extra_options) -> ReferenceKeys | None:
        """The key set of the references run with ``label`` at a layer whose image has
        ``n_tokens`` tokens (on a DiT with shifted positions, reference ``i`` stands ``i + 1``
        grid widths beside the target)."""
        kvs, sels = [], []
        for i, (ref, sel) in enumerate(zip(self.references, self.selections(n_tokens, layout.latent_hw, k.device))):
            kv = layout.reference_kv(key, k, v, ref, label)
            if kv is not None and sel is not None:
                kvs.append((shift_reference(extra_options, kv[0], i + 1, self.positions), kv[1]))
                sels.append(sel)
        return gather_reference_keys(kvs, sels)

    def attn1(self, q, k, v, extra_options, *, inner, layout, key, subset_ok=False):
        heads = extra_options["n_heads"]
        cond_rows = layout.target_rows(COND)
        n = q.shape[1]
        refs_c = self.reference_keys(layout, key, k, v, COND, n, extra_options) if cond_rows else None
        mrsa_rows = set(cond_rows) if refs_c is not None else set()
        un_rows = layout.target_rows(UNCOND) if self.style_fidelity < 1.0 else []
        refs_u = self.reference_keys(layout, key, k, v, UNCOND, n, extra_options) if un_rows else None
        if not mrsa_rows and refs_u is None:
            return inner(q, k, v, extra_options)

        out = apply_to_rows(q, k, v, extra_options, inner, subset_ok,
                            [(mrsa_rows, lambda run: mrsa_attention(q[run], k[run], v[run], refs_c, heads))])
        if refs_u is not None:
            sf = self.style_fidelity
            for run in row_runs(un_rows):
                out[run] = (1.0 - sf) * mrsa_attention(q[run], k[run], v[run], refs_u, heads) + sf * out[run]
        return out
