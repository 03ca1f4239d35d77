"""MIP-Adapter: several image prompts through IP-Adapter cross-attention, merged per pixel
(docs/algorithms.md §3). Pure torch.

At every cross-attention layer the text attention ``T`` gets, for each object ``i``, its own
image-prompt attention ``O_i = Attn(Q, K_ip,i, V_ip,i)`` added with a per-pixel weight:

    out = T + sum_i w_i(p) * t(p) * lambda * omega_i * O_i

* ``w_i(p)``: the entity word's cross-attention map, ``A_i(p) = mean_heads mean_j softmax_p(s K_e,ij . Q_p)``
  (the entity embedding's tokens ``1..L_i`` projected by the UNet's own ``to_k``, softmax over image
  positions), normalised across objects. A reference given an explicit mask uses the mask instead;
  the unmasked references share what the masks leave, split by their word maps.
* ``t(p) = sigmoid(u . T_p) / mean_p sigmoid(u . T_p)``: MIP's learned text gate; plain IP-Adapter
  weights have none, which is ``u = 0``, ``t = 1`` (§3.5).
* ``lambda`` is the adapter scale, ``omega_i`` the reference weight; both scale ``V_ip`` (attention
  is linear in the values), so they cost nothing per call.

Cond rows use the reference images' tokens and the entity words; uncond rows use the tokens of an
empty image and the empty prompt's entity embedding, as the paper's code does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..references.masks import resize_plane, token_grid
from .kernels import merge_heads, sdpa_attention, split_heads
from .blocks import cross_attention_modules
from .patch import BRANCH_KEY, COND, UNCOND, Technique, row_runs


# --------------------------------------------------------------------------- kernel

def word_maps(q: torch.Tensor, entity_keys: list, heads: int) -> torch.Tensor:
    """``A[b, i, p]``: the mean over heads and over the entity tokens of object ``i`` of the
    softmax over image positions ``p`` of ``s * K_e . Q_p``. ``q`` ``[B, N, h*d]``, ``entity_keys[i]``
    ``[L_i, h*d]``. Computed in float32 (a half-precision softmax over thousands of positions
    loses the small values, §3.7)."""
    dt = torch.promote_types(q.dtype, torch.float32)
    qh = split_heads(q.to(dt), heads)                                    # [B, h, N, d]
    scale = qh.shape[-1] ** -0.5
    lengths = [int(e.shape[0]) for e in entity_keys]
    ke = split_heads(torch.cat(entity_keys).to(q.device, dt).unsqueeze(0), heads)  # [1, h, L, d]
    probs = torch.softmax(torch.matmul(ke, qh.transpose(-1, -2)) * scale, dim=-1)   # [B, h, L, N]
    probs = probs.mean(1)                                                 # [B, L, N]
    return torch.stack([part.mean(1) for part in probs.split(lengths, dim=1)], dim=1)


def merge_weights(maps: torch.Tensor, masks: list) -> torch.Tensor:
    """Per-pixel weights ``w[b, i, p]`` from the word maps ``[B, M, N]`` and optional masks
    (``masks[i]`` ``[N]`` or None). Without masks: the maps normalised across objects. A masked
    object takes its mask; the unmasked ones share ``1 - min(1, sum of masks)`` by their maps."""
    if all(m is None for m in masks):
        return maps / maps.sum(1, keepdim=True).clamp_min(1e-30)
    w = torch.empty_like(maps)
    free = [i for i, m in enumerate(masks) if m is None]
    claimed = torch.zeros_like(maps[:, 0])
    for i, m in enumerate(masks):
        if m is not None:
            w[:, i] = m.to(maps.device, maps.dtype)
            claimed = claimed + w[:, i]
    if free:
        rest = (1.0 - claimed).clamp_min(0.0)
        sub = maps[:, free]
        w[:, free] = sub / sub.sum(1, keepdim=True).clamp_min(1e-30) * rest.unsqueeze(1)
    return w


def text_gate(text_out: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor | None:
    """``t[b, p] = sigmoid(u . T_p) / mean_p sigmoid(u . T_p)``; None for no gate (``t = 1``)."""
    if gate is None:
        return None
    dt = torch.promote_types(text_out.dtype, torch.float32)
    s = torch.sigmoid(text_out.to(dt) @ gate.to(text_out.device, dt))   # [B, N]
    return s / s.mean(1, keepdim=True)


def mip_delta(q: torch.Tensor, text_out: torch.Tensor, ip_k: list, ip_v: list, entity_keys: list | None,
              heads: int, masks: list | None = None, gate: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_i w_i(p) t(p) O_i`` for the rows ``q`` ``[B, N, h*d]`` whose text attention output is
    ``text_out``. ``ip_k[i]``/``ip_v[i]`` ``[n_tok, h*d]`` (scale and weight already in ``ip_v``),
    ``entity_keys[i]`` ``[L_i, h*d]`` (needed only when an object has no mask and there are
    several), ``masks[i]`` ``[N]`` or None."""
    b, n, _ = q.shape
    m = len(ip_k)
    masks = list(masks) if masks is not None else [None] * m
    if m == 1 and masks[0] is None:
        w = None                                          # one object, no mask: w = 1 everywhere
    elif all(x is not None for x in masks):
        w = merge_weights(q.new_zeros((b, m, n), dtype=torch.promote_types(q.dtype, torch.float32)), masks)
    else:
        if entity_keys is None:
            raise ValueError("entity keys are needed to split the image between several references")
        w = merge_weights(word_maps(q, entity_keys, heads), masks)
    t = text_gate(text_out, gate)
    if t is not None:
        w = t.unsqueeze(1).expand(b, m, n) if w is None else w * t.unsqueeze(1)
    return merged_attention(q, ip_k, ip_v, heads, w)


