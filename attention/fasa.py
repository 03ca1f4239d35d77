"""FreeCure's foundation-aware self-attention (FASA, docs/algorithms.md §4). Pure torch.

Two denoising branches run side by side from the same initial noise: the *personalised* branch
(the user's identity model and prompt) and the *foundation* branch (the identity switched off: the
prompt without the identity embedding, or the model without the identity patch). In the chosen
decoder self-attention layers the personalised image's cond rows attend over their own tokens plus
the foundation image's tokens inside the attribute mask (hair, eyes, glasses, ...), each with the
logit bias ``weight``: the MRSA kernel (§0.3) with the foundation branch as the single reference.
Everything else (uncond rows, the foundation rows) runs plain attention.

How the branches share one sampling run in ComfyUI:

* ``double_batch`` (``OUTER_SAMPLE`` wrapper) repeats the noise and the latent along the batch
  (``[personalised B, foundation B]``: the same initial noise for both, as FreeCure does), marks the
  run in the model options, samples, and returns the personalised half.
* ``foundation_branch`` (``APPLY_MODEL`` wrapper) gives the foundation rows of every cond chunk the
  foundation conditioning, then either runs everything in one UNet call (``joint``: each chunk is
  ``[personalised B, foundation B]``) or, when the identity comes from another pack's attention
  patches or from a LoRA set on the conditioning as a ComfyUI hook, runs the foundation rows first
  without those patches or with the hooks' weights taken off (``record``: their self-attention
  keys/values go to a bank) and then the personalised rows (``read``).
* ``FoundationAwareAttention.attn1`` applies FASA on the personalised cond rows.
"""
from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch

from ..references.masks import as_mask_batch, layer_mask, token_grid
from .dit_blocks import PersonalizeBlock
from .install import install_technique
from .kernels import gather_reference_keys, mrsa_attention, token_selection
from .patch import BRANCH_KEY, COND, STATE_KEY, PersonalizeAttention, Technique, apply_to_rows
from .reference_pass import repeat_tokens, row_subset

BATCH_KEY = "personalize_foundation_batch"   # set by double_batch: images per branch
OUTER_KEY = "personalize.foundation_batch"
APPLY_KEY = "personalize.foundation_branch"


# --------------------------------------------------------------------------- layout

@dataclass
class BranchLayout:
    """Where the two branches are in one model call.

    ``joint``: every chunk of ``cond_or_uncond`` is ``[personalised batch, foundation batch]``.
    ``record``: only foundation rows (``batch`` per chunk); their keys/values go to ``bank``.
    ``read``: only personalised rows; the foundation keys/values come from ``bank``.
    """
    mode: str
    labels: list
    batch: int
    sigma: float
    bank: dict = field(default_factory=dict)

    def personal_rows(self, label: int) -> list[int]:
        chunk = self.batch * (2 if self.mode == "joint" else 1)
        return [j * chunk + i for j, lab in enumerate(self.labels) if lab == label for i in range(self.batch)]

    def foundation_kv(self, key, k: torch.Tensor, v: torch.Tensor, row: int):
        """Keys/values of the foundation image paired with personalised row ``row``."""
        if self.mode == "joint":
            f = row + self.batch
            return k[f], v[f]
        kv = self.bank.get(key)
        if kv is None:
            return None
        return kv[0][row], kv[1][row]     # the record call had the same labels and batch


# --------------------------------------------------------------------------- the technique

