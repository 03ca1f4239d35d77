"""The reference pass: an ``apply_model`` wrapper (``WrappersMP.APPLY_MODEL``) that runs the
references a technique asks for alongside the target.

At each model call in which a technique is active it noises the references it needs to the current
sigma (fresh noise from a seeded generator) and runs them **in the same model call as the target**,
appended after the target rows (cond only unless a technique asks for uncond references): the
*joint* path. The rows' layout reaches the attention patches as
``transformer_options["personalize_rows"]`` (``patch.RowLayout``). When another pack has attention
patches on the model (they may read the batch layout from ``cond_or_uncond``), when a DiT's
reference captions differ in length from the prompt, or when FLUX references run on their subject's
tokens only, the references run in *separate* calls before the target instead, recording their
keys/values into a per-call bank that the target call reads.

With a reuse policy on the state (the Reference Reuse node, ``ref_cache.py``) each call first asks
the reference store for its rows' keys/values: when every row is there the target runs alone, reading
them (``read`` mode); otherwise the rows run as above and their keys/values are captured into the
store. In once-per-run mode the rows are noised to the policy's fixed level instead of the call's.

Where the model takes reference images of its own (``ref_latents``: FLUX.1 Kontext, FLUX.2,
Qwen-Image-Edit), every reference row carries those of the target row it borrows its conditioning
from, and the wrapper publishes their token grids for native reference control (``REF_GRIDS_KEY``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .dit import select_tokens, subject_tokens
from .dit_blocks import PersonalizeBlock
from .native_refs import REF_GRIDS_KEY
from .patch import COND, LATENT_KEY, ROWS_KEY, SIGMA_KEY, STATE_KEY, PersonalizeAttention, RecordDone, RowLayout
from .ref_cache import call_plan, warn_uncacheable
from .ref_keys import KEEP_ALL, KEEP_MASK, Uncacheable, row_input_digests


# --------------------------------------------------------------------------- helpers

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
    for table in (transformer_options.get("patches_replace", {}) or {}).values():
        for fn in table.values():
            if isinstance(fn, (PersonalizeAttention, PersonalizeBlock)) and fn.inner is None:
                continue        # the pack's own replace, wrapping nothing
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


def row_subset(value, n_target: int, src: list[int]):
    """Rows ``src`` of a per-row model input: a tensor with ``n_target`` rows, or a list of them (the
    model's own reference latents, ``ref_latents``); None for anything else (shared by every row)."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n_target:
        return value[src]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) and v.dim() > 0
                                                          and v.shape[0] == n_target for v in value):
        return [v[src] for v in value]
    return None


def _cat_rows(value, extra):
    """``value``'s rows followed by ``extra``'s (a tensor, or a list of tensors element by element)."""
    if extra is value:
        return value
    if isinstance(value, (list, tuple)):
        return [torch.cat([v, e.to(v.device, v.dtype)]) for v, e in zip(value, extra)]
    return torch.cat([value, extra.to(value.device, value.dtype)])


def _caption_rows(reqs, src, c_crossattn, min_tokens: int = 0):
    """The text conditioning of every reference row ``[1, T_r, D]``: its caption for cond
    references that have one, else the target row's conditioning it borrows. A caption shorter than
    ``min_tokens`` is padded at the front with zeros, as the model pads its prompts (FLUX.2)."""
    rows = []
    for r, s_row in zip(reqs, src):
        cap = r.reference.caption if r.label == COND else None
        if cap is not None:
            if cap.shape[-1] != c_crossattn.shape[-1]:
                raise ValueError(f"reference '{r.reference.name}': caption conditioning has width "
                                 f"{cap.shape[-1]} but the model's text conditioning has "
                                 f"{c_crossattn.shape[-1]}; encode the caption with the same CLIP as the prompt")
            cap = cap[:1].to(c_crossattn.device, c_crossattn.dtype)
            if cap.shape[1] < min_tokens:
                cap = torch.nn.functional.pad(cap, (0, 0, min_tokens - cap.shape[1], 0))
            rows.append(cap)
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



# --------------------------------------------------------------------------- the pass

@dataclass
class _References:
    """The reference rows of one model call and their inputs: ``reqs`` (``RefRequest`` per row),
    ``x``/``t`` (noised latents and timesteps), ``ctx_rows`` (each row's text conditioning),
    ``ctx`` (the rows' conditioning in one tensor, when one call can carry it) with ``ctx_target``
    (the target's, repeated to the same length), ``concat``/``kwargs`` (the other model inputs of
    the rows), ``groups`` (the rows of each separate call) and ``subject`` (subject-only rows)."""
    reqs: list
    x: torch.Tensor | None          # filled by ``_noised_latents`` when the rows must run
    t: torch.Tensor | None
    ctx_rows: list | None
    ctx: torch.Tensor | None
    ctx_target: torch.Tensor | None
    concat: torch.Tensor | None
    kwargs: dict
    groups: list
    subject: list
    src: list
    per_row: set


