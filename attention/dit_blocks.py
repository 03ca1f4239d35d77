"""The DiT block runtime of the self-attention techniques (MRSA, DMSA, FASA on FLUX and SD3;
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
"""
from __future__ import annotations

import functools

import torch

from .families import DiTSpec, is_dit_key
from .dit import IMAGE_KEYS, ROPE_KEY, RopeGrid
from .kernels import merge_heads, split_heads
from .patch import BRANCH_KEY, LATENT_KEY, ROWS_KEY, STATE_KEY, RecordDone, RowLayout


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
        own = [t for t, _ in techs if t.overrides]
        techs = [(t, kinds) for t, kinds in techs if not t.overrides]
        last = None
        if isinstance(layout, RowLayout) and layout.mode in ("joint", "record"):
            if layout.dit_last is None:
                layout.dit_last = _last_block(state, self.spec, layout.sigma)
            last = layout.dit_last
        if not techs and not own:
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
        override = opts.get("optimized_attention_override")
        for t in own:
            override = t.override(override, txt_len)
        if techs:
            override = JointAttention(self.key, self.spec, techs, txt_len, layout, override)
        new["optimized_attention_override"] = override
        out = self._call(dict(args, transformer_options=new), extra)
        if isinstance(layout, RowLayout) and layout.mode == "record" and layout.subset is not None \
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

class ChainedOverride:
    """What the pack's ``optimized_attention_override`` objects share: ``previous`` is the override
    that was set before (another backend, another pack), which ``plain`` calls, or else ComfyUI's
    attention function itself."""

    previous = None

    def plain(self, func, *args, **kwargs):
        if self.previous is not None:
            return self.previous(func, *args, **kwargs)
        return func(*args, **kwargs)

    @staticmethod
    def heads_first(q, k, v, heads, skip_reshape: bool):
        """``q, k, v`` as ``[B, h, L, d]``: as given with ``skip_reshape``, else from ``[B, L, h*d]``
        (MMDiT hands v as ``[B, L, h, d]``; ComfyUI's attention reshapes either)."""
        if skip_reshape:
            return q, k, v
        return tuple(t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))


class JointAttention(ChainedOverride):
    """``optimized_attention_override`` for one call of one patched block (module docstring)."""

    def __init__(self, key, spec: DiTSpec, techs, txt_len: int, layout, previous=None):
        self.key = key
        self.spec = spec
        self.techs = techs
        self.txt_len = txt_len
        self.layout = layout
        self.previous = previous
        self.calls = 0

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
        mask = args[4] if len(args) > 4 else kw.get("mask")      # Qwen-Image hands its text mask positionally
        if mask is not None:
            raise ValueError("attention mask: this DiT call carries an attention mask (regional prompting, or a "
                             "padded text mask); the pack's multi-reference attention does not combine with "
                             "attention masks yet")
        qh, kh, vh = self.heads_first(q, k, v, heads, skip_in)
        B, _, L, _ = qh.shape
        layout = self.layout
        opts = kw.get("transformer_options") or {}
        hw = opts.get(LATENT_KEY)
        if hw is None:
            raise ValueError("internal: a patched FLUX block ran without the latent size (the reference-pass "
                             "wrapper is missing from the model)")
        n_img = self.spec.image_tokens(hw)
        subset = layout.subset if isinstance(layout, RowLayout) else None
        if subset is not None:
            n_img = int(subset.numel())          # a subject-only references call
        T = self.txt_len
        if T + n_img > L:
            raise ValueError(f"FLUX block {self.key}: {L} tokens cannot hold {T} text and {n_img} image tokens")
        img = slice(T, T + n_img)
        grid = RopeGrid(self.spec.rope, self.spec.grid(hw)) if self.spec.rope is not None else None

        mode = layout.mode if layout is not None else None
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
                if getattr(layout, "capture", None) is not None:      # the reference cache takes the rows' image k/v
                    layout.capture(self.key, *view.bank[self.key])
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
            if "attn2" in kinds:
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
    from comfy.ldm.modules import attention

    if not hasattr(attention, "wrap_attn"):
        raise ValueError("model: the pack's FLUX path needs ComfyUI's attention override "
                         "(optimized_attention_override), which this ComfyUI lacks; update ComfyUI")
    table = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    for key in spec.keys():
        existing = table.get(key)
        if isinstance(existing, PersonalizeBlock):
            continue
        model.set_model_patch_replace(PersonalizeBlock(key, spec, existing), "dit", key[0], key[1])
