"""Per-reference masks, weights and target regions on a model's own reference tokens (FLUX.1
Kontext, FLUX.2 and Qwen-Image-Edit; docs/native-references.md §2). Pure torch: ComfyUI's attention
function arrives as an argument.

These models append the tokens of every reference latent after the target's image tokens and
attend jointly over ``[text ; target image ; reference 1 ; ... ; reference R]``; ComfyUI publishes
the token count of each reference as ``transformer_options["reference_image_num_tokens"]``. So in
each joint attention the keys of reference ``r`` are a known range, and a control per reference is
a change of the logits of those keys, with no extra model pass:

* **subject mask** ``m_r`` (on the reference image, fitted to its token grid as the fraction of
  each token the subject covers): a key outside (``m = 0``) is not attended;
* **weight** ``w_r``: the logit bias ``log(w_r * m_r)`` on its kept keys, i.e. the attention each
  query pays a reference token is multiplied by ``w_r * m_r`` before the softmax normalises.
  Weight 1 with a full mask is the native model exactly; weight 0 removes the reference; weight 2
  doubles its unnormalised share. (FreeCustom's bias is ``w * m`` itself, docs/algorithms.md §0.3,
  which would move the native model at weight 1: here the references are the model's own input, so
  "1 = as trained" is the natural origin);
* **target region** ``R_r`` (on the output image, fitted to the target's token grid, a token is in
  when at least half covered): only the target image tokens inside it attend to reference ``r``,
  MIP-Adapter's per-object routing applied to native references.

The controls act on the queries of the text and of the target image; the reference tokens' own
queries keep the native attention (they only carry the reference forward). A reference is never
changed for one CFG half only: every row that carries references gets the same controls.

The computation needs no ``L x L`` bias: the queries fall into a few groups by which references
they see (the text and every image token outside all regions see every reference; the tokens of a
region see its reference...), and each group is one attention call over the *kept* keys only with a
per-key bias vector (``[1, 1, 1, keys]``), through ComfyUI's attention function. Neutral controls
call ComfyUI's attention once, untouched.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..references.masks import layer_mask
from .dit_blocks import ChainedOverride
from .patch import LATENT_KEY, SIGMA_KEY, Technique

REF_GRIDS_KEY = "personalize_reference_grids"   # [(h, w) tokens] of each reference latent of the call


@dataclass(frozen=True)
class ReferenceControl:
    """The control of one native reference, in the order the references were added. ``mask``
    ``[H, W]`` on the reference image (None: the whole reference); ``region`` ``[H, W]`` on the
    output image (None: every image token may attend to it)."""
    mask: torch.Tensor | None = None
    weight: float = 1.0
    region: torch.Tensor | None = None

    @property
    def neutral(self) -> bool:
        return self.weight == 1.0 and self.region is None and (self.mask is None or bool((self.mask >= 1).all()))


def _fit(plane: torch.Tensor, grid: tuple, what: str) -> None:
    H, W = plane.shape[-2:]
    gh, gw = grid
    if abs(math.log((H / W) / (gh / gw))) > math.log(1.15):
        raise ValueError(f"{what} is {W}x{H} pixels (aspect {W / H:.2f}), but the image it belongs to has a "
                         f"{gw}x{gh} token grid (aspect {gw / gh:.2f}); give a mask of the same image, at any size")


@dataclass(frozen=True)
class Group:
    """Queries ``queries`` attend over the keys ``keys`` (None: every key) with the per-key logit
    bias ``bias`` (None: none). Indices are slices where contiguous, else index tensors."""
    queries: object
    keys: torch.Tensor | None
    bias: torch.Tensor | None


@dataclass(frozen=True)
class CallPlan:
    """The query groups of one attention layout (``plan``); ``n_front`` = text + target tokens."""
    groups: tuple
    n_front: int
    n_keys: int


def _as_queries(idx: torch.Tensor):
    """Sorted token indices as a slice (a view, no copy) when contiguous."""
    if idx.numel() and int(idx[-1]) - int(idx[0]) + 1 == idx.numel():
        return slice(int(idx[0]), int(idx[-1]) + 1)
    return idx


def plan(controls, txt_len: int, grid: tuple, ref_grids, ref_counts, device) -> CallPlan | None:
    """The query groups of a joint attention over ``[text (txt_len) ; target (grid) ; references]``
    with these ``controls``; None when every control is neutral (the native attention)."""
    controls = tuple(controls)
    if len(ref_counts) != len(controls):
        raise ValueError(f"native references: the model received {len(ref_counts)} reference image(s) but "
                         f"{len(controls)} reference control(s) were given; give one control per reference, in the "
                         f"order the references were added")
    if all(c.neutral for c in controls):
        return None
    gh, gw = grid
    n_img = gh * gw
    front = txt_len + n_img
    n_keys = front + int(sum(ref_counts))
    kept, biases, regions = [], [], []
    start = front
    for r, (c, count) in enumerate(zip(controls, ref_counts)):
        rg = tuple(ref_grids[r]) if ref_grids is not None and r < len(ref_grids) else None
        if rg is None or rg[0] * rg[1] != count:
            raise ValueError(f"native references: reference {r + 1} has {count} tokens, which matches no reference "
                             f"latent grid {rg}; the model's reference layout is not one this node knows")
        cover = torch.ones(count)
        if c.mask is not None:
            _fit(c.mask, rg, f"subject_mask of reference {r + 1}")
            cover = layer_mask(c.mask, rg[0], rg[1], soft=True).clamp(0, 1)
        scale = cover * float(c.weight)
        idx = torch.nonzero(scale > 0, as_tuple=False).flatten()
        kept.append(idx + start)
        biases.append(torch.log(scale[idx]))
        if c.region is not None:
            _fit(c.region, grid, f"target_region of reference {r + 1}")
            regions.append(layer_mask(c.region, gh, gw, soft=False) > 0)
        else:
            regions.append(None)
        start += count
    # which references each target image token sees, as one integer code per token
    code = torch.zeros(n_img, dtype=torch.long)
    for r, reg in enumerate(regions):
        code += (reg if reg is not None else torch.ones(n_img, dtype=torch.bool)).long() << r
    full = (1 << len(controls)) - 1
    groups = []
    for sig in sorted(set(code.tolist()) | {full}, reverse=True):
        img = torch.nonzero(code == sig, as_tuple=False).flatten() + txt_len
        queries = torch.cat([torch.arange(txt_len), img]) if sig == full else img
        if queries.numel() == 0:
            continue
        seen = [r for r in range(len(controls)) if sig >> r & 1]
        keys = torch.cat([torch.arange(front)] + [kept[r] for r in seen])
        bias = torch.cat([torch.zeros(front)] + [biases[r] for r in seen])
        groups.append(Group(_as_queries(queries.to(device)),
                            None if keys.numel() == n_keys else _as_queries(keys.to(device)),
                            None if not bool(bias.any()) else bias.to(device)))
    return CallPlan(tuple(groups), front, n_keys)


def _additive(mask: torch.Tensor, dtype) -> torch.Tensor:
    """An attention mask as ComfyUI's attention reads it, made additive ``[B', h', Lq', Lk]``."""
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask.ndim == 3:
        mask = mask.unsqueeze(1)
    return mask.to(dtype)


def controlled_attention(attend, q, k, v, call_plan: CallPlan, mask=None) -> torch.Tensor:
    """Joint attention of ``q`` ``[B, h, Lq, d]`` over ``k, v`` ``[B, h, Lk, d]`` under a
    ``plan``: its groups for the text and target queries, the native attention for the reference
    queries (``Lq > n_front``; with core's reference K/V cache ``Lq == n_front``). ``attend(q, k,
    v, mask)`` is the attention function on ``[B, h, L, d]`` tensors returning ``[B, L, h*d]``;
    ``mask`` is the call's own attention mask (kept). Returns ``[B, Lq, h*d]``."""
    B, h, Lq, d = q.shape
    Lk = k.shape[2]
    if Lk != call_plan.n_keys or Lq not in (call_plan.n_front, Lk):
        raise ValueError(f"native references: this attention has {Lq} queries and {Lk} keys, but the text, image "
                         f"and reference tokens add up to {call_plan.n_keys}; another patch changes the token layout")
    extra = None if mask is None else _additive(mask, q.dtype)
    out = q.new_empty((B, Lq, h * d))

    def sub_mask(queries, group):
        m = extra
        if m is not None:
            if m.shape[2] > 1:
                m = m[:, :, queries]
            if group is not None and group.keys is not None:
                m = m[..., group.keys]
        if group is not None and group.bias is not None:
            b = group.bias.to(q.dtype).view(1, 1, 1, -1)
            m = b if m is None else m + b
        return m

    for g in call_plan.groups:
        kk, vv = (t if g.keys is None else t[:, :, g.keys] for t in (k, v))
        out[:, g.queries] = attend(q[:, :, g.queries], kk, vv, sub_mask(g.queries, g))
    if Lq > call_plan.n_front:
        rest = slice(call_plan.n_front, Lq)
        out[:, rest] = attend(q[:, :, rest], k, v, sub_mask(rest, None))
    return out


