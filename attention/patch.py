"""The machinery every attention technique of the pack registers into.

* ``PersonalizeState`` lives in ``transformer_options["personalize"]`` of a cloned MODEL and lists
  the techniques patched onto it (immutable: a node builds a new state and sets it on its clone).
* ``reference_pass`` is an ``apply_model`` wrapper. At each model call in which a technique is
  active it noises the references it needs to the current sigma (fresh noise from a seeded
  generator) and runs them **in the same UNet call as the target**, appended after the target rows
  (cond only unless a technique asks for uncond references). The rows' layout reaches the attention
  patches as ``transformer_options["personalize_rows"]``. When another pack has attention patches
  on the model (they may read the batch layout from ``cond_or_uncond``), the references run in a
  separate call before the target instead, recording their keys/values into a per-call bank.
* ``PersonalizeAttention`` is the one attn1/attn2 replace object per block. It folds the active
  techniques that claim the block around the base attention, which is ComfyUI's own
  ``optimized_attention`` or a replace another pack had put on the block (wrapped, not lost).

A technique (``mrsa.MultiReferenceAttention``, ``dmsa.DisentangleMixingAttention``) provides:
``keys(kind)`` (the attn1/attn2 block keys it patches), ``active(sigma)`` (whether it acts in a model
call at that sigma), ``active_at(layout, extra_options)`` (the same inside one attention call;
``layout`` is None in a call without reference rows), ``reference_requests(labels, sigma)`` (the
``RefRequest`` list for a call with these ``cond_or_uncond`` labels at that sigma),
``max_reference_rows()`` (the most reference rows it adds to one call) and
``attn1``/``attn2(q, k, v, extra_options, *, inner, layout, key, subset_ok)``.

Nothing here imports ComfyUI at module level.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch

from .kernels import sdpa_attention

STATE_KEY = "personalize"
ROWS_KEY = "personalize_rows"
BRANCH_KEY = "personalize_branches"        # FreeCure's personalised/foundation layout of one model call
LATENT_KEY = "personalize_latent_hw"       # the latent size of a DiT call (its blocks see only tokens)
WRAPPER_KEY = "personalize.reference_pass"
COND, UNCOND = 0, 1


# --------------------------------------------------------------------------- state and layout

@dataclass(frozen=True)
class PersonalizeState:
    techniques: tuple = ()
    base_memory_factor: float | None = None     # the model's own memory_usage_factor

    def with_technique(self, technique) -> "PersonalizeState":
        return PersonalizeState(self.techniques + (technique,), self.base_memory_factor)

    def reference_rows(self) -> int:
        """The most reference rows one model call may carry (a bound; shared rows count twice)."""
        return sum(t.max_reference_rows() for t in self.techniques)

    @property
    def dit(self):
        """The ``dit.DiTSpec`` of the model when its techniques patch DiT blocks, else None."""
        return next((t.dit for t in self.techniques if getattr(t, "dit", None) is not None), None)


class Technique:
    """Defaults of the technique protocol (module docstring): the blocks are ``attn1_keys`` /
    ``attn2_keys`` (empty when absent), the technique acts while the sigma lies in ``self.sigmas``,
    and it needs no reference rows."""

    def keys(self, kind: str) -> frozenset:
        return getattr(self, f"{kind}_keys", frozenset())

    def active(self, sigma: float) -> bool:
        return sigma in self.sigmas

    def reference_requests(self, labels: set, sigma: float | None = None) -> list:
        return []

    def max_reference_rows(self) -> int:
        return 0


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
            from comfy.ldm.modules.attention import optimized_attention  # noqa: PLC0415
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
            fn = functools.partial(getattr(tech, self.kind), inner=fn, layout=layout, key=key, subset_ok=subset_ok)
            subset_ok = False
        return fn(q, k, v, extra_options)


# --------------------------------------------------------------------------- reference pass

def _noise(shape, seed: int, index: int, label: int, sigma: float) -> torch.Tensor:
    """Fresh noise for one reference at one step, independent of call order and RNG state."""
    mix = (int(seed) * 1_000_003 + index * 7_919 + label * 104_729 + int(round(sigma * 1e6))) % (2 ** 63)
    g = torch.Generator(device="cpu").manual_seed(mix)
    return torch.randn(shape, generator=g)


def repeat_tokens(t: torch.Tensor, length: int) -> torch.Tensor:
    return t if t.shape[1] == length else t.repeat(1, length // t.shape[1], 1)


def _foreign_attention(transformer_options) -> bool:
    """True when another pack patches attention: it may split the batch by ``cond_or_uncond``."""
    patches = transformer_options.get("patches", {}) or {}
    if any(patches.get(n) for n in ("attn1_patch", "attn2_patch", "attn1_output_patch", "attn2_output_patch")):
        return True
    for kind, table in (transformer_options.get("patches_replace", {}) or {}).items():
        for fn in table.values():
            if not isinstance(fn, PersonalizeAttention) or fn.inner is not None:
                if kind == "dit" and getattr(fn, "personalize_block", False) and fn.inner is None:
                    continue
                return True
    return False


def _pad_control(control, n_target: int, n_extra: int):
    if control is None:
        return None
    out = {}
    for name, items in control.items():
        if not isinstance(items, list):
            out[name] = items
            continue
        new = []
        for t in items:
            if isinstance(t, torch.Tensor) and t.shape[0] in (1, n_target):
                t = t.expand(n_target, *t.shape[1:])
                t = torch.cat([t, t.new_zeros((n_extra, *t.shape[1:]))])
            new.append(t)
        out[name] = new
    return out


def _rows_of(value, n_target: int, src: list[int]):
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n_target:
        return value[src]
    return None


def _caption_rows(reqs, src, c_crossattn):
    """The text conditioning of every reference row ``[1, T_r, D]``: its caption for cond
    references that have one, else the target row's conditioning it borrows."""
    rows = []
    for r, s_row in zip(reqs, src):
        cap = r.reference.caption if r.label == COND else None
        if cap is not None:
            if cap.shape[-1] != c_crossattn.shape[-1]:
                raise ValueError(f"reference '{r.reference.name}': caption conditioning has width "
                                 f"{cap.shape[-1]} but the model's text conditioning has "
                                 f"{c_crossattn.shape[-1]}; encode the caption with the same CLIP as the prompt")
            rows.append(cap[:1].to(c_crossattn.device, c_crossattn.dtype))
        else:
            rows.append(c_crossattn[s_row:s_row + 1])
    return rows


