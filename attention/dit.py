"""The DiT path of the self-attention techniques (MRSA, DMSA, FASA on FLUX and SD3;
docs/algorithms.md §1.6, §2.7, §4.8). Pure torch: ComfyUI's objects arrive as arguments.

SD3/SD3.5 (MMDiT) has only joint blocks (ComfyUI's ``("double_block", i)``), hands its attention
``[B, L, h*d]`` tensors instead of FLUX's ``[B, h, L, d]`` and adds absolute positions at the input
(no RoPE, so reference positions cannot move); SD3.5 medium's second, image-only attention in a
block is passed through plain.

A DiT has no separate self-attention: text and image tokens attend jointly (FLUX double blocks
concatenate the two streams' q/k/v, single blocks run on ``[text ; image]``). ComfyUI exposes no
attention replace inside these blocks, only whole-block replaces (``patches_replace["dit"]``,
``("double_block", i)`` / ``("single_block", i)``) and the attention override
(``transformer_options["optimized_attention_override"]``) that its attention functions call. The
pack uses exactly these two supported hooks:

* ``PersonalizeBlock`` is the block replace. On a block a technique claims it calls the block with
  a copy of its options carrying a ``JointAttention`` override (chaining any override that was
  already there, e.g. another attention backend), so only this block's attention changes. Another
  pack's replace on the same block is wrapped, not lost.
* ``JointAttention`` gets the block's q/k/v **after QK-norm and RoPE**. It takes the image-token
  keys/values of the reference rows (or of the foundation rows, for FASA) and hands the techniques
  a UNet-like view of the target rows: image queries ``[b, N, h*d]`` against the target's own
  joint keys (text and image) ``[b, L, h*d]``, with the references' image tokens in a bank
  (``RowLayout``/``BranchLayout`` in ``read`` mode). So MRSA, DMSA and FASA run their own kernels
  unchanged: image queries attend over their own text and image keys plus the masked reference
  tokens; text queries keep plain joint attention; the reference rows are plain.
* Reference rows carry no information after the last patched block: there ``PersonalizeBlock``
  runs the target rows only (the reference rows pass through unchanged), and a references-only
  call (separate pass) stops computing at all.

Reference token positions (RoPE): the references run at the target's latent size, so their keys
carry the target's grid positions (*aligned*: a target token prefers reference tokens at the same
place). *Shifted* turns reference ``r``'s keys by ``(r + 1)`` grid widths along the column axis,
as if each reference stood beside the target in one wide image (a diptych): attention then
depends on content, not on where the subject sits, which is how a UNet's self-attention (no
positional encoding) treats FreeCustom's references. Shifted is the default.
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

import torch

from .kernels import Rope, merge_heads, split_heads
from ..references.masks import layer_mask
from .patch import BRANCH_KEY, LATENT_KEY, ROWS_KEY, STATE_KEY, RecordDone, RowLayout

DOUBLE, SINGLE = "double_block", "single_block"
IMAGE_KEYS = "personalize_image_keys"       # (start, stop) of the target's image tokens among the keys
ROPE_KEY = "personalize_rope"                # RopeGrid of the call (RoPE models only)
SHIFTED, ALIGNED = "shifted (side by side)", "aligned"
POSITIONS = [SHIFTED, ALIGNED]
WHOLE, SUBJECT = "whole image", "subject only (faster)"
REFERENCE_TOKENS = [WHOLE, SUBJECT]


def is_dit_key(key) -> bool:
    return isinstance(key, tuple) and len(key) == 2 and key[0] in (DOUBLE, SINGLE)


# --------------------------------------------------------------------------- the model family

@dataclass(frozen=True)
class DiTSpec:
    """What the DiT path needs to know about a model: ``family`` ("flux"), its double and single
    block counts, patch size and RoPE (None for models with absolute positions)."""
    family: str
    double: int
    single: int
    patch: int
    rope: Rope | None

    def keys(self) -> tuple:
        return tuple((DOUBLE, i) for i in range(self.double)) + tuple((SINGLE, i) for i in range(self.single))

    def order(self, key) -> int:
        """Position of a block in execution order (double blocks run before single blocks)."""
        return key[1] if key[0] == DOUBLE else self.double + key[1]

    def grid(self, latent_hw) -> tuple[int, int]:
        h, w = latent_hw
        return math.ceil(h / self.patch), math.ceil(w / self.patch)

    def image_tokens(self, latent_hw) -> int:
        gh, gw = self.grid(latent_hw)
        return gh * gw


SUPPORTED = ("SD1.x/SD2.x/SDXL UNets, FLUX (FLUX.1 dev, schnell and their fine-tunes) and SD3/SD3.5 "
             "(MMDiT)")
FAMILY_NAMES = {"flux": "FLUX", "sd3": "SD3"}


def model_family(diffusion_model) -> DiTSpec | None:
    """The ``DiTSpec`` of a ComfyUI diffusion model, None for a UNet; a clear error for any other
    architecture (it may lack the hooks this path relies on, or lay its tokens out differently)."""
    if hasattr(diffusion_model, "input_blocks") and hasattr(diffusion_model, "output_blocks"):
        return None
    cls = type(diffusion_model)
    params = getattr(diffusion_model, "params", None)
    if (cls.__name__ == "Flux" and cls.__module__.startswith("comfy.ldm.flux") and params is not None
            and hasattr(diffusion_model, "double_blocks") and hasattr(diffusion_model, "single_blocks")):
        rope = Rope(float(params.theta), tuple(int(a) for a in params.axes_dim))
        return DiTSpec("flux", len(diffusion_model.double_blocks), len(diffusion_model.single_blocks),
                       int(diffusion_model.patch_size), rope)
    if (cls.__name__ == "OpenAISignatureMMDITWrapper" and hasattr(diffusion_model, "joint_blocks")
            and cls.__module__.startswith("comfy.ldm.modules.diffusionmodules")):
        # SD3/SD3.5: joint blocks only (ComfyUI calls them "double_block"), absolute positions
        return DiTSpec("sd3", len(diffusion_model.joint_blocks), 0, int(diffusion_model.patch_size), None)
    raise ValueError(f"model: {cls.__name__} ({cls.__module__}) is not supported yet by the pack's self-attention "
                     f"techniques; they support {SUPPORTED}")


# --------------------------------------------------------------------------- blocks

FLUX_SINGLE = "FLUX dev/schnell: single blocks"
FLUX_DOUBLE = "FLUX dev/schnell: double blocks"
FLUX_ALL = "FLUX dev/schnell: all blocks"
SD3_LATE = "SD3/SD3.5: later half of the joint blocks"
SD3_ALL = "SD3/SD3.5: all joint blocks"
FAMILY_PRESETS = {"flux": [FLUX_SINGLE, FLUX_DOUBLE, FLUX_ALL], "sd3": [SD3_LATE, SD3_ALL]}
DIT_PRESETS = [p for ps in FAMILY_PRESETS.values() for p in ps]

_DIT_RE = re.compile(r"^\s*(double|single|joint)\s*[: ]\s*(\d+)(?:\s*-\s*(\d+))?\s*$")


def parse_dit_blocks(text: str, what: str = "custom_blocks") -> tuple:
    """``"double:0-18, single:0-37"`` as block keys ``("double_block", i)`` / ``("single_block", i)``
    (``joint:`` is SD3's name for the double blocks)."""
    from .layers import parse_ranges  # noqa: PLC0415

    found = parse_ranges(text, _DIT_RE, what, "'double:0-18, single:0-37' (FLUX) or 'joint:12-23' (SD3)")
    return tuple(dict.fromkeys((SINGLE if name == "single" else DOUBLE, i) for name, i in found))


def resolve_dit_blocks(preset: str, custom: str, spec: DiTSpec, custom_name: str = "custom",
                       what: str = "layers") -> tuple:
    """The block keys of a DiT preset (FLUX: every block of a kind the model has, FLUX.1 dev and
    schnell have 19 double and 38 single blocks; SD3: the later half or all of its joint blocks) or of
    a custom list (``parse_dit_blocks``, checked against the model)."""
    name = FAMILY_NAMES.get(spec.family, spec.family)
    if preset in DIT_PRESETS and preset not in FAMILY_PRESETS.get(spec.family, ()):
        raise ValueError(f"{what}: preset '{preset}' is not for this {name} model; choose one of "
                         f"{FAMILY_PRESETS.get(spec.family)} or '{custom_name}'")
    if preset == FLUX_SINGLE:
        keys = tuple((SINGLE, i) for i in range(spec.single))
    elif preset == FLUX_DOUBLE:
        keys = tuple((DOUBLE, i) for i in range(spec.double))
    elif preset in (FLUX_ALL, SD3_ALL):
        keys = spec.keys()
    elif preset == SD3_LATE:
        keys = tuple((DOUBLE, i) for i in range(spec.double // 2, spec.double))
    elif preset == custom_name:
        keys = parse_dit_blocks(custom)
        what = "custom_blocks"
    else:
        raise ValueError(f"{what}: preset '{preset}' is for UNet models, but this is a {name} model "
                         f"({spec.double} double and {spec.single} single blocks); choose one of "
                         f"{FAMILY_PRESETS.get(spec.family)} or '{custom_name}' with blocks like "
                         f"'double:0-18, single:0-37' (FLUX) or 'joint:12-23' (SD3)")
    have = set(spec.keys())
    missing = [k for k in keys if k not in have]
    if missing:
        miss = ", ".join(f"{k[0].split('_')[0]}:{k[1]}" for k in missing[:6])
        single = f" and single blocks 0-{spec.single - 1}" if spec.single else " and no single blocks"
        raise ValueError(f"{what}: this {name} model has double blocks 0-{spec.double - 1}{single}; it lacks {miss}")
    if not keys:
        raise ValueError(f"{what}: preset '{preset}' selects no block of this model")
    return keys


# --------------------------------------------------------------------------- positions

@dataclass(frozen=True)
class RopeGrid:
    """The RoPE of one call and the target's token grid: turns reference keys to other positions."""
    rope: Rope
    grid: tuple

    def positions(self, n: int) -> torch.Tensor:
        """Grid positions ``[n, 3+]`` (index 0, row, column) of the tokens ``0..n-1`` in raster order."""
        gw = self.grid[1]
        p = torch.zeros(n, len(self.rope.axes_dim), dtype=torch.float64)
        idx = torch.arange(n)
        p[:, 1] = (idx // gw).to(torch.float64)
        p[:, 2] = (idx % gw).to(torch.float64)
        return p

    def beside(self, k: torch.Tensor, slot: int) -> torch.Tensor:
        """Keys ``[..., N, h*d]`` moved ``slot`` grid widths to the right (shifted positions)."""
        delta = torch.zeros(len(self.rope.axes_dim), dtype=torch.float64)
        delta[2] = float(slot * self.grid[1])
        return self.rope.rotate(k, delta)

    def moved(self, k: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        """Keys ``[..., M, h*d]`` of the tokens ``src`` ``[M]`` moved to the positions of the tokens
        ``dst`` ``[M]`` (raster indices on the grid)."""
        n = int(max(int(src.max()), int(dst.max()))) + 1
        pos = self.positions(n).to(k.device)
        return self.rope.rotate(k, pos[dst.to(k.device)] - pos[src.to(k.device)])


def shift_reference(extra_options, k: torch.Tensor, slot: int, positions: str) -> torch.Tensor:
    """Reference keys at the positions a technique asked for (``SHIFTED`` moves reference ``slot``
    beside the target; ``ALIGNED``, UNets and models without RoPE keep them)."""
    grid = extra_options.get(ROPE_KEY)
    if grid is None or positions != SHIFTED:
        return k
    return grid.beside(k, slot)


# --------------------------------------------------------------------------- subject-only references

def subject_tokens(reference, latent_hw, spec: DiTSpec) -> torch.Tensor:
    """Raster indices of the image tokens the reference's subject touches at all (its mask fitted
    to the target latent, on the DiT's token grid). Every token when the subject touches none."""
    gh, gw = spec.grid(latent_hw)
    cover = layer_mask(reference.fitted(*latent_hw)[1], gh, gw, soft=True)
    idx = torch.nonzero(cover > 0, as_tuple=False).flatten()
    return idx if idx.numel() else torch.arange(gh * gw)


def select_tokens(idx: torch.Tensor):
    """A FLUX ``post_input`` patch keeping only the image tokens ``idx`` (with their RoPE ids, so
    every kept token keeps its grid position)."""
    def select(args):
        out = dict(args)
        out["img"] = args["img"][:, idx.to(args["img"].device)]
        if args.get("img_ids") is not None:
            out["img_ids"] = args["img_ids"][:, idx.to(args["img_ids"].device)]
        return out
    return select


# --------------------------------------------------------------------------- the block replace

def _active(state, key, layout, options):
    """``[(technique, kinds)]`` of the techniques that act on block ``key`` in this call."""
    out = []
    for t in state.techniques:
        kinds = tuple(kind for kind in ("attn1", "attn2") if key in t.keys(kind))
        if kinds and t.active_at(layout, options):
            out.append((t, kinds))
    return out


def _last_block(state, spec: DiTSpec, sigma: float) -> int:
    last = -1
    for t in state.techniques:
        if t.active(sigma):
            for kind in ("attn1", "attn2"):
                last = max([last] + [spec.order(k) for k in t.keys(kind) if is_dit_key(k)])
    return last


def _rows(value, n: int, count: int):
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == count:
        return value[:n]
    return value


class PersonalizeBlock:
    """The ``patches_replace["dit"]`` object on one block (module docstring)."""

    personalize_block = True

    def __init__(self, key: tuple, spec: DiTSpec, inner=None):
        self.key = key
        self.spec = spec
        self.inner = inner

    def _call(self, args, extra):
        if self.inner is not None:
            return self.inner(args, extra)
        return extra["original_block"](args)

    def __call__(self, args, extra):
        opts = args.get("transformer_options") or {}
        state = opts.get(STATE_KEY)
        if state is None:
            return self._call(args, extra)
        layout = opts.get(ROWS_KEY)
        if layout is None:
            layout = opts.get(BRANCH_KEY)
        techs = _active(state, self.key, layout, opts)
        last = None
        if isinstance(layout, RowLayout) and layout.mode in ("joint", "record"):
            last = getattr(layout, "_dit_last", None)
            if last is None:
                last = layout._dit_last = _last_block(state, self.spec, layout.sigma)
        if not techs:
            if last is not None and self.spec.order(self.key) > last:
                return self._targets_only(args, extra, layout)
            return self._call(args, extra)
        txt = args.get("txt")
        if txt is not None:
            txt_len = int(txt.shape[1])
        else:
            sl = opts.get("img_slice")
            txt_len = int(sl[0]) if sl else 0
        new = dict(opts)
        new["optimized_attention_override"] = JointAttention(self.key, self.spec, techs, txt_len, layout,
                                                             opts.get("optimized_attention_override"))
        out = self._call(dict(args, transformer_options=new), extra)
        if layout is not None and layout.mode == "record" and getattr(layout, "subset", None) is not None \
                and last is not None and self.spec.order(self.key) >= last:
            raise RecordDone()       # every bank is filled; a token subset cannot reach the output
        return out

    def _targets_only(self, args, extra, layout):
        """After the last patched block: the reference rows are never read again. A
        references-only call stops here; a joint call runs its target rows only."""
        if layout.mode == "record":
            if layout.subset is not None:
                raise RecordDone()
            return {k: args[k] for k in ("img", "txt") if k in args}
        n, count = layout.n_target, args["img"].shape[0]
        if not isinstance(args.get("vec"), torch.Tensor) or count <= n:
            return self._call(args, extra)      # modulation shared in another form: compute every row
        sub = {k: _rows(v, n, count) for k, v in args.items()}
        out = self._call(sub, extra)
        done = dict(out)
        for k in ("img", "txt"):
            if k in out and out[k] is not None and k in args:
                done[k] = torch.cat([out[k], args[k][n:].to(out[k].dtype)])
        return done


# --------------------------------------------------------------------------- the attention override

class JointAttention:
    """``optimized_attention_override`` for one call of one patched block (module docstring)."""

    def __init__(self, key, spec: DiTSpec, techs, txt_len: int, layout, previous=None):
        self.key = key
        self.spec = spec
        self.techs = techs
        self.txt_len = txt_len
        self.layout = layout
        self.previous = previous
        self.calls = 0

    def plain(self, func, *args, **kwargs):
        if self.previous is not None:
            return self.previous(func, *args, **kwargs)
        return func(*args, **kwargs)

    def __call__(self, func, *args, **kwargs):
        self.calls += 1
        if self.calls > 1 or len(args) < 3:
            return self.plain(func, *args, **kwargs)      # a block's second attention (image-only) stays plain
        q, k, v = args[:3]
        heads = args[3] if len(args) > 3 else kwargs.get("heads")
        rest = args[4:]
        kw = {n: val for n, val in kwargs.items() if n != "heads"}
        skip_in = bool(kw.get("skip_reshape", False))
        skip_out = bool(kw.get("skip_output_reshape", False))
        if kw.get("mask") is not None:
            raise ValueError("attention mask: this FLUX call carries an attention mask (regional prompting?); the "
                             "pack's multi-reference attention does not combine with attention masks yet")
        if skip_in:
            qh, kh, vh = q, k, v
        else:       # [B, L, h*d] (MMDiT hands v as [B, L, h, d]; ComfyUI's attention reshapes either)
            qh, kh, vh = (t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
        B, _, L, _ = qh.shape
        layout = self.layout
        opts = kw.get("transformer_options") or {}
        hw = opts.get(LATENT_KEY)
        if hw is None:
            raise ValueError("internal: a patched FLUX block ran without the latent size (the reference-pass "
                             "wrapper is missing from the model)")
        n_img = self.spec.image_tokens(hw)
        subset = getattr(layout, "subset", None)
        if subset is not None:
            n_img = int(subset.numel())          # a subject-only references call
        T = self.txt_len
        if T + n_img > L:
            raise ValueError(f"FLUX block {self.key}: {L} tokens cannot hold {T} text and {n_img} image tokens")
        img = slice(T, T + n_img)
        grid = RopeGrid(self.spec.rope, self.spec.grid(hw)) if self.spec.rope is not None else None

        mode = getattr(layout, "mode", None)
        if mode == "record":
            k_img, v_img = merge_heads(kh[:, :, img]).detach(), merge_heads(vh[:, :, img]).detach()
            if subset is not None:           # back on the full grid; the other tokens are never selected
                n_full = self.spec.image_tokens(hw)
                full_k = k_img.new_zeros((k_img.shape[0], n_full, k_img.shape[2]))
                full_v = torch.zeros_like(full_k)
                full_k[:, subset.to(k_img.device)] = k_img
                full_v[:, subset.to(k_img.device)] = v_img
                k_img, v_img = full_k, full_v
            layout.bank[self.key] = (k_img, v_img)
            return self.plain(func, *args, **kwargs)
        targets, sources, view = self.split(layout, B)

        def call(qq, kk, vv, skip):
            o = dict(kw, skip_reshape=skip, skip_output_reshape=False)
            return self.plain(func, qq, kk, vv, heads, *rest, **o)

        out = qh.new_empty((B, L, qh.shape[1] * qh.shape[3]))
        chosen = set(targets)
        plain_rows = [i for i in range(B) if i not in chosen]
        if plain_rows:
            idx = torch.as_tensor(plain_rows, device=qh.device)
            out[idx] = call(qh[idx], kh[idx], vh[idx], True)
        if targets:
            t = torch.as_tensor(targets, device=qh.device)
            if sources:
                s = torch.as_tensor(sources, device=qh.device)
                self.bank_into(view, kh[s][:, :, img], vh[s][:, :, img])
            q_t, k_t, v_t = qh[t], kh[t], vh[t]
            if T + n_img == L:          # text queries only (the usual layout): a view, no gather
                if T:
                    out[t, :T] = call(q_t[:, :, :T], k_t, v_t, True)
            else:                       # tokens after the image too (e.g. Kontext's reference latents)
                o = torch.tensor([i for i in range(L) if not T <= i < T + n_img], device=qh.device)
                out[t[:, None], o[None, :]] = call(q_t[:, :, o], k_t, v_t, True)
            out[t, T:T + n_img] = self.image_queries(call, merge_heads(q_t[:, :, img]), merge_heads(k_t),
                                                     merge_heads(v_t), heads, view, hw, grid, (T, T + n_img), kw)
        if skip_out:
            return out.view(B, L, qh.shape[1], -1).transpose(1, 2)
        return out

    def split(self, layout, B):
        """``(target rows, source rows, read view)``: the rows the techniques modify, the rows whose
        image keys/values they read, and the layout the techniques see (target rows only)."""
        if layout is None:
            return list(range(B)), [], None
        if layout.mode == "read":
            return list(range(B)), [], layout
        if isinstance(layout, RowLayout):
            view = RowLayout("read", layout.labels, layout.n_target, layout.latent_hw, layout.sigma, layout.rows, {})
            return list(range(layout.n_target)), list(range(layout.n_target, B)), view
        pers = [r for lab in set(layout.labels) for r in layout.personal_rows(lab)]
        pers.sort()
        view = type(layout)("read", layout.labels, layout.batch, layout.sigma, {})
        return pers, [r + layout.batch for r in pers], view

    def bank_into(self, view, k_img, v_img):
        view.bank[self.key] = (merge_heads(k_img), merge_heads(v_img))

    def image_queries(self, call, q, k, v, heads, view, hw, grid, image_keys, kw):
        eo = dict(kw.get("transformer_options") or {})
        eo.update({"n_heads": heads, "original_shape": [q.shape[0], 0, hw[0], hw[1]], IMAGE_KEYS: image_keys,
                   ROPE_KEY: grid})
        eo[BRANCH_KEY if view is not None and not isinstance(view, RowLayout) else ROWS_KEY] = view

        def inner(qq, kk, vv, extra_options):
            return call(split_heads(qq, heads), split_heads(kk, heads), split_heads(vv, heads), True)

        for tech, kinds in self.techs:
            if "attn2" in kinds and hasattr(tech, "record_maps"):
                tech.record_maps(q, k[:, :image_keys[0]], eo, view, self.key)
        fn, subset_ok = inner, True
        for tech, kinds in reversed(self.techs):
            if "attn1" in kinds:
                fn = functools.partial(tech.attn1, inner=fn, layout=view, key=self.key, subset_ok=subset_ok)
                subset_ok = False
        return fn(q, k, v, eo)


def install_dit_blocks(model, spec: DiTSpec) -> None:
    """Register a ``PersonalizeBlock`` on every block of ``model`` (a clone), wrapping any replace
    another pack had put there."""
    from comfy.ldm.modules import attention  # noqa: PLC0415

    if not hasattr(attention, "wrap_attn"):
        raise ValueError("model: the pack's FLUX path needs ComfyUI's attention override "
                         "(optimized_attention_override), which this ComfyUI lacks; update ComfyUI")
    table = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    for key in spec.keys():
        existing = table.get(key)
        if isinstance(existing, PersonalizeBlock):
            continue
        model.set_model_patch_replace(PersonalizeBlock(key, spec, existing), "dit", key[0], key[1])