# --------------------------------------------------------------------------- the hook objects

class NativeReferenceAttention(ChainedOverride):
    """``optimized_attention_override`` for one call of one block (``dit_blocks.PersonalizeBlock``
    builds it with the block's text length): the controls of ``technique`` on that attention,
    through ``previous`` (the override that was there, e.g. core's attention backend) or ComfyUI's
    attention function."""

    def __init__(self, technique, txt_len: int, previous=None):
        self.technique = technique
        self.txt_len = txt_len
        self.previous = previous

    def __call__(self, func, *args, **kwargs):
        opts = kwargs.get("transformer_options") or {}
        counts = list(opts.get("reference_image_num_tokens") or [])
        if not counts:
            if 0 in (opts.get("cond_or_uncond") or []):
                raise ValueError("native references: the positive conditioning reaches the model without reference "
                                 "images; add them with ReferenceLatent (FLUX.1 Kontext, FLUX.2) or "
                                 "TextEncodeQwenImageEditPlus (Qwen-Image-Edit) before the sampler")
            return self.plain(func, *args, **kwargs)
        tech = self.technique
        hw = opts.get(LATENT_KEY)
        if hw is None:
            raise ValueError("internal: a controlled block ran without the latent size (the pack's model wrapper is "
                             "missing from the model)")
        q, k, v = args[:3]
        call_plan = tech.plan_for(self.txt_len, tech.dit.grid(hw), opts.get(REF_GRIDS_KEY), counts, q.device)
        if call_plan is None:
            return self.plain(func, *args, **kwargs)
        heads = args[3] if len(args) > 3 else kwargs.get("heads")
        mask = args[4] if len(args) > 4 else kwargs.get("mask")
        kw = {n: val for n, val in kwargs.items() if n not in ("heads", "mask")}
        rest = args[5:]
        qh, kh, vh = self.heads_first(q, k, v, heads, bool(kw.get("skip_reshape", False)))

        def attend(qq, kk, vv, m):
            o = dict(kw, skip_reshape=True, skip_output_reshape=False, mask=m)
            return self.plain(func, qq, kk, vv, heads, *rest, **o)

        out = controlled_attention(attend, qh, kh, vh, call_plan, mask)
        if kw.get("skip_output_reshape", False):
            return out.view(out.shape[0], out.shape[1], heads, -1).transpose(1, 2)
        return out