class FoundationAwareAttention(Technique):
    """FASA on ``layer_keys`` within ``sigma_range``.

    ``foundation``: ``[1 or B, T, D]`` text conditioning of the foundation branch, or None (the
    foundation rows keep the personalised conditioning: the identity is switched off by
    ``strip_patches`` alone). ``masks``: ``[1 or B, H, W]`` attribute masks in the generated
    image's space (0..1). ``strip_patches``: the foundation branch runs without other packs'
    cross-attention patches (where InstantID-style identity adapters live). ``strip_hooks``: the
    foundation branch runs with the weights of the conditioning's hooks taken off (a DreamBooth-style
    identity LoRA applied with ComfyUI's hook nodes, so the foundation is the model without it). It
    adds no reference rows: the doubled batch goes through ComfyUI's own memory estimate.
    """

    name = "FreeCure FASA"
    exclusive = True          # owns the batch layout: does not combine with reference-row techniques

    def __init__(self, foundation, masks, weight: float, layer_keys, sigma_range, strip_patches: bool = False,
                 mask_threshold: float = 0.5, dit=None, strip_hooks: bool = False):
        if foundation is None and not strip_patches and not strip_hooks:
            raise ValueError("foundation: no foundation conditioning and strip_patches off, so the foundation "
                             "branch would equal the personalised one; connect the prompt without the identity")
        m = as_mask_batch(masks, "masks").clamp(0, 1)
        self.masks = (m >= mask_threshold).float() if mask_threshold > 0 else (m > 0).float()
        self.foundation = None if foundation is None else foundation.detach()
        self.weight = float(weight)
        self.attn1_keys = frozenset(layer_keys)
        self.sigmas = sigma_range
        self.strip_patches = bool(strip_patches)
        self.strip_hooks = bool(strip_hooks)
        self.dit = dit              # blocks.DiTSpec on a DiT model (its layer keys are DiT blocks)
        self._selections: dict = {}

    # -- technique protocol -------------------------------------------------------------
    def active_at(self, layout, extra_options) -> bool:
        b = extra_options.get(BRANCH_KEY)
        return b is not None and (b.mode == "record" or self.active(b.sigma))

    # -- masks --------------------------------------------------------------------------
    def image_masks(self, batch: int, hw: tuple) -> torch.Tensor:
        """The masks for ``batch`` images of latent size ``hw`` (one shared mask, or one each)."""
        n = self.masks.shape[0]
        if n not in (1, batch):
            raise ValueError(f"masks: {n} attribute masks for {batch} images; give one mask, or one per image")
        H, W = self.masks.shape[-2:]
        h, w = hw
        if abs(H / W - h / w) > 0.02 * (h / w):
            raise ValueError(f"masks: {W}x{H} masks do not have the aspect ratio of the {w * 8}x{h * 8} image; make "
                             f"them on the foundation image of this size")
        return self.masks

    def selections(self, n_tokens: int, hw: tuple, batch: int, device) -> list:
        key = (n_tokens, tuple(hw), batch, str(device))
        hit = self._selections.get(key)
        if hit is None:
            masks = self.image_masks(batch, hw)
            h, w = token_grid(n_tokens, *hw)
            hit = [token_selection(layer_mask(masks[min(i, masks.shape[0] - 1)], h, w, soft=False).to(device),
                                   self.weight) for i in range(batch)]
            self._selections[key] = hit
        return hit

    # -- attention ----------------------------------------------------------------------
    def attn1(self, q, k, v, extra_options, *, inner, layout, key, subset_ok=False):
        b = extra_options[BRANCH_KEY]
        if b.mode == "record":
            b.bank[key] = (k.detach(), v.detach())
            return inner(q, k, v, extra_options)
        heads = extra_options["n_heads"]
        hw = tuple(extra_options["original_shape"][-2:])
        sels = self.selections(q.shape[1], hw, b.batch, q.device)
        rows = b.personal_rows(COND)
        refs = {}
        for idx, r in enumerate(rows):
            sel = sels[idx % b.batch]
            kv = b.foundation_kv(key, k, v, r)
            if sel is not None and kv is not None:
                refs[r] = gather_reference_keys([kv], [sel])
        if not refs:
            return inner(q, k, v, extra_options)
        return apply_to_rows(q, k, v, extra_options, inner, subset_ok,
                             [([r], (lambda run, r=r: mrsa_attention(q[run], k[run], v[run], refs[r], heads)))
                              for r in refs])


def _fasa(state):
    return [t for t in state.techniques if isinstance(t, FoundationAwareAttention)] if state is not None else []


# --------------------------------------------------------------------------- sampler level

