"""FreeMix disentangle-mixing self-attention (DMSA) as a technique of the shared machinery
(docs/algorithms.md §2). Pure torch; nothing here imports ComfyUI. The kernels are
``dmsa_kernels.py``, the presets (blocks and schedule fractions per model family) ``blocks.py``.

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
  The maps are state of one sampling run: ``new_run`` (ComfyUI's ``ON_PRE_RUN``) clears them, so a
  run never reads another's, whatever its schedule. While they count, every model call's cond rows
  must be conditioned on the prompt the blend word was found in (``check_call``).
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

from typing import Sequence

import torch

from ..references.masks import token_grid
from .dit import IMAGE_KEYS, POSITIONS, ROPE_KEY, SHIFTED, shift_reference
from .dmsa_kernels import BlendMapStore, appearance_attention, cross_attention_maps, structure_attention
from .kernels import token_selection
from .mrsa import reference_layer_mask
from .patch import COND, RefRequest, SigmaRange, Technique, apply_to_rows


# --------------------------------------------------------------------------- the technique

class DisentangleMixingAttention(Technique):
    """One FreeMix DMSA patch (see the module docstring).

    ``structure``, ``appearance``: ``references.reference.Reference`` objects (their masks and
    captions; the structure mask is used with ``structure_weight``, or the reference's own weight
    when that is None; the appearance reference's weight is unused).
    ``structure_keys``, ``appearance_keys``: attn1 keys ``(block, id, index)`` of the two phases;
    ``map_keys``: attn2 keys whose cross-attention gives the blend map.
    ``structure_range``, ``appearance_range``: ``SigmaRange`` of each phase, or None (phase off).
    On a block of both sets the appearance phase takes precedence while its range covers the sigma.
    ``blend_tokens``: positions of the blend word's tokens in the target prompt's conditioning
    (``references.prompt_tokens.word_positions``). ``prompt_tokens``: the length T of that conditioning; when a call's
    text is the prompt repeated to a longer common length (ComfyUI and the reference pass repeat it
    to batch conditionings of different lengths), every repeat of the positions is counted.
    ``threshold``: blend-mask threshold (strict ``>``). ``norm_range``: ``SigmaRange`` in which the
    structure phase uses the spatial normalisation, or None (FreeMix's default: never).
    ``seed``: seed of the references' per-step noise.
    ``prompt_conds``: the encodings of that prompt (``[1, T, C]`` each, one per clip schedule) and
    ``prompt_text`` its text: while the maps count, a cond row conditioned on anything else is an
    error (``check_call``), so the blend word is never looked up in a prompt other than the sampled
    one. Empty: unchecked. The maps are state of one sampling run (``new_run`` clears them).
    """

    name = "FreeMix DMSA"

    def __init__(self, structure, appearance, structure_keys, appearance_keys, map_keys,
                 structure_range: SigmaRange | None, appearance_range: SigmaRange | None,
                 blend_tokens: Sequence[int] = (), prompt_tokens: int | None = None,
                 structure_weight: float | None = 3.0, threshold: float = 0.2,
                 norm_range: SigmaRange | None = None, seed: int = 0, dit=None, positions: str = SHIFTED,
                 subject_tokens: bool = False, prompt_conds: Sequence[torch.Tensor] = (), prompt_text: str = ""):
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
        self.dit = dit                  # blocks.DiTSpec on a DiT model (its keys are DiT blocks)
        self.positions = positions      # where a DiT with RoPE places the structure reference's tokens
        self.subject_tokens = bool(subject_tokens)   # FLUX: references run on their subject's tokens only
        self.maps = BlendMapStore()
        self.prompt_conds = tuple(c.detach().reshape(-1, c.shape[-1]).float().cpu() for c in prompt_conds)
        self._prompt_tol = tuple(1e-3 * max(1.0, float(c.abs().amax())) for c in self.prompt_conds)
        self.prompt_text = str(prompt_text)
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

    def cache_keep(self, reference, label: int) -> str:
        """The spatial normalisation standardises the structure reference over all its tokens."""
        return "all" if reference is self.structure and self.norm_range is not None else "mask"

    def new_run(self) -> None:
        """The blend-word maps belong to one sampling run."""
        self.maps.clear()

    def check_call(self, labels: list, c_crossattn, sigma: float) -> None:
        """While the blend word's maps count, every cond row must be conditioned on the prompt the
        blend word was found in (``prompt_conds``: its encodings; a row may repeat one to a longer
        common length, as ComfyUI batches conditionings). Another prompt would put the word's tokens
        at other positions, or outside the text."""
        if not self.prompt_conds or not isinstance(c_crossattn, torch.Tensor) or not self._recording(sigma):
            return
        for r in _cond_rows(None, {"cond_or_uncond": labels}, c_crossattn.shape[0]):
            if not any(_same_text(c_crossattn[r], self._stamp(i, c_crossattn.device), tol)
                       for i, tol in enumerate(self._prompt_tol)):
                shown = self.prompt_text if len(self.prompt_text) <= 60 else self.prompt_text[:57] + "..."
                raise ValueError(
                    f"prompt: the positive conditioning being sampled is not the encoding of this Disentangle-"
                    f"Mixing node's prompt ('{shown}'); the blend word's tokens are found in that prompt. Write "
                    f"the same prompt in both, or connect this node's 'positive' output to the sampler instead "
                    f"of a separate CLIP Text Encode")

    def _stamp(self, i: int, device) -> torch.Tensor:
        key = ("p", i, str(device))
        if key not in self._cache:
            self._cache[key] = self.prompt_conds[i].to(device)
        return self._cache[key]

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
            self._cache[key] = reference_layer_mask(self.appearance, n_tokens, hw, touched=True).to(device)
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


def _same_text(ctx: torch.Tensor, prompt: torch.Tensor, tol: float) -> bool:
    """Whether one row's text conditioning ``ctx`` ``[L, C]`` is ``prompt`` ``[T, C]``, or it
    repeated ``L / T`` times, up to ``tol`` (rounding)."""
    n, c = prompt.shape
    if ctx.shape[-1] != c or ctx.shape[0] % n:
        return False
    return float((ctx.reshape(-1, n, c).float() - prompt).abs().amax()) <= tol


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
