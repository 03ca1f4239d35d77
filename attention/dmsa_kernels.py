"""FreeMix's DMSA kernels (docs/algorithms.md §2; the technique is ``dmsa.py``). Pure torch.

The appearance phase (``appearance_attention``), the structure phase (``structure_attention``),
the blend word's cross-attention maps (``cross_attention_maps``), their aggregation into the blend
mask ``M_s`` (``blend_map``, ``blend_mask``) and the per-step store of those maps (``BlendMapStore``).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..references.masks import resize_plane, token_grid
from .kernels import gather_reference_keys, mrsa_attention, sdpa_attention, split_heads, standardize_tokens


# --------------------------------------------------------------------------- kernels

def appearance_source_index(n_tokens: int, app_mask: torch.Tensor) -> torch.Tensor:
    """For every target position ``p`` in ``0..n_tokens-1``: the appearance token it takes,
    ``sel[p mod n]`` with ``sel`` the raster indices of the non-zero appearance mask (FreeMix's
    tiling by *absolute* position, §2.2 step 3). ``[n_tokens]`` long."""
    sel = torch.nonzero(app_mask.reshape(-1) != 0, as_tuple=False).flatten()
    if sel.numel() == 0:
        raise ValueError("appearance mask: no appearance token is selected at this layer (the mask is "
                         "empty on the layer grid); give the appearance reference a larger subject mask")
    pos = torch.arange(n_tokens, device=sel.device)
    return sel[pos % sel.numel()]


def appearance_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_app: torch.Tensor,
                         v_app: torch.Tensor, struct_mask: torch.Tensor, app_mask: torch.Tensor,
                         heads: int, image_keys: tuple | None = None, reposition=None) -> torch.Tensor:
    """FreeMix's appearance phase (docs/algorithms.md §2.2 steps 3-4).

    ``q, k, v``: target rows ``[B, N, h*d]``. ``k_app, v_app``: the appearance reference's keys and
    values at the same layer, ``[N_a, h*d]`` (shared by every row) or ``[B, N_a, h*d]``.
    ``struct_mask``: the blend mask ``M_s`` ``[N]`` or ``[B, N]`` (bool or 0/1; non-zero = inside).
    ``app_mask``: appearance mask ``[N_a]``.

    For each ``p`` with ``M_s[p] != 0``: ``K'[p] = K_app[sel[p mod n]]``, ``V'[p]`` likewise; other
    positions keep their own key/value; ``out = softmax(s Q K'^T) V'`` over these N keys only (one
    SDPA call). An empty ``M_s`` gives plain self-attention (for every row where it is empty); an
    empty appearance selection is a ``ValueError`` (unless ``M_s`` is empty everywhere).

    In a DiT's joint attention (§2.7) ``k, v`` are the target's own joint keys ``[B, L, h*d]`` and
    ``image_keys = (start, stop)`` is where its N image tokens lie among them; only those are
    substituted (the text keys stay). ``reposition(k, src, dst)``: with RoPE, the appearance key of
    token ``src`` moved to the position of target token ``dst`` (a transplanted token sits where it
    is put, as in a UNet).
    """
    b, n, c = q.shape
    ms = struct_mask
    if ms.dim() == 1:
        ms = ms.unsqueeze(0)
    if ms.dim() != 2 or ms.shape[-1] != n or ms.shape[0] not in (1, b):
        raise ValueError(f"struct_mask: expected [{n}] or [{b}, {n}] for {n} tokens, got {tuple(struct_mask.shape)}")
    inside = (ms != 0).to(q.device)
    if not bool(inside.any()):
        return sdpa_attention(q, k, v, heads)
    if k_app.shape != v_app.shape or k_app.shape[-1] != c or k_app.dim() not in (2, 3):
        raise ValueError(f"k_app/v_app: expected [N_a, {c}] or [B, N_a, {c}], got {tuple(k_app.shape)} "
                         f"and {tuple(v_app.shape)}")
    n_a = k_app.shape[-2]
    if app_mask.numel() != n_a:
        raise ValueError(f"app_mask: {app_mask.numel()} values for {n_a} appearance tokens")
    src = appearance_source_index(n, app_mask.to(q.device))
    kt = k_app.index_select(-2, src)
    if reposition is not None:
        kt = reposition(kt, src, torch.arange(n, device=src.device))
    kt = kt.to(k.dtype)
    vt = v_app.index_select(-2, src).to(v.dtype)
    if kt.dim() == 2:
        kt, vt = kt.unsqueeze(0), vt.unsqueeze(0)
    sel = inside.unsqueeze(-1)
    a, b = (0, k.shape[1]) if image_keys is None else (int(image_keys[0]), int(image_keys[1]))
    if b - a != n:
        raise ValueError(f"image_keys: {b - a} image keys for {n} image queries")
    if (a, b) == (0, k.shape[1]):
        return sdpa_attention(q, torch.where(sel, kt, k), torch.where(sel, vt, v), heads)
    kk, vv = k.clone(), v.clone()
    kk[:, a:b] = torch.where(sel, kt, k[:, a:b])
    vv[:, a:b] = torch.where(sel, vt, v[:, a:b])
    return sdpa_attention(q, kk, vv, heads)


def structure_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_ref: torch.Tensor,
                        v_ref: torch.Tensor, selection, heads: int, normalise: bool = False) -> torch.Tensor:
    """FreeMix's structure phase for target rows ``[B, N, h*d]``: the MRSA kernel over
    ``[own ; structure reference]`` (``k_ref, v_ref`` ``[N_s, h*d]``; ``selection`` from
    ``kernels.token_selection`` of the structure mask and weight, None = nothing selected, then
    plain self-attention). ``normalise``: the spatial normalisation — the reference block of the
    logits uses ``standardize_tokens(q)`` (per row) and ``standardize_tokens(k_ref)`` (over all
    N_s reference tokens, before the selection)."""
    if normalise:
        k_ref = standardize_tokens(k_ref)
    refs = gather_reference_keys([(k_ref, v_ref)], [selection])
    if refs is None:
        return sdpa_attention(q, k, v, heads)
    return mrsa_attention(q, k, v, refs, heads, ref_query=standardize_tokens(q) if normalise else None)


def cross_attention_maps(q: torch.Tensor, k_text: torch.Tensor, heads: int, token_idx) -> torch.Tensor:
    """Blend-word maps of a cross-attention call: for rows ``q`` ``[B, N, h*d]`` and text keys
    ``k_text`` ``[B, L, h*d]``, the softmax over *all* L text tokens, averaged over heads, summed
    over the token columns ``token_idx`` (the tokens of a multi-token word, every occurrence).
    ``[B, N]`` float32. The logits are explicit (``L`` is 77·k, small)."""
    cols = [int(i) for i in token_idx]
    n_text = k_text.shape[1]
    if not cols:
        raise ValueError("token_idx: no blend-word token given")
    if min(cols) < 0 or max(cols) >= n_text:
        raise ValueError(f"token_idx: positions {cols} lie outside the {n_text} text tokens")
    idx = torch.tensor(cols, dtype=torch.long, device=q.device)
    qh = split_heads(q, heads).float()
    kh = split_heads(k_text, heads).float()
    probs = torch.softmax(torch.matmul(qh, kh.transpose(-1, -2)) * qh.shape[-1] ** -0.5, dim=-1)
    return probs.index_select(-1, idx).sum(-1).mean(1)


def blend_map(maps: Sequence[Sequence[torch.Tensor]], latent_hw: tuple) -> torch.Tensor:
    """The aggregated, min–max normalised blend-word map ``[B, h, w]`` in 0..1.

    ``maps``: one sequence per completed step, each holding the ``[B, N_l]`` maps of the map
    layers (``cross_attention_maps``). Each map is put on its layer grid (``token_grid`` of the
    ``latent_hw`` latent), resized to the finest grid among them (bilinear up, area down), averaged
    over the layers of a step, then over the steps (FreeMix: mean over layers, divided by the
    number of completed steps), and min–max normalised per image. A constant map becomes 0.
    """
    steps = [list(s) for s in maps if len(s)]
    if not steps:
        raise ValueError("maps: no cross-attention maps to aggregate")
    grids = [token_grid(m.shape[-1], *latent_hw) for s in steps for m in s]
    gh, gw = max(grids, key=lambda g: (g[0] * g[1], g))
    acc = None
    for s in steps:
        layers = [resize_plane(m.float().reshape(-1, *token_grid(m.shape[-1], *latent_hw)), gh, gw) for m in s]
        mean = torch.stack(layers).mean(0)
        acc = mean if acc is None else acc + mean
    agg = acc / len(steps)
    lo = agg.amin(dim=(-2, -1), keepdim=True)
    span = agg.amax(dim=(-2, -1), keepdim=True) - lo
    return torch.where(span > 0, (agg - lo) / span.clamp_min(torch.finfo(agg.dtype).tiny), torch.zeros_like(agg))


def blend_mask(maps: Sequence[Sequence[torch.Tensor]], latent_hw: tuple, out_hw: tuple,
               threshold: float = 0.2) -> torch.Tensor:
    """FreeMix's blend (structure) mask ``M_s`` ``[B, out_h, out_w]`` bool from the maps of the
    completed steps (``blend_map``): the normalised map on the grid ``out_hw`` of the appearance
    layer, strictly ``> threshold``. Upsampling is nearest (as FreeMix, which thresholds on the map
    grid and nearest-upsamples; the same for integer factors); downsampling averages each cell
    (area) and thresholds the average."""
    norm = blend_map(maps, latent_hw)
    oh, ow = int(out_hw[0]), int(out_hw[1])
    gh, gw = norm.shape[-2:]
    if (oh, ow) != (gh, gw):
        mode = "area" if (oh <= gh and ow <= gw) else "nearest-exact"
        norm = F.interpolate(norm.unsqueeze(1), size=(oh, ow), mode=mode).squeeze(1)
    return norm > threshold


# --------------------------------------------------------------------------- map store

class BlendMapStore:
    """Blend-word maps of one technique, per cond target row (the j-th cond row of a call), per
    sigma of the schedule, per map layer.

    Sampling runs from high to low sigma, so a map recorded at sigma ``s`` replaces the one of an
    earlier run at ``s``, and maps at lower sigmas can only be left over from an earlier run: they
    are dropped. Aggregation at sigma ``s`` uses only sigmas strictly greater than ``s`` that belong
    to the current schedule (``sample_sigmas``), so a new sampling run (other steps, other
    scheduler, img2img) never reads maps of another one. A sampler that goes back up in sigma
    (restart samplers) loses the maps below the sigma it restarts from; they are re-recorded.
    """

    def __init__(self):
        self._rows: dict[int, dict[float, dict]] = {}
        self._cache: dict = {}

    def clear(self) -> None:
        self._rows.clear()
        self._cache.clear()

    def record(self, row: int, sigma: float, key, m: torch.Tensor, schedule: tuple | None = None) -> None:
        store = self._rows.setdefault(row, {})
        sigma = float(sigma)
        for s in list(store):
            lower = s < sigma and not _close(s, sigma)                      # left over from an earlier run
            foreign = schedule is not None and s != sigma and not _in_schedule(s, schedule)
            if lower or foreign:
                del store[s]
        store.setdefault(sigma, {})[key] = m.detach()
        for c in [c for c in self._cache if c[0] == row and c[1] < sigma]:
            del self._cache[c]

    def completed(self, row: int, sigma: float, schedule: tuple | None = None) -> list[list[torch.Tensor]]:
        """The maps of the completed steps for ``row`` at ``sigma``, one list per step."""
        store = self._rows.get(row, {})
        sigmas = sorted((s for s in store if s > float(sigma) and not _close(s, sigma)
                         and (schedule is None or _in_schedule(s, schedule))), reverse=True)
        return [list(store[s].values()) for s in sigmas]

    def mask(self, row: int, sigma: float, schedule, latent_hw: tuple, out_hw: tuple, threshold: float):
        """``M_s`` ``[out_h * out_w]`` bool of ``row`` at ``sigma``, or None without completed
        maps. Cached per step and grid."""
        key = (row, float(sigma), tuple(latent_hw), tuple(out_hw), float(threshold),
               None if schedule is None else (len(schedule), schedule[0], schedule[-1], sum(schedule)))
        if key not in self._cache:
            maps = self.completed(row, sigma, schedule)
            self._cache[key] = (blend_mask([[m.unsqueeze(0) for m in step] for step in maps], latent_hw, out_hw,
                                           threshold)[0].reshape(-1) if maps else None)
        return self._cache[key]


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-5 * max(1.0, abs(a), abs(b))


def _in_schedule(s: float, schedule: tuple) -> bool:
    return any(_close(s, x) for x in schedule)