def merged_attention(q: torch.Tensor, ip_k: list, ip_v: list, heads: int, w: torch.Tensor | None) -> torch.Tensor:
    """``sum_i w[:, i, p] * Attn(q, ip_k[i], ip_v[i])`` in one pass: the logits against every
    object's keys at once, a softmax within each object's own keys, the per-pixel weights applied to
    those probabilities, and one product with all the values. Objects have the same token count
    (they come from one adapter)."""
    b, n, _ = q.shape
    m = len(ip_k)
    if m == 1 and w is None:                 # plain IP-Adapter attention: the fused kernel
        return sdpa_attention(q, ip_k[0].to(q.device, q.dtype).unsqueeze(0).expand(b, -1, -1),
                              ip_v[0].to(q.device, q.dtype).unsqueeze(0).expand(b, -1, -1), heads)
    dt = torch.promote_types(q.dtype, torch.float32)
    qh = split_heads(q.to(dt), heads)                                              # [B, h, N, d]
    kh = split_heads(torch.cat(ip_k).to(q.device, dt).unsqueeze(0), heads)         # [1, h, M*T, d]
    vh = split_heads(torch.cat(ip_v).to(q.device, dt).unsqueeze(0), heads)
    logits = torch.matmul(qh, kh.transpose(-1, -2)) * qh.shape[-1] ** -0.5         # [B, h, N, M*T]
    probs = torch.softmax(logits.view(b, heads, n, m, -1), dim=-1)
    if w is not None:
        probs = probs * w.to(dt).transpose(1, 2).view(b, 1, n, m, 1)
    out = torch.matmul(probs.view(b, heads, n, -1), vh)                            # [B, h, N, d]
    return merge_heads(out).to(q.dtype)


# --------------------------------------------------------------------------- technique