def double_batch(executor, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False,
                 seed=None, latent_shapes=None):
    """``OUTER_SAMPLE`` wrapper: sample ``[personalised, foundation]`` from the same noise, return
    the personalised half."""
    guider = executor.class_obj
    opts = guider.model_options.setdefault("transformer_options", {})
    if not _fasa(opts.get(STATE_KEY)) or (latent_shapes is not None and len(latent_shapes) > 1):
        return executor(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed,
                        latent_shapes=latent_shapes)
    b = noise.shape[0]
    noise2 = torch.cat([noise, noise])
    latent2 = torch.cat([latent_image, latent_image])
    if isinstance(denoise_mask, torch.Tensor) and denoise_mask.shape[0] == b and b > 0:
        denoise_mask = torch.cat([denoise_mask, denoise_mask])
    guider.model_options["transformer_options"] = dict(opts, **{BATCH_KEY: b})
    try:
        out = executor(noise2, latent2, sampler, sigmas, denoise_mask, callback, disable_pbar, seed,
                       latent_shapes=[tuple(noise2.shape)])
    finally:
        guider.model_options["transformer_options"] = opts
    return out[:b]


def _rows(value, rows: list[int], n: int):
    sub = row_subset(value, n, rows)
    return value if sub is None else sub


def _control_rows(control, rows: list[int], n: int):
    if control is None:
        return None
    out = {}
    for name, items in control.items():
        out[name] = [(_rows(t, rows, n) if isinstance(t, torch.Tensor) else t) for t in items] \
            if isinstance(items, list) else items
    return out


def strip_foreign_attention(transformer_options: dict) -> dict:
    """The options without other packs' cross-attention patches (the identity of InstantID-style
    adapters lives there): foreign attn2 replaces dropped, the pack's own unwrapped, attn2 input
    and output patches dropped. Self-attention patches stay. On a DiT, other packs' block replaces
    are dropped too (the pack's own are unwrapped)."""
    opts = dict(transformer_options)
    replace = {k: dict(v) for k, v in (opts.get("patches_replace") or {}).items()}
    table = replace.get("attn2", {})
    for key, fn in list(table.items()):
        if isinstance(fn, PersonalizeAttention):
            if fn.inner is not None:
                table[key] = PersonalizeAttention(fn.kind, None)
        else:
            del table[key]
    blocks = replace.get("dit", {})
    for key, fn in list(blocks.items()):
        if isinstance(fn, PersonalizeBlock):
            if fn.inner is not None:
                blocks[key] = PersonalizeBlock(fn.key, fn.spec, None)
        else:
            del blocks[key]       # DiT identity adapters (PuLID-FLUX style) replace whole blocks
    opts["patches_replace"] = replace
    patches = dict(opts.get("patches") or {})
    for name in ("attn2_patch", "attn2_output_patch"):
        patches.pop(name, None)
    opts["patches"] = patches
    return opts