class NativeReferenceControl(Technique):
    """The technique that puts ``controls`` on the native references
    of a DiT (``spec``) in the blocks ``keys`` while the sigma is in ``sigmas``. It adds no rows;
    ``PersonalizeBlock`` asks it for the override of each of its blocks (``override``)."""

    name = "Native Reference Control"
    overrides = True

    def __init__(self, controls, spec, keys, sigmas):
        self.controls = tuple(controls)
        self.dit = spec
        self.attn1_keys = frozenset(keys)
        self.sigmas = sigmas
        self._plans: dict = {}

    def active_at(self, layout, extra_options) -> bool:
        sigma = extra_options.get(SIGMA_KEY)          # read once per model call by the reference pass
        if sigma is None:
            sigmas = extra_options.get("sigmas")
            if sigmas is None:
                return True
            sigma = float(torch.as_tensor(sigmas).reshape(-1)[0])
        return self.active(sigma)

    def override(self, previous, txt_len: int):
        return NativeReferenceAttention(self, txt_len, previous)

    def plan_for(self, txt_len, grid, ref_grids, counts, device) -> CallPlan | None:
        """``plan`` of one layout, kept per layout (the same for every block and step)."""
        key = (txt_len, tuple(grid), tuple(tuple(g) for g in ref_grids or ()), tuple(counts), str(device))
        if key not in self._plans:
            if len(self._plans) > 32:
                self._plans.clear()
            self._plans[key] = plan(self.controls, txt_len, grid, ref_grids, counts, device)
        return self._plans[key]