def _f(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


@dataclass(frozen=True)
class EncodedPrompt:
    """One object of MIP-Adapter, ready for the attention layers: its image-prompt tokens (the
    projection of its images, averaged over them) and the empty image's tokens, its entity
    embedding tokens ``1..L`` for the positive and the negative (empty) prompt, an optional mask
    in the generated image's space, and its weight."""
    name: str
    tokens: torch.Tensor             # [n_tok, ctx]
    uncond_tokens: torch.Tensor      # [n_tok, ctx]
    entity: torch.Tensor             # [L, ctx]
    uncond_entity: torch.Tensor      # [L, ctx]
    mask: torch.Tensor | None = None     # [H, W] in 0..1
    weight: float = 1.0


class MultiImagePromptAttention(Technique):
    """The MIP-Adapter patch on every cross-attention layer the adapter has weights for.

    ``layers``: ``{key: (to_k_ip [C, ctx], to_v_ip [C, ctx], gate [C] or None)}``.
    ``key_projection(key, tokens)``: the UNet's own ``to_k`` of that layer applied to entity
    embedding tokens (at call time, so LoRA-patched and offloaded weights are respected).
    """

    name = "MIP-Adapter"

    def __init__(self, prompts, layers: dict, key_projection, sigma_range, scale: float):
        if not prompts:
            raise ValueError("image_prompts: at least one reference is needed")
        self.prompts = tuple(prompts)
        self.key_projection = key_projection
        self.sigmas = sigma_range
        self.scale = float(scale)
        self.attn2_keys = frozenset(layers)
        self.gates = {key: gate for key, (_, _, gate) in layers.items()}
        # The image-prompt keys/values never change during sampling: project them once (scale and
        # weights folded into the values).
        self._kv = {}
        with torch.no_grad():
            for key, (wk, wv, _) in layers.items():
                for label in (COND, UNCOND):
                    toks = [p.tokens if label == COND else p.uncond_tokens for p in self.prompts]
                    self._kv[(key, label)] = (
                        [_f(t) @ _f(wk).T for t in toks],
                        [(_f(t) @ _f(wv).T) * (self.scale * p.weight) for t, p in zip(toks, self.prompts)])
        self._device_kv = {}
        self._masks = {}

    # -- technique protocol -------------------------------------------------------------
    def active(self, sigma: float) -> bool:
        return self.scale != 0.0 and sigma in self.sigmas

    def active_at(self, layout, extra_options) -> bool:
        if layout is not None:
            return self.active(layout.sigma)
        sig = extra_options.get("sigmas")
        if isinstance(sig, torch.Tensor) and sig.numel():
            return self.active(float(sig.reshape(-1)[0]))
        return self.scale != 0.0

    # -- attention ----------------------------------------------------------------------
    def device_kv(self, key, label: int, device, dtype):
        ck = (key, label, str(device), dtype)
        hit = self._device_kv.get(ck)
        if hit is None:
            ks, vs = self._kv[(key, label)]
            hit = ([k.to(device, dtype) for k in ks], [v.to(device, dtype) for v in vs])
            self._device_kv[ck] = hit
        return hit

    def layer_masks(self, n_tokens: int, latent_hw: tuple, device) -> list:
        ck = (n_tokens, tuple(latent_hw), str(device))
        hit = self._masks.get(ck)
        if hit is None:
            h, w = token_grid(n_tokens, *latent_hw)
            hit = [None if p.mask is None else resize_plane(p.mask.float(), h, w).reshape(-1).to(device)
                   for p in self.prompts]
            self._masks[ck] = hit
        return hit

    def entity_keys(self, key, label: int, device, dtype) -> list:
        ents = [p.entity if label == COND else p.uncond_entity for p in self.prompts]
        lengths = [int(e.shape[0]) for e in ents]
        k = self.key_projection(key, torch.cat(ents).to(device, dtype))
        return list(k.split(lengths, dim=0))

    def attn2(self, q, k, v, extra_options, *, inner, layout, key, subset_ok=False):
        heads = extra_options["n_heads"]
        out = inner(q, k, v, extra_options)
        branches = extra_options.get(BRANCH_KEY)
        if branches is not None and branches.mode == "record":
            return out                   # FreeCure's foundation branch: the identity (image prompts) is off
        if layout is not None:
            labels, n_target = layout.labels, layout.n_target
        else:
            labels, n_target = list(extra_options.get("cond_or_uncond") or [COND]), q.shape[0]
        if n_target % len(labels):
            return out
        chunk = n_target // len(labels)
        hw = tuple(extra_options["original_shape"][-2:]) if "original_shape" in extra_options else None
        masks = None
        if any(p.mask is not None for p in self.prompts):
            if hw is None:
                raise ValueError("MIP-Adapter masks need the latent size (extra_options['original_shape'])")
            masks = self.layer_masks(q.shape[1], hw, q.device)
        need_maps = len(self.prompts) > 1 and (masks is None or any(m is None for m in masks))
        gate = self.gates.get(key)
        if not subset_ok:
            out = out.clone()      # a wrapped technique or another pack's replace may keep its result
        for label in (COND, UNCOND):
            if branches is not None:     # only the personalised rows of FreeCure's two branches
                rows = branches.personal_rows(label)
            else:
                rows = [i for j, lab in enumerate(labels) if lab == label for i in range(j * chunk, (j + 1) * chunk)]
            if not rows:
                continue
            ip_k, ip_v = self.device_kv(key, label, q.device, q.dtype)
            ent = self.entity_keys(key, label, q.device, q.dtype) if need_maps else None
            for run in row_runs(rows):
                delta = mip_delta(q[run], out[run], ip_k, ip_v, ent, heads, masks, gate)
                out[run] = out[run] + delta.to(out.dtype)
        return out


# --------------------------------------------------------------------------- on a ComfyUI MODEL
# (duck-typed: nothing here imports ComfyUI)

def cross_attention_layers(model) -> dict:
    """``{key: attn2 module}`` of the model's UNet in IP-Adapter's layer order."""
    out = cross_attention_modules(model.model.diffusion_model)
    if not out:
        raise ValueError(f"model: no UNet cross-attention layers found in {type(model.model).__name__}; "
                         f"MIP-Adapter needs an SD1.x/SD2.x/SDXL-style UNet model")
    return out


class UNetKeyProjection:
    """The UNet's own ``to_k`` of each cross-attention layer, called as a module at sampling time
    (so LoRA-patched and offloaded weights are handled by ComfyUI)."""

    def __init__(self, layers: dict):
        self.to_k = {k: a.to_k for k, a in layers.items()}

    def __call__(self, key, tokens: torch.Tensor) -> torch.Tensor:
        return self.to_k[key](tokens)


def adapter_layers(model, adapter) -> tuple[dict, UNetKeyProjection]:
    """The adapter's image key/value weights and gate on each of ``model``'s cross-attention layers
    (``{key: (to_k_ip, to_v_ip, gate)}``; ``adapter.layer_keys`` checks that they fit), and the
    UNet's own key projection of those layers, for ``MultiImagePromptAttention``."""
    attn2 = cross_attention_layers(model)
    widths = {k: (int(a.to_k.weight.shape[0]), int(a.to_k.weight.shape[1])) for k, a in attn2.items()}
    layers = {}
    for key, n in adapter.layer_keys(widths).items():
        wk, wv, gate = adapter.layers[n]
        layers[key] = (wk, wv, gate)
    return layers, UNetKeyProjection({k: attn2[k] for k in layers})