def _requests(state, labels: list, sigma: float) -> list:
    """One ``RefRequest`` per (reference, label) the active techniques ask for, in order."""
    requests: dict = {}
    for tech in state.techniques:
        if tech.active(sigma):
            for req in tech.reference_requests(set(labels), sigma):
                requests.setdefault((req.reference, req.label), req)
    return list(requests.values())


def _noised_latents(model, reqs, x, t, sigma: float):
    """The references' latents fitted to the target, noised to ``sigma`` (this call's, or the
    fixed level of once-per-run references), and their timesteps."""
    H, W = x.shape[-2:]
    lat = []
    s = torch.full((1,), float(sigma), device=x.device, dtype=torch.float32)
    for r in reqs:
        z0, _ = r.reference.fitted(H, W)
        z0 = model.process_latent_in(z0.to(x.device, torch.float32))
        eps = _noise(z0.shape, r.seed, r.index, r.label, sigma).to(x.device)
        lat.append(model.model_sampling.noise_scaling(s, eps, z0))
    return torch.cat(lat).to(x.dtype), torch.full((len(reqs),), float(sigma), device=t.device, dtype=t.dtype)


def _references(reqs, labels, x, c_concat, c_crossattn, kwargs, dit) -> _References:
    n_target = x.shape[0]
    chunk = n_target // len(labels)
    src = [labels.index(r.label) * chunk for r in reqs]      # target row whose conditioning a reference borrows

    # In a UNet the text only enters cross-attention, where repeating every token of a conditioning
    # changes nothing, so conditionings of different lengths share a call at their common multiple.
    # In a DiT the text tokens are keys of the joint attention: lengths must match exactly, else
    # the references run in calls of their own length.
    pad = dit.min_text_tokens if dit is not None else 0
    ctx_rows = _caption_rows(reqs, src, c_crossattn, pad) if c_crossattn is not None else None
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
    subject = [i for i, r in enumerate(reqs) if r.subject] if dit is not None and dit.token_subsets else []
    if subject:         # each subject-only reference runs alone, on its own tokens
        groups = [g for g in ([i for i in g if i not in subject] for g in groups) if g] + [[i] for i in subject]
    kw_ref, per_row = {}, set()
    for name, value in kwargs.items():
        rows = row_subset(value, n_target, src)
        kw_ref[name] = rows if rows is not None else value
        if rows is not None:
            per_row.add(name)
    if dit is not None and "y" in kw_ref:
        kw_ref["y"] = _pooled_rows(kw_ref["y"], reqs)
    return _References(reqs, None, None, ctx_rows, ctx_ref, ctx_target, row_subset(c_concat, n_target, src),
                       kw_ref, groups, subject, src, per_row)