def foundation_branch(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
    """``APPLY_MODEL`` wrapper: see the module docstring."""
    batch = transformer_options.get(BATCH_KEY)
    techs = _fasa(transformer_options.get(STATE_KEY))
    labels = list(transformer_options.get("cond_or_uncond") or [])
    if not techs or not batch or not labels or x.shape[0] != 2 * batch * len(labels):
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    tech = techs[0]
    n, chunk = x.shape[0], 2 * batch
    sigma = float(t.reshape(-1)[0])
    found = [j * chunk + batch + i for j in range(len(labels)) for i in range(batch)]
    pers = [j * chunk + i for j in range(len(labels)) for i in range(batch)]

    ctx = c_crossattn
    if ctx is not None and tech.foundation is not None and COND in labels:
        f = tech.foundation.to(ctx.device, ctx.dtype)
        if f.shape[-1] != ctx.shape[-1]:
            raise ValueError(f"foundation: its conditioning is {f.shape[-1]} wide but the model's is {ctx.shape[-1]}; "
                             f"encode it with the same CLIP as the prompt")
        if f.shape[0] not in (1, batch):
            raise ValueError(f"foundation: {f.shape[0]} conditionings for {batch} images; give one")
        if tech.dit is not None and f.shape[1] < tech.dit.min_text_tokens:     # FLUX.2 pads prompts at the front
            f = torch.nn.functional.pad(f, (0, 0, tech.dit.min_text_tokens - f.shape[1], 0))
        if tech.dit is not None and f.shape[1] != ctx.shape[1]:
            raise ValueError(f"foundation: its conditioning has {f.shape[1]} text tokens but the prompt has "
                             f"{ctx.shape[1]}; in a DiT (FLUX, SD3) the text tokens join the image tokens' "
                             f"attention, so the two must have the same length (keep the foundation prompt within "
                             f"the prompt's length: FLUX pads both to 256 T5 tokens, SD3 to 77)")
        length = math.lcm(ctx.shape[1], f.shape[1])
        ctx = repeat_tokens(ctx, length).clone()
        f = repeat_tokens(f, length).expand(batch, -1, -1)
        for j, lab in enumerate(labels):
            if lab == COND:
                ctx[j * chunk + batch:(j + 1) * chunk] = f

    opts = dict(transformer_options)
    if not tech.strip_patches and not tech.strip_hooks:
        opts[BRANCH_KEY] = BranchLayout("joint", labels, batch, sigma)
        return executor(x, t, c_concat, ctx, control, opts, **kwargs)

    # The foundation rows without the identity patches or hooks (recording their keys/values), then
    # the personalised rows with everything.
    bank: dict = {}
    sub = lambda value, rows: _rows(value, rows, n)
    rec = strip_foreign_attention(opts) if tech.strip_patches else dict(opts)
    rec[BRANCH_KEY] = BranchLayout("record", labels, batch, sigma, bank)
    if isinstance(rec.get("sigmas"), torch.Tensor):
        rec["sigmas"] = sub(rec["sigmas"], found)
    with (hooks_off(executor.class_obj, COND in labels) if tech.strip_hooks else nullcontext()):
        out_f = executor(x[found], t[found], sub(c_concat, found), sub(ctx, found), _control_rows(control, found, n),
                         rec, **{k: sub(v, found) for k, v in kwargs.items()})
    opts[BRANCH_KEY] = BranchLayout("read", labels, batch, sigma, bank)
    if isinstance(opts.get("sigmas"), torch.Tensor):
        opts["sigmas"] = sub(opts["sigmas"], pers)
    out_p = executor(x[pers], t[pers], sub(c_concat, pers), sub(ctx, pers), _control_rows(control, pers, n), opts,
                     **{k: sub(v, pers) for k, v in kwargs.items()})
    out = torch.empty((n, *out_p.shape[1:]), dtype=out_p.dtype, device=out_p.device)
    out[pers] = out_p
    out[found] = out_f.to(out_p.dtype)
    return out


@contextmanager
def hooks_off(base_model, required: bool = True):
    """While the block runs, the model has the weights of no ComfyUI hook (``ModelPatcher.apply_hooks``
    with none, the way ComfyUI's sampler switches between conditionings with different hooks), then
    the hooks it had again. ``required``: no hooks on the model is an error (the foundation would
    equal the personalised branch)."""
    patcher = getattr(base_model, "current_patcher", None)
    hooks = getattr(patcher, "current_hooks", None)
    if hooks is None:
        if required:
            raise ValueError("foundation_mode: the LoRA-hook mode takes the conditioning's hooks off for the "
                             "foundation branch, but the prompt's conditioning carries none; set the identity LoRA "
                             "on the conditioning with ComfyUI's Create Hook LoRA and Cond Set Props / Set CLIP "
                             "Hooks nodes (a LoRA from Load LoRA is part of the model: use another mode)")
        yield
        return
    patcher.apply_hooks(None)
    try:
        yield
    finally:
        patcher.apply_hooks(hooks)


def install_fasa(model, technique: FoundationAwareAttention):
    """Clone ``model`` with FASA: the technique (``install.install_technique``), the batch-doubling
    sampler wrapper and the branch wrapper. The input MODEL is not touched."""
    from comfy.patcher_extension import WrappersMP

    m = install_technique(model, technique)
    if not m.get_wrappers(WrappersMP.OUTER_SAMPLE, OUTER_KEY):
        m.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, OUTER_KEY, double_batch)
    if not m.get_wrappers(WrappersMP.APPLY_MODEL, APPLY_KEY):
        m.add_wrapper_with_key(WrappersMP.APPLY_MODEL, APPLY_KEY, foundation_branch)
    return m
