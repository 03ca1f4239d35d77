"""FreeMix disentangle-mixing self-attention (DMSA) as a technique of the shared machinery
(docs/algorithms.md §2). Pure torch; nothing here imports ComfyUI.

Two references: a *structure* reference (shape/pose) and an *appearance* reference
(texture/identity), each with a mask and a caption, plus the *blend word* of the target prompt.

* **Structure phase** (structure blocks, while the sigma lies in the structure range): the cond
  target rows run the MRSA kernel (§0.3) over ``[own ; structure reference]`` with the structure
  mask and weight (FreeMix default 3.0). Optional *spatial normalisation* (FreeMix's
  ``norm_step``, §2.2; off by default as in FreeMix): while the sigma lies in ``norm_range`` the
  reference block of the logits is ``s * norm(Q_own) norm(K_struct)^T``, where ``norm``
  standardises every channel of every head over the token axis (mean, unbiased std over the N
  tokens; ``kernels.standardize_tokens``). The reference keys are standardised over *all* their
  tokens before the mask selects some, as FreeMix does. The paper describes this as removing the
  residual appearance of the structure reference from its features, so that mostly its layout is
  copied (my reading: per-channel token statistics carry much of a feature map's appearance, as in
  AdaIN-style transfer). It costs one SDPA call with a doubled query/key head dim on the
  structure blocks while it is on (``kernels.mrsa_attention(..., ref_query=...)``).
* **Appearance phase** (appearance blocks, while the sigma lies in the appearance range; it takes
  precedence over the structure phase on those blocks, like FreeMix's ``layer >= structure_layer
  and step >= structure_step``): the blend mask ``M_s`` (where the target's subject is, from the
  blend word's cross-attention) selects target tokens whose own key/value are replaced by
  appearance-reference tokens tiled in raster order (``appearance_attention``); the cond rows then
  attend over these N keys only.
* **Blend mask**: at the map blocks, the attn2 patch records the head-mean cross-attention
  probabilities of the blend word's tokens for the cond target rows (``cross_attention_maps``)
  and returns the normal output. The appearance phase aggregates the maps of the *completed*
  steps (``blend_mask``: mean over layers and steps, min–max normalised per image, ``> 0.2``).
* Uncond target rows are always plain self-attention (FreeMix ignores ``style_fidelity``);
  reference rows are plain.

Deviations from the shipped FreeMix code, all deliberate:

* Layers are addressed by ComfyUI block id and the maps come from fixed blocks, not from "layers
  whose query length is 256", so any resolution works (FreeMix collects nothing away from 512 px).
* Phases switch by sigma (fractions of the schedule), never by a call counter.
* A multi-token blend word (or a word that occurs several times) is the *sum* of its token
  columns, normalised once (FreeMix breaks on it).
* Map layers of different resolutions (possible with custom blocks) are resized to the finest
  grid among them before the mean (FreeMix's layers all share one grid).
* The appearance reference runs only while the appearance phase can act, the structure reference
  only while the structure phase can (FreeMix runs both at every step); the maps are still
  recorded from the first step on, also in model calls without reference rows.
* The appearance layer grid may differ from the map grid in either direction: upsampling is
  nearest (FreeMix's ``F.interpolate`` default; for integer factors thresholding before or after
  is the same), downsampling averages the normalised map over each cell (area) and thresholds
  that.
* No completed step with maps yet (e.g. an appearance phase that starts at the first step, which
  crashes FreeMix): the appearance phase is skipped for that step, the block behaves as it would
  without it (structure phase when the structure range covers the sigma, plain otherwise).
* A constant map (max = min) normalises to 0, so ``M_s`` is empty and the appearance phase is
  plain attention for that image (FreeMix divides by zero).
* The appearance tokens are the tokens of the appearance mask on the layer grid
  (``masks.layer_mask``, the pack's rule for every technique); should a tiny subject leave none,
  every token the subject touches at all is used instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ..references.masks import layer_mask, resize_plane, token_grid

from .kernels import (gather_reference_keys, mrsa_attention, sdpa_attention, split_heads, standardize_tokens,
                      token_selection)
from .layers import SigmaRange, expand_blocks
from .mrsa import reference_layer_mask
from .dit import IMAGE_KEYS, POSITIONS, ROPE_KEY, SHIFTED, shift_reference
from .patch import COND, RefRequest, apply_to_rows


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


def find_token_positions(prompt_ids: Sequence[int], word_ids: Sequence[int], word: str = "blend word") -> list[int]:
    """Positions in the prompt's token sequence (as its conditioning lays them out, chunks
    concatenated, start/end tokens included) of every token of every occurrence of ``word_ids``
    (the word's own tokens, without start/end/padding). A word absent from the prompt is an
    error."""
    p, w = [int(t) for t in prompt_ids], [int(t) for t in word_ids]
    if not w:
        raise ValueError(f"{word}: the word has no tokens; give a word that appears in the prompt")
    out = [i + j for i in range(len(p) - len(w) + 1) if p[i:i + len(w)] == w for j in range(len(w))]
    if not out:
        raise ValueError(f"{word}: not found in the prompt; the word must appear in the positive prompt "
                         f"as a whole word, spelled the same way (e.g. 'dog' in 'a photo of a dog')")
    return sorted(set(out))


# --------------------------------------------------------------------------- presets

@dataclass(frozen=True)
class DMSAPreset:
    """Blocks and schedule fractions of one model family. ``*_percents`` are ``(start, end)``
    fractions of the schedule (``SigmaRange.from_percents``); ``norm_percents`` None = no spatial
    normalisation."""
    structure_blocks: tuple
    appearance_blocks: tuple
    map_blocks: tuple
    structure_percents: tuple = (0.0, 1.0)
    appearance_percents: tuple = (0.4, 1.0)
    structure_weight: float = 3.0
    threshold: float = 0.2
    norm_percents: tuple | None = None

    def keys(self, available: dict) -> tuple[tuple, tuple, tuple]:
        """``(structure_keys, appearance_keys, map_keys)`` of every transformer of the preset's
        blocks in a model whose attention blocks are ``available``
        (``layers.discover_attention_blocks``)."""
        return (expand_blocks(self.structure_blocks, available, "structure layers: the preset"),
                expand_blocks(self.appearance_blocks, available, "appearance layers: the preset"),
                expand_blocks(self.map_blocks, available, "blend-map layers: the preset"))


_out = lambda a, b: tuple(("output", i) for i in range(a, b + 1))

DMSA_PRESETS: dict[str, DMSAPreset] = {
    # FreeMix's inference.py: layer_idx 8..15 = output 4-11; structure_layer 13 = appearance phase
    # on output 9-11 (64x64 at 512 px) from structure_step 20 of 50 (40 % of the schedule);
    # mask weight 3.0; threshold 0.2; norm_step 50 = off. Maps: the 16x16-at-512 blocks
    # (1/4 of the latent side): input 7, 8 and output 3, 4, 5.
    "SD1.5 FreeMix": DMSAPreset(structure_blocks=_out(4, 11), appearance_blocks=_out(9, 11),
                                map_blocks=(("input", 7), ("input", 8)) + _out(3, 5)),
    # SDXL analogue (FreeMix has no SDXL version). SDXL's decoder has attention in two stages,
    # output 0-2 (32x32 at 1024 px, 10 transformers each) and output 3-5 (64x64, 2 each). FreeMix's
    # structure set is "the decoder from its second block on" — a superset of FreeCustom's, whose
    # SDXL analogue in this pack is the whole decoder, output 0-5 — so structure = output 0-5.
    # Appearance = the highest-resolution decoder stage, output 3-5 (FreeMix: output 9-11). Maps:
    # the blocks at 1/4 of the latent side like FreeMix's 16x16-at-512, i.e. 32x32 at 1024:
    # input 7, 8 and output 0, 1, 2, every transformer of them (50 maps per step, averaged).
    "SDXL FreeMix analogue": DMSAPreset(structure_blocks=_out(0, 5), appearance_blocks=_out(3, 5),
                                        map_blocks=(("input", 7), ("input", 8)) + _out(0, 2)),
}


FLUX_DMSA = "FLUX dev/schnell FreeMix analogue"
SD3_DMSA = "SD3/SD3.5 FreeMix analogue"
DIT_DMSA = {"flux": FLUX_DMSA, "sd3": SD3_DMSA}


def dit_dmsa_keys(spec) -> tuple[tuple, tuple, tuple]:
    """``(structure, appearance, map)`` block keys of the FreeMix analogue on a FLUX model
    (docs/algorithms.md §2.7; my choice, FreeMix has no DiT code): the structure phase in every
    single block (the later half of the network, as FreeMix's decoder blocks), the appearance phase
    in the last third of the single blocks (FreeMix: the last, highest-resolution decoder stage),
    the blend-word maps from the image-to-text attention of every double block (where text and
    image streams are still separate). FLUX.1 dev/schnell: single 0-37, single 25-37, double 0-18.
    SD3/SD3.5 (joint blocks only): structure in the later half, appearance in the last third, maps
    from the first half."""
    from .dit import DOUBLE, SINGLE  # noqa: PLC0415

    if spec.family == "sd3":
        n = spec.double
        if n < 2:
            raise ValueError(f"preset '{SD3_DMSA}': needs at least 2 joint blocks; this model has {n}")
        return (tuple((DOUBLE, i) for i in range(n // 2, n)), tuple((DOUBLE, i) for i in range((2 * n) // 3, n)),
                tuple((DOUBLE, i) for i in range(n // 2)))
    if spec.single < 1 or spec.double < 1:
        raise ValueError(f"preset '{FLUX_DMSA}': needs double and single blocks; this model has {spec.double} "
                         f"double and {spec.single} single blocks")
    structure = tuple((SINGLE, i) for i in range(spec.single))
    appearance = tuple((SINGLE, i) for i in range((2 * spec.single) // 3, spec.single))
    maps = tuple((DOUBLE, i) for i in range(spec.double))
    return structure, appearance, maps


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


# --------------------------------------------------------------------------- the technique

class DisentangleMixingAttention:
    """One FreeMix DMSA patch (see the module docstring).

    ``structure``, ``appearance``: ``references.reference.Reference`` objects (their masks and
    captions; the structure mask is used with ``structure_weight``, or the reference's own weight
    when that is None; the appearance reference's weight is unused).
    ``structure_keys``, ``appearance_keys``: attn1 keys ``(block, id, index)`` of the two phases;
    ``map_keys``: attn2 keys whose cross-attention gives the blend map.
    ``structure_range``, ``appearance_range``: ``SigmaRange`` of each phase, or None (phase off).
    On a block of both sets the appearance phase takes precedence while its range covers the sigma.
    ``blend_tokens``: positions of the blend word's tokens in the target prompt's conditioning
    (``find_token_positions``). ``prompt_tokens``: the length T of that conditioning; when a call's
    text is the prompt repeated to a longer common length (ComfyUI and the reference pass repeat it
    to batch conditionings of different lengths), every repeat of the positions is counted.
    ``threshold``: blend-mask threshold (strict ``>``). ``norm_range``: ``SigmaRange`` in which the
    structure phase uses the spatial normalisation, or None (FreeMix's default: never).
    ``seed``: seed of the references' per-step noise.
    """

    name = "FreeMix DMSA"

    def __init__(self, structure, appearance, structure_keys, appearance_keys, map_keys,
                 structure_range: SigmaRange | None, appearance_range: SigmaRange | None,
                 blend_tokens: Sequence[int] = (), prompt_tokens: int | None = None,
                 structure_weight: float | None = 3.0, threshold: float = 0.2,
                 norm_range: SigmaRange | None = None, seed: int = 0, dit=None, positions: str = SHIFTED,
                 subject_tokens: bool = False):
        if structure is None or appearance is None:
            raise ValueError("DMSA needs a structure reference and an appearance reference")
        if not 0.0 <= float(threshold) <= 1.0:
            raise ValueError(f"threshold must lie in 0..1, got {threshold}")
        self.structure = structure
        self.appearance = appearance
        self.structure_weight = float(structure.weight if structure_weight is None else structure_weight)
        self.structure_range = structure_range if structure_keys else None
        self.appearance_range = appearance_range if appearance_keys else None
        self.structure_keys = frozenset(structure_keys) if self.structure_range is not None else frozenset()
        self.appearance_keys = frozenset(appearance_keys) if self.appearance_range is not None else frozenset()
        self.map_keys = frozenset(map_keys) if self.appearance_range is not None else frozenset()
        if self.appearance_range is not None:
            if not self.map_keys:
                raise ValueError("blend-map layers: the appearance phase needs at least one cross-attention "
                                 "block for the blend word's map")
            tokens = sorted({int(t) for t in blend_tokens})
            if not tokens or tokens[0] < 0:
                raise ValueError("blend word: no token positions given; the blend word must appear in the prompt")
            if prompt_tokens is not None and tokens[-1] >= int(prompt_tokens):
                raise ValueError(f"blend word: token positions {tokens} lie outside the prompt's "
                                 f"{prompt_tokens} tokens")
            self.blend_tokens = tuple(tokens)
        else:
            self.blend_tokens = tuple(int(t) for t in blend_tokens)
        self.prompt_tokens = None if prompt_tokens is None else int(prompt_tokens)
        self.threshold = float(threshold)
        self.norm_range = norm_range
        self.seed = int(seed)
        if positions not in POSITIONS:
            raise ValueError(f"reference_positions: unknown '{positions}'; choose one of {POSITIONS}")
        self.dit = dit                  # dit.DiTSpec on a DiT model (its keys are DiT blocks)
        self.positions = positions      # where a DiT with RoPE places the structure reference's tokens
        self.subject_tokens = bool(subject_tokens)   # FLUX: references run on their subject's tokens only
        self.maps = BlendMapStore()
        self._cache: dict = {}
        self._schedule = (None, None)

    # -- technique protocol -------------------------------------------------------------
    def keys(self, kind: str) -> frozenset:
        if kind == "attn1":
            return self.structure_keys | self.appearance_keys
        if kind == "attn2":
            return self.map_keys
        return frozenset()

    def _structure_on(self, sigma: float) -> bool:
        return self.structure_range is not None and sigma in self.structure_range

    def _appearance_on(self, sigma: float) -> bool:
        return self.appearance_range is not None and sigma in self.appearance_range

    def _recording(self, sigma: float) -> bool:
        # Maps are needed from the first step until the appearance phase ends.
        return self.appearance_range is not None and float(sigma) >= self.appearance_range.sigma_end

    def active(self, sigma: float) -> bool:
        return self._structure_on(sigma) or self._recording(sigma)

    def active_at(self, layout, extra_options) -> bool:
        sigma = _call_sigma(layout, extra_options)
        return sigma is not None and self.active(sigma)

    def max_reference_rows(self) -> int:
        return int(bool(self.structure_keys)) + int(bool(self.appearance_keys))

    def reference_requests(self, labels: set, sigma: float | None = None) -> list[RefRequest]:
        """Cond references only (uncond rows are always plain): the structure reference while
        the structure phase may act, the appearance reference while the appearance phase may."""
        if COND not in labels:
            return []
        out = []
        if self.structure_keys and (sigma is None or self._structure_on(sigma)):
            out.append(RefRequest(self.structure, COND, self.seed, 0, self.subject_tokens))
        if self.appearance_keys and (sigma is None or self._appearance_on(sigma)):
            out.append(RefRequest(self.appearance, COND, self.seed, 1, self.subject_tokens))
        return out

    # -- helpers ------------------------------------------------------------------------
    def schedule(self, extra_options) -> tuple | None:
        """``sample_sigmas`` as floats (converted once per sampling run), or None."""
        ss = extra_options.get("sample_sigmas")
        if not isinstance(ss, torch.Tensor):
            return None
        if self._schedule[0] is not ss:
            self._schedule = (ss, tuple(float(s) for s in ss.reshape(-1).tolist()))
        return self._schedule[1]

    def structure_selection(self, n_tokens: int, hw: tuple, device):
        key = ("s", n_tokens, tuple(hw), str(device))
        if key not in self._cache:
            m = reference_layer_mask(self.structure, n_tokens, hw).to(device)
            self._cache[key] = token_selection(m, self.structure_weight)
        return self._cache[key]

    def appearance_mask(self, n_tokens: int, hw: tuple, device) -> torch.Tensor:
        """The appearance tokens at a layer ``[n_tokens]``: the layer mask, or every token the
        subject touches when a tiny subject leaves no token covered at least half."""
        key = ("a", n_tokens, tuple(hw), str(device))
        if key not in self._cache:
            m = reference_layer_mask(self.appearance, n_tokens, hw)
            if not bool((m != 0).any()):
                gh, gw = token_grid(n_tokens, *hw)
                m = layer_mask(self.appearance.fitted(*hw)[1], gh, gw, soft=True)
            self._cache[key] = m.to(device)
        return self._cache[key]

    def token_columns(self, n_text: int) -> list[int]:
        """Columns of the blend word in a call with ``n_text`` text tokens."""
        t = self.prompt_tokens
        if t is not None and n_text != t and n_text % t == 0:
            return [p + r * t for r in range(n_text // t) for p in self.blend_tokens]
        return list(self.blend_tokens)

    # -- attention ----------------------------------------------------------------------
    def attn1(self, q, k, v, extra_options, *, inner, layout, key, subset_ok=False):
        if layout is None:
            return inner(q, k, v, extra_options)
        sigma = layout.sigma
        rows = layout.target_rows(COND)
        heads = extra_options["n_heads"]
        n = q.shape[1]
        groups, rest = [], list(rows)
        if rows and key in self.appearance_keys and self._appearance_on(sigma):
            kv = layout.reference_kv(key, k, v, self.appearance, COND)
            if kv is not None:
                grid = token_grid(n, *layout.latent_hw)
                sched = self.schedule(extra_options)
                masks = {r: self.maps.mask(j, sigma, sched, layout.latent_hw, grid, self.threshold)
                         for j, r in enumerate(rows)}
                app_rows = [r for r in rows if masks[r] is not None]
                rest = [r for r in rows if masks[r] is None]   # no completed maps yet: as without the phase
                if app_rows:
                    app_mask = self.appearance_mask(n, layout.latent_hw, k.device)

                    grid = extra_options.get(ROPE_KEY)
                    move = grid.moved if grid is not None else None
                    image_keys = extra_options.get(IMAGE_KEYS)

                    def appearance(run, kv=kv, masks=masks, app_mask=app_mask):
                        ms = torch.stack([masks[r] for r in range(run.start, run.stop)])
                        return appearance_attention(q[run], k[run], v[run], kv[0], kv[1], ms, app_mask, heads,
                                                    image_keys, move)
                    groups.append((app_rows, appearance))
        if rest and key in self.structure_keys and self._structure_on(sigma):
            kv = layout.reference_kv(key, k, v, self.structure, COND)
            sel = self.structure_selection(n, layout.latent_hw, k.device)
            if kv is not None and sel is not None:
                norm = self.norm_range is not None and sigma in self.norm_range
                kv = (shift_reference(extra_options, kv[0], 1, self.positions), kv[1])

                def structure(run, kv=kv, sel=sel, norm=norm):
                    return structure_attention(q[run], k[run], v[run], kv[0], kv[1], sel, heads, norm)
                groups.append((rest, structure))
        if not groups:
            return inner(q, k, v, extra_options)
        return apply_to_rows(q, k, v, extra_options, inner, subset_ok, groups)

    def attn2(self, q, k, v, extra_options, *, inner, layout, key, subset_ok=False):
        """Record the blend-word maps of the cond target rows; the output is unchanged."""
        self.record_maps(q, k, extra_options, layout, key)
        return inner(q, k, v, extra_options)

    def record_maps(self, q, k, extra_options, layout, key) -> None:
        """Record the blend-word maps of the cond target rows of queries ``q`` ``[B, N, h*d]``
        against text keys ``k`` ``[B, T, h*d]`` (cross-attention; in a DiT, the text part of the
        joint attention, softmax over the text tokens)."""
        sigma = _call_sigma(layout, extra_options)
        if sigma is not None and self._recording(sigma):
            rows = _cond_rows(layout, extra_options, q.shape[0])
            if rows:
                idx = torch.as_tensor(rows, device=q.device)
                maps = cross_attention_maps(q.index_select(0, idx), k.index_select(0, idx),
                                            extra_options["n_heads"], self.token_columns(k.shape[1]))
                sched = self.schedule(extra_options)
                for j, m in enumerate(maps):
                    self.maps.record(j, sigma, key, m, sched)


def _call_sigma(layout, extra_options) -> float | None:
    if layout is not None:
        return float(layout.sigma)
    s = extra_options.get("sigmas")
    if isinstance(s, torch.Tensor) and s.numel():
        return float(s.reshape(-1)[0])
    return None


def _cond_rows(layout, extra_options, batch: int) -> list[int]:
    """Cond target rows of a call: from the reference pass's layout, or (a call without
    reference rows) from ``cond_or_uncond``."""
    if layout is not None:
        return [] if layout.mode == "record" else layout.target_rows(COND)
    labels = list(extra_options.get("cond_or_uncond") or [])
    if not labels or batch % len(labels):
        return []
    c = batch // len(labels)
    return [i for j, lab in enumerate(labels) if lab == COND for i in range(j * c, (j + 1) * c)]
