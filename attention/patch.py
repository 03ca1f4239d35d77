"""The machinery every attention technique of the pack registers into.

* ``PersonalizeState`` lives in ``transformer_options["personalize"]`` of a cloned MODEL and lists
  the techniques patched onto it (immutable: a node builds a new state and sets it on its clone).
* ``Technique`` declares the protocol a technique provides (its fields and methods, with defaults).
* ``RowLayout`` says where the reference rows of one model call are (``reference_pass.py`` builds
  it; the patches read it from ``transformer_options["personalize_rows"]``); ``row_runs`` and
  ``apply_to_rows`` compute some rows of an attention call by a technique and the rest plainly.
* ``PersonalizeAttention`` is the one attn1/attn2 replace object per block. It folds the active
  techniques that claim the block around the base attention, which is ComfyUI's own
  ``optimized_attention`` or a replace another pack had put on the block (wrapped, not lost).
* ``SigmaRange`` gates a technique by sigma (fractions of the schedule), for any sampler.

The reference pass is ``reference_pass.py``, the DiT block runtime ``dit_blocks.py``, and
``install.py`` puts a technique on a cloned MODEL. Nothing here imports ComfyUI at module level.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field

import torch

from .kernels import sdpa_attention

STATE_KEY = "personalize"
ROWS_KEY = "personalize_rows"
BRANCH_KEY = "personalize_branches"        # FreeCure's personalised/foundation layout of one model call
LATENT_KEY = "personalize_latent_hw"       # the latent size of a DiT call (its blocks see only tokens)
SIGMA_KEY = "personalize_sigma"            # the sigma of a DiT call as a float (read once, not per block)
WRAPPER_KEY = "personalize.reference_pass"
COND, UNCOND = 0, 1


# --------------------------------------------------------------------------- state and protocol

@dataclass(frozen=True)
class PersonalizeState:
    techniques: tuple = ()
    base_memory_factor: float | None = None     # the model's own memory_usage_factor
    policy: object = None                       # ref_cache.ReferencePolicy: how reference keys/values are reused

    def with_technique(self, technique) -> "PersonalizeState":
        return dataclasses.replace(self, techniques=self.techniques + (technique,))

    def with_policy(self, policy) -> "PersonalizeState":
        return dataclasses.replace(self, policy=policy)

    def reference_rows(self) -> int:
        """The most reference rows one model call may carry (a bound; shared rows count twice)."""
        return sum(t.max_reference_rows() for t in self.techniques)

    @property
    def dit(self):
        """The ``blocks.DiTSpec`` of the model when its techniques patch DiT blocks, else None."""
        return next((t.dit for t in self.techniques if t.dit is not None), None)


class SigmaRange:
    """Gate by sigma: a technique is active while ``sigma_end <= sigma <= sigma_start``, the
    sigmas of the start/end fractions of the schedule. Works for any sampler and step count."""

    def __init__(self, sigma_start: float, sigma_end: float):
        self.sigma_start = float(sigma_start)
        self.sigma_end = float(sigma_end)

    @classmethod
    def from_percents(cls, model_sampling, start: float, end: float) -> "SigmaRange":
        if not 0.0 <= start <= 1.0 or not 0.0 <= end <= 1.0:
            raise ValueError(f"start_percent/end_percent must lie in 0..1, got {start}, {end}")
        if start > end:
            raise ValueError(f"start_percent ({start}) must not be after end_percent ({end})")
        s0 = float(model_sampling.percent_to_sigma(start))
        s1 = float(model_sampling.percent_to_sigma(end))
        if end >= 1.0:
            s1 = 0.0
        return cls(s0, s1)

    def __contains__(self, sigma: float) -> bool:
        return self.sigma_end <= float(sigma) <= self.sigma_start


class Technique:
    """The technique protocol (``mrsa.MultiReferenceAttention``, ``dmsa.DisentangleMixingAttention``,
    ``fasa.FoundationAwareAttention``, ``mip.MultiImagePromptAttention``, ``infusion.InfusionAttention``).

    Fields (class defaults; a technique sets what it uses):

    * ``name``: how errors name it.
    * ``attn1_keys`` / ``attn2_keys``: the self-/cross-attention block keys it patches
      (``(block, id, index)`` on a UNet, ``(kind, i)`` DiT blocks on a DiT).
    * ``sigmas``: the ``SigmaRange`` in which it acts (None: ``active`` is overridden).
    * ``dit``: the model's ``blocks.DiTSpec`` when its keys are DiT blocks, None on a UNet.
    * ``exclusive``: it owns the batch layout (FreeCure's second branch) and combines with no
      technique that adds reference rows.
    * ``overrides``: on a DiT it changes its blocks' joint attention through an attention override
      of its own (``override(previous, txt_len)``, chained onto ``previous``) instead of the
      shared ``JointAttention`` (native reference control).

    Methods: ``keys(kind)``; ``active(sigma)`` (whether it acts in a model call at that sigma);
    ``active_at(layout, extra_options)`` (the same inside one attention call; ``layout`` is None in
    a call without reference rows); ``reference_requests(labels, sigma)`` (the ``RefRequest`` list
    for a call with these ``cond_or_uncond`` labels); ``max_reference_rows()`` (the most reference
    rows it adds to one call); ``attn1`` / ``attn2(q, k, v, extra_options, *, inner, layout, key,
    subset_ok)`` (its attention on a claimed block; the default is the plain ``inner``);
    ``record_maps(q, k, extra_options, layout, key)`` (on a DiT block it claims for attn2: the
    image queries against the text keys, for techniques that read cross-attention maps);
    ``cache_keep(reference, label)`` (which tokens of a reference's keys/values the reference
    cache must keep for it: ``"mask"``, the tokens its mask covers, or ``"all"``);
    ``check_call(labels, c_crossattn, sigma)`` (before every model call of a run: raise a clear error
    when the call's conditioning is not what the technique was built for); ``new_run()`` (a sampling
    run starts: forget what the last run left, so the same inputs give the same image whatever ran
    before).
    """

    name = "technique"
    attn1_keys: frozenset = frozenset()
    attn2_keys: frozenset = frozenset()
    sigmas: SigmaRange | None = None
    dit = None
    exclusive = False
    overrides = False

    def keys(self, kind: str) -> frozenset:
        if kind == "attn1":
            return self.attn1_keys
        if kind == "attn2":
            return self.attn2_keys
        return frozenset()

    def active(self, sigma: float) -> bool:
        return sigma in self.sigmas

    def active_at(self, layout, extra_options) -> bool:
        return layout is not None and self.active(layout.sigma)

    def reference_requests(self, labels: set, sigma: float | None = None) -> list:
        return []

    def max_reference_rows(self) -> int:
        return 0

    def attn1(self, q, k, v, extra_options, *, inner, layout, key, subset_ok=False):
        return inner(q, k, v, extra_options)

    def attn2(self, q, k, v, extra_options, *, inner, layout, key, subset_ok=False):
        return inner(q, k, v, extra_options)

    def record_maps(self, q, k, extra_options, layout, key) -> None:
        return None

    def cache_keep(self, reference, label: int) -> str:
        return "mask"

    def check_call(self, labels: list, c_crossattn, sigma: float) -> None:
        return None

    def new_run(self) -> None:
        return None

    def override(self, previous, txt_len: int):
        return previous


@dataclass(frozen=True)
class RefRequest:
    """A technique asks for ``reference`` to be run with the ``label`` (COND/UNCOND) conditioning
    of the target; ``seed`` seeds its per-step noise. ``subject``: on FLUX, run only the image
    tokens of the reference's subject (``dit.subject_tokens``), in a call of its own."""
    reference: object
    label: int
    seed: int
    index: int = 0
    subject: bool = False


class RecordDone(Exception):
    """Raised by a references-only DiT call once the last patched block has banked its keys (the
    rest of the model is never needed, and a call on a subset of tokens cannot be unpatchified)."""


@dataclass
class RowLayout:
    """Where the reference rows of one model call are.

    ``mode``: ``"joint"`` (references are rows ``n_target..`` of the same batch), ``"record"``
    (a references-only call that fills ``bank``) or ``"read"`` (the target call of a separate
    pass; reference keys come from ``bank``).
    """
    mode: str
    labels: list
    n_target: int
    latent_hw: tuple
    sigma: float
    rows: dict = field(default_factory=dict)       # (reference, label) -> row among the references
    bank: dict | None = None                        # block key -> (k, v) of the reference rows
    subset: torch.Tensor | None = None              # DiT record call: the image tokens its rows carry
    dit_last: int | None = None                     # DiT: execution order of the last patched block (cached)
    capture: object = None                          # joint call: ``capture(key, K, V)`` takes the reference rows' k/v

    @property
    def chunk(self) -> int:
        return self.n_target // max(1, len(self.labels))

    def target_rows(self, label: int) -> list[int]:
        c = self.chunk
        return [i for j, lab in enumerate(self.labels) if lab == label for i in range(j * c, (j + 1) * c)]

    def reference_kv(self, key, k: torch.Tensor, v: torch.Tensor, reference, label: int):
        """Keys/values ``[N, C]`` of ``reference`` (run with ``label``) at block ``key``."""
        row = self.rows.get((reference, label))
        if row is None:
            return None
        if self.mode == "joint":
            return k[self.n_target + row], v[self.n_target + row]
        kv = (self.bank or {}).get(key)
        if kv is None:
            return None
        return kv[0][row], kv[1][row]


def row_runs(rows: list[int]) -> list[slice]:
    """Contiguous runs of sorted row indices as slices (views, no copies)."""
    runs: list[slice] = []
    for r in rows:
        if runs and runs[-1].stop == r:
            runs[-1] = slice(runs[-1].start, r + 1)
        else:
            runs.append(slice(r, r + 1))
    return runs


def apply_to_rows(q, k, v, extra_options, inner, subset_ok: bool, groups) -> torch.Tensor:
    """The output of an attention call in which some rows are computed by a technique.

    ``groups``: ``[(rows, fn), ...]``; ``fn(run)`` returns the output ``[len, N, C]`` of the rows
    of the slice ``run`` (contiguous runs of ``rows``). Every other row gets the plain attention
    ``inner``: on those rows only when ``subset_ok`` (views, no copies), otherwise on the whole
    batch (another technique or another pack's replace is wrapped and must see every row). The
    result is always a tensor the caller may modify in place.
    """
    special = set()
    for rows, _ in groups:
        special.update(rows)
    if subset_ok:
        plain = [i for i in range(q.shape[0]) if i not in special]
        if len(plain) == q.shape[0]:
            return inner(q, k, v, extra_options)
        out = torch.empty_like(q)
        for run in row_runs(plain):
            out[run] = inner(q[run], k[run], v[run], extra_options)
    else:
        out = inner(q, k, v, extra_options).clone()
    for rows, fn in groups:
        for run in row_runs(sorted(rows)):
            out[run] = fn(run)
    return out


# --------------------------------------------------------------------------- base attention

_comfy_attention = None


def default_attention(q, k, v, extra_options):
    """ComfyUI's configured attention (lazily imported), or SDPA without ComfyUI."""
    global _comfy_attention
    if _comfy_attention is None:
        try:
            from comfy.ldm.modules.attention import optimized_attention
            _comfy_attention = optimized_attention
        except ImportError:
            _comfy_attention = False
    if _comfy_attention is False:
        return sdpa_attention(q, k, v, extra_options["n_heads"])
    return _comfy_attention(q, k, v, extra_options["n_heads"], attn_precision=extra_options.get("attn_precision"),
                            transformer_options=extra_options)


def block_key(extra_options) -> tuple:
    block = extra_options.get("block")
    if block is None:
        return None
    return (block[0], block[1], extra_options.get("block_index", 0))


class PersonalizeAttention:
    """attn1 / attn2 replace shared by every technique of the pack on one block."""

    def __init__(self, kind: str = "attn1", inner=None):
        self.kind = kind
        self.inner = inner

    def base(self, q, k, v, extra_options):
        if self.inner is not None:
            return self.inner(q, k, v, extra_options)
        return default_attention(q, k, v, extra_options)

    def __call__(self, q, k, v, extra_options):
        state = extra_options.get(STATE_KEY)
        layout = extra_options.get(ROWS_KEY)
        key = block_key(extra_options)
        if state is None or key is None:
            return self.base(q, k, v, extra_options)
        techs = [t for t in state.techniques if key in t.keys(self.kind) and t.active_at(layout, extra_options)]
        if not techs:
            return self.base(q, k, v, extra_options)
        if layout is not None and layout.mode == "joint" and layout.capture is not None and self.kind == "attn1":
            layout.capture(key, k[layout.n_target:], v[layout.n_target:])     # for the reference cache
        if layout is not None and layout.mode == "record":
            # The references-only call of a separate pass: bank their self-attention keys/values.
            # Cross-attention is not banked (it would overwrite the attn1 entry of the same block).
            if self.kind == "attn1":
                layout.bank[key] = (k.detach(), v.detach())
            return self.base(q, k, v, extra_options)
        # The innermost technique may hand the base attention a subset of rows; anything wrapping
        # another technique or another pack's replace hands it the whole batch.
        fn, subset_ok = self.base, self.inner is None
        for tech in reversed(techs):
            method = tech.attn1 if self.kind == "attn1" else tech.attn2
            fn = functools.partial(method, inner=fn, layout=layout, key=key, subset_ok=subset_ok)
            subset_ok = False
        return fn(q, k, v, extra_options)