def reference_pass(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
    """``WrappersMP.APPLY_MODEL`` wrapper: see the module docstring."""
    state = transformer_options.get(STATE_KEY)
    labels = list(transformer_options.get("cond_or_uncond") or [])
    dit = state.dit if state is not None else None
    sigma = float(t.reshape(-1)[0])
    if dit is not None:
        transformer_options = dict(transformer_options)
        transformer_options[LATENT_KEY] = tuple(int(d) for d in x.shape[-2:])
        transformer_options[SIGMA_KEY] = sigma
        refs = kwargs.get("ref_latents")
        if refs:
            transformer_options[REF_GRIDS_KEY] = [dit.grid(tuple(int(d) for d in r.shape[-2:])) for r in refs]
    if state is None or not state.techniques or not labels or x.shape[0] % len(labels):
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    for tech in state.techniques:
        tech.check_call(labels, c_crossattn, sigma)
    reqs = _requests(state, labels, sigma)
    if not reqs:
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    policy = state.policy
    row_sigma = policy.row_sigma(sigma) if policy is not None else sigma
    refs = _references(reqs, labels, x, c_concat, c_crossattn, kwargs, dit)
    plan = _plan(policy, state, executor.class_obj, refs, sigma, row_sigma, x, c_crossattn, transformer_options)
    if plan is not None:
        bank = plan.lookup(x.device)
        if bank is not None:         # every reference row is known: the target call alone reads them
            opts = dict(transformer_options)
            rows = {(r.reference, r.label): i for i, r in enumerate(reqs)}
            opts[ROWS_KEY] = RowLayout("read", labels, x.shape[0], tuple(x.shape[-2:]), sigma, rows, bank)
            return executor(x, t, c_concat, c_crossattn, control, opts, **kwargs)
    refs.x, refs.t = _noised_latents(executor.class_obj, reqs, x, t, row_sigma)
    if (not refs.subject and not _foreign_attention(transformer_options)
            and (c_crossattn is None or refs.ctx is not None)):
        out = _joint_call(executor, refs, labels, sigma, x, t, c_concat, c_crossattn, control,
                          transformer_options, kwargs, plan)
    else:
        out = _separate_calls(executor, refs, labels, sigma, dit, x, t, c_concat, c_crossattn, control,
                              transformer_options, kwargs, plan)
    if plan is not None:
        plan.commit()
    return out


def _plan(policy, state, model, refs: _References, sigma, row_sigma, x, c_crossattn, transformer_options):
    """The reference cache's plan for this call's rows (``ref_cache.call_plan``), or None."""
    if policy is None:
        return None
    kinds = ("attn1", "attn2") if state.dit is not None else ("attn1",)
    layers = {k for tech in state.techniques if tech.active(sigma) for kind in kinds for k in tech.keys(kind)}
    keeps = [KEEP_ALL if any(t.cache_keep(r.reference, r.label) == KEEP_ALL for t in state.techniques) else KEEP_MASK
             for r in refs.reqs]
    try:
        own = [r.label == COND and r.reference.caption is not None for r in refs.reqs]
        inputs = row_input_digests(refs.reqs, refs.src, own, c_crossattn, refs.concat, refs.kwargs, refs.per_row)
    except Uncacheable as e:
        warn_uncacheable(e)
        return None
    return call_plan(policy, model, transformer_options, refs.reqs, inputs, keeps, layers, row_sigma,
                     tuple(x.shape[-2:]), x.dtype, x.device, (PersonalizeAttention, PersonalizeBlock))


def _joint_call(executor, refs: _References, labels, sigma, x, t, c_concat, c_crossattn, control,
                transformer_options, kwargs, plan=None):
    """The references as rows ``n_target..`` of the target's own call; returns the target rows."""
    n_target = x.shape[0]
    rows = {(r.reference, r.label): i for i, r in enumerate(refs.reqs)}
    opts = dict(transformer_options)
    opts[ROWS_KEY] = RowLayout("joint", labels, n_target, tuple(x.shape[-2:]), sigma, rows)
    if plan is not None:
        opts[ROWS_KEY].capture = plan.capture
    t_all = torch.cat([t, refs.t.to(t.device)])
    if isinstance(opts.get("sigmas"), torch.Tensor):
        opts["sigmas"] = t_all
    kw_all = {name: _cat_rows(value, refs.kwargs[name]) for name, value in kwargs.items()}
    out = executor(torch.cat([x, refs.x]), t_all,
                   None if c_concat is None else torch.cat([c_concat, refs.concat]),
                   None if c_crossattn is None else torch.cat([refs.ctx_target, refs.ctx.to(c_crossattn.dtype)]),
                   _pad_control(control, n_target, len(refs.reqs)), opts, **kw_all)
    return out[:n_target]


def _separate_calls(executor, refs: _References, labels, sigma, dit, x, t, c_concat, c_crossattn, control,
                    transformer_options, kwargs, plan=None):
    """The references alone (recording their keys/values), then the target reading them. References
    whose text differs in length (DiT only) are recorded in one call per length, subject-only
    references (FLUX) one by one."""
    reqs, hw = refs.reqs, tuple(x.shape[-2:])
    order = [i for g in refs.groups for i in g]
    rows = {(reqs[i].reference, reqs[i].label): j for j, i in enumerate(order)}
    parts: dict = {}
    for g in refs.groups:
        def sub(value, g=g):
            rows = row_subset(value, len(reqs), g)
            return value if rows is None else rows
        bank_g: dict = {}
        rec = dict(transformer_options)
        rec["cond_or_uncond"] = [reqs[i].label for i in g]
        rows_g = {(reqs[i].reference, reqs[i].label): j for j, i in enumerate(g)}
        rec[ROWS_KEY] = RowLayout("record", rec["cond_or_uncond"], len(g), hw, sigma, rows_g, bank_g)
        if g[0] in refs.subject:
            rec[ROWS_KEY].subset = subject_tokens(reqs[g[0]].reference, hw, dit).to(x.device)
            patches = dict(rec.get("patches") or {})
            patches["post_input"] = list(patches.get("post_input") or []) + [select_tokens(rec[ROWS_KEY].subset)]
            rec["patches"] = patches
        if isinstance(rec.get("sigmas"), torch.Tensor):
            rec["sigmas"] = refs.t[g].to(t.device)
        if refs.ctx_rows is None:
            ctx_g = None
        elif dit is None:
            ctx_g = sub(refs.ctx)
        else:
            ctx_g = torch.cat([refs.ctx_rows[i] for i in g])
        try:
            executor(refs.x[g], refs.t[g].to(t.device), sub(refs.concat), ctx_g, None, rec,
                     **{name: sub(value) for name, value in refs.kwargs.items()})
        except RecordDone:
            pass
        for key, kv in bank_g.items():
            parts.setdefault(key, []).append(kv)
            if plan is not None:
                plan.capture(key, kv[0], kv[1], g)
    bank = {key: kvs[0] if len(kvs) == 1 else (torch.cat([kv[0] for kv in kvs]), torch.cat([kv[1] for kv in kvs]))
            for key, kvs in parts.items() if len(kvs) == len(refs.groups)}
    opts = dict(transformer_options)
    opts[ROWS_KEY] = RowLayout("read", labels, x.shape[0], hw, sigma, rows, bank)
    return executor(x, t, c_concat, c_crossattn, control, opts, **kwargs)