def _pooled_rows(y, reqs):
    """``y`` of the reference rows with each cond reference's own pooled caption where it is the
    whole vector (FLUX: the CLIP-L pooled output; an SDXL ``y`` also holds size embeddings, so
    there the borrowed row stays)."""
    if not isinstance(y, torch.Tensor) or y.dim() != 2:
        return y
    out = None
    for i, r in enumerate(reqs):
        pooled = getattr(r.reference, "caption_pooled", None) if r.label == COND else None
        if pooled is not None and pooled.shape[-1] == y.shape[-1]:
            out = y.clone() if out is None else out
            out[i] = pooled.reshape(-1, y.shape[-1])[0].to(y.device, y.dtype)
    return y if out is None else out


def reference_pass(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
    """``WrappersMP.APPLY_MODEL`` wrapper: see the module docstring."""
    state = transformer_options.get(STATE_KEY)
    labels = list(transformer_options.get("cond_or_uncond") or [])
    dit = state.dit if state is not None else None
    if dit is not None:
        transformer_options = dict(transformer_options)
        transformer_options[LATENT_KEY] = tuple(int(d) for d in x.shape[-2:])
    if state is None or not state.techniques or not labels or x.shape[0] % len(labels):
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    sigma = float(t.reshape(-1)[0])
    requests: dict = {}
    for tech in state.techniques:
        if tech.active(sigma):
            for req in tech.reference_requests(set(labels), sigma):
                requests.setdefault((req.reference, req.label), req)
    if not requests:
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    model = executor.class_obj
    n_target = x.shape[0]
    chunk = n_target // len(labels)
    H, W = x.shape[-2:]
    reqs = list(requests.values())
    src = [labels.index(r.label) * chunk for r in reqs]      # target row whose conditioning a reference borrows

    lat = []
    s = t.reshape(-1)[:1].to(x.device, torch.float32)
    for r in reqs:
        z0, _ = r.reference.fitted(H, W)
        z0 = model.process_latent_in(z0.to(x.device, torch.float32))
        eps = _noise(z0.shape, r.seed, r.index, r.label, sigma).to(x.device)
        lat.append(model.model_sampling.noise_scaling(s, eps, z0))
    x_ref = torch.cat(lat).to(x.dtype)
    t_ref = t.reshape(-1)[:1].expand(len(reqs)).to(t.dtype)

    # In a UNet the text only enters cross-attention, where repeating every token of a conditioning
    # changes nothing, so conditionings of different lengths share a call at their common multiple.
    # In a DiT the text tokens are keys of the joint attention: lengths must match exactly, else
    # the references run in calls of their own length.
    ctx_rows = _caption_rows(reqs, src, c_crossattn) if c_crossattn is not None else None
    ctx_ref = ctx_target = None
    groups = [list(range(len(reqs)))]
    if ctx_rows is not None:
        if dit is None:
            length = math.lcm(c_crossattn.shape[1], *[r.shape[1] for r in ctx_rows])
            ctx_ref = torch.cat([repeat_tokens(r, length) for r in ctx_rows])
            ctx_target = repeat_tokens(c_crossattn, length)     # repeating all tokens leaves cross-attention unchanged
        else:
            ctx_target = c_crossattn
            lengths = sorted({r.shape[1] for r in ctx_rows})
            groups = [[i for i, r in enumerate(ctx_rows) if r.shape[1] == n] for n in lengths]
            if lengths == [c_crossattn.shape[1]]:
                ctx_ref = torch.cat(ctx_rows)
    subject = [i for i, r in enumerate(reqs) if r.subject] if dit is not None and dit.rope is not None else []
    if subject:         # each subject-only reference runs alone, on its own tokens
        groups = [g for g in ([i for i in g if i not in subject] for g in groups) if g] + [[i] for i in subject]
    concat_ref = _rows_of(c_concat, n_target, src)
    kw_ref = {}
    for name, value in kwargs.items():
        rows = _rows_of(value, n_target, src)
        kw_ref[name] = rows if rows is not None else value
    if dit is not None and "y" in kw_ref:
        kw_ref["y"] = _pooled_rows(kw_ref["y"], reqs)

    if not subject and not _foreign_attention(transformer_options) and (c_crossattn is None or ctx_ref is not None):
        rows = {(r.reference, r.label): i for i, r in enumerate(reqs)}
        layout = RowLayout("joint", labels, n_target, (H, W), sigma, rows)
        opts = dict(transformer_options)
        opts[ROWS_KEY] = layout
        if isinstance(opts.get("sigmas"), torch.Tensor):
            opts["sigmas"] = torch.cat([t, t_ref.to(t.device)])
        kw_all = {}
        for name, value in kwargs.items():
            extra = kw_ref[name]
            kw_all[name] = torch.cat([value, extra.to(value.device, value.dtype)]) if extra is not value else value
        out = executor(torch.cat([x, x_ref]), torch.cat([t, t_ref.to(t.device)]),
                       None if c_concat is None else torch.cat([c_concat, concat_ref]),
                       None if c_crossattn is None else torch.cat([ctx_target, ctx_ref.to(c_crossattn.dtype)]),
                       _pad_control(control, n_target, len(reqs)), opts, **kw_all)
        return out[:n_target]

    # Separate pass: the references alone (record their keys/values), then the target. References
    # whose text differs in length (DiT only) are recorded in one call per length, subject-only
    # references (FLUX) one by one.
    order = [i for g in groups for i in g]
    rows = {(reqs[i].reference, reqs[i].label): j for j, i in enumerate(order)}
    parts: dict = {}
    for g in groups:
        sub = lambda value: value[g] if isinstance(value, torch.Tensor) and value.dim() > 0 \
            and value.shape[0] == len(reqs) else value  # noqa: E731
        bank_g: dict = {}
        rec = dict(transformer_options)
        rec["cond_or_uncond"] = [reqs[i].label for i in g]
        rows_g = {(reqs[i].reference, reqs[i].label): j for j, i in enumerate(g)}
        rec[ROWS_KEY] = RowLayout("record", rec["cond_or_uncond"], len(g), (H, W), sigma, rows_g, bank_g)
        if g[0] in subject:
            from .dit import select_tokens, subject_tokens  # noqa: PLC0415
            rec[ROWS_KEY].subset = subject_tokens(reqs[g[0]].reference, (H, W), dit).to(x.device)
            patches = dict(rec.get("patches") or {})
            patches["post_input"] = list(patches.get("post_input") or []) + [select_tokens(rec[ROWS_KEY].subset)]
            rec["patches"] = patches
        if isinstance(rec.get("sigmas"), torch.Tensor):
            rec["sigmas"] = t_ref[g].to(t.device)
        if ctx_rows is None:
            ctx_g = None
        elif dit is None:
            ctx_g = sub(ctx_ref)
        else:
            ctx_g = torch.cat([ctx_rows[i] for i in g])
        try:
            executor(x_ref[g], t_ref[g].to(t.device), sub(concat_ref), ctx_g, None, rec,
                     **{name: sub(value) for name, value in kw_ref.items()})
        except RecordDone:
            pass
        for key, kv in bank_g.items():
            parts.setdefault(key, []).append(kv)
    bank = {key: kvs[0] if len(kvs) == 1 else (torch.cat([kv[0] for kv in kvs]), torch.cat([kv[1] for kv in kvs]))
            for key, kvs in parts.items() if len(kvs) == len(groups)}
    opts = dict(transformer_options)
    opts[ROWS_KEY] = RowLayout("read", labels, n_target, (H, W), sigma, rows, bank)
    return executor(x, t, c_concat, c_crossattn, control, opts, **kwargs)


# --------------------------------------------------------------------------- installing

def find_replace(model_options, kind: str, key: tuple):
    table = model_options.get("transformer_options", {}).get("patches_replace", {}).get(kind, {})
    return table.get(key, table.get(key[:2]))


def install_technique(model, technique):
    """Clone ``model`` and register ``technique``: state, the reference-pass wrapper (once) and
    the shared replace object on each of its blocks. The input MODEL is not touched."""
    from comfy.patcher_extension import WrappersMP  # noqa: PLC0415

    m = model.clone()
    opts = dict(m.model_options.get("transformer_options", {}))
    state = opts.get(STATE_KEY) or PersonalizeState(base_memory_factor=m.get_model_object("memory_usage_factor"))
    state = state.with_technique(technique)
    owners = [t for t in state.techniques if getattr(t, "exclusive", False)]
    if owners and any(t is not owners[0] and (getattr(t, "exclusive", False) or t.max_reference_rows())
                      for t in state.techniques):
        others = ", ".join(sorted({t.name for t in state.techniques if t is not owners[0]}))
        raise ValueError(f"model: {owners[0].name} runs a second branch in the batch and cannot be combined with "
                         f"{others} on the same MODEL; apply it to a model without them")
    opts[STATE_KEY] = state
    m.model_options["transformer_options"] = opts
    # ComfyUI sizes its batches and frees memory from memory_usage_factor x batch; the reference rows
    # ride in the same call, so raise the factor by the worst case (batch 1 with CFG: 2 rows + refs).
    if state.base_memory_factor is not None:
        m.add_object_patch("memory_usage_factor", state.base_memory_factor * (1 + state.reference_rows() / 2))
    if not m.get_wrappers(WrappersMP.APPLY_MODEL, WRAPPER_KEY):
        m.add_wrapper_with_key(WrappersMP.APPLY_MODEL, WRAPPER_KEY, reference_pass)
    spec = getattr(technique, "dit", None)
    if spec is not None:
        from .dit import install_dit_blocks  # noqa: PLC0415
        install_dit_blocks(m, spec)
        return m
    for kind in ("attn1", "attn2"):
        for key in technique.keys(kind):
            existing = find_replace(m.model_options, kind, key)
            if isinstance(existing, PersonalizeAttention):
                continue
            m.set_model_patch_replace(PersonalizeAttention(kind, existing), kind, key[0], key[1], key[2])
    return m
