"""Infusion at inference (docs/algorithms.md §6.1, §6.8): learned offsets on the cross-attention key
and value of the concept token. Pure torch.

At every cross-attention layer the offsets file has weights for, for the conditional rows only
(``cond_or_uncond == 0``):

    K = W_k ctx ;  K[p] += strength * Δk        (Δk absent in V-only files)
    V = W_v ctx ;  V[p] += strength * Δv
    out = softmax(Q Kᵀ / √d) V                  (the layer's ordinary attention, all tokens)

``p`` is the concept token's position in the prompt's conditioning. ComfyUI repeats a shorter
conditioning to the batch's token count (``repeat`` of the whole sequence), so the offset goes on
``p + j L`` for every repeat ``j`` of the prompt's length ``L``: attention over a repeated sequence
with equal offsets on every copy equals attention over one copy. The unconditional rows, the
reference rows another technique appends, and FreeCure's foundation branch are left as they are.
"""
from __future__ import annotations

import torch

from ..references.prompt_tokens import concept_token_index, token_ids
from .blocks import cross_attention_modules
from .install import install_technique
from .patch import BRANCH_KEY, COND, Technique, row_runs

FAMILIES = {768: "SD1.x", 1024: "SD2.x"}          # text-conditioning width -> supported family


# --------------------------------------------------------------------------- kernel

def concept_positions(n_tokens: int, position: int, prompt_length: int) -> list[int]:
    """The token positions that carry the concept in a conditioning of ``n_tokens`` tokens made of
    repeats of a prompt of ``prompt_length`` tokens whose concept token is ``position``."""
    if prompt_length <= 0 or not 0 <= position < prompt_length:
        raise ValueError(f"concept position {position} is outside a prompt of {prompt_length} tokens")
    if n_tokens % prompt_length:
        raise ValueError(f"Infusion: the conditioning has {n_tokens} tokens, but the prompt given to Apply Infusion "
                         f"has {prompt_length}; give Apply Infusion the same prompt as your CLIP Text Encode")
    return [position + j * prompt_length for j in range(n_tokens // prompt_length)]


def infuse_kv(k: torch.Tensor, v: torch.Tensor, rows, positions, dk: torch.Tensor | None,
              dv: torch.Tensor | None, strength: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``k``, ``v`` ``[B, N, C]`` with ``strength * dk`` / ``strength * dv`` (``[C]``, None = no
    offset) added at token ``positions`` of batch ``rows``. The sums are formed in at least float32
    and rounded once to the input's dtype. The inputs are not modified (copies are returned where
    an offset applies)."""
    rows = sorted(int(r) for r in rows)
    if not rows or not positions:
        return k, v
    pos = torch.as_tensor(list(positions), device=k.device, dtype=torch.long)

    def add(x, d):
        if d is None:
            return x
        dt = torch.promote_types(x.dtype, torch.float32)
        delta = d.to(x.device, dt) * strength
        x = x.clone()
        for run in row_runs(rows):
            x[run, pos] = (x[run, pos].to(dt) + delta).to(x.dtype)
        return x

    return add(k, dk), add(v, dv)


# --------------------------------------------------------------------------- technique

class InfusionAttention(Technique):
    """The Infusion patch on the cross-attention layers of ``offsets``.

    ``offsets``: ``{layer key: (Δk [C] or None, Δv [C])}``; ``position``: the concept token's index
    in the prompt's conditioning, start token included; ``prompt_length``: that conditioning's token
    count (77 per CLIP chunk); ``strength``: the multiplier on every offset (1 = the official model).
    """

    name = "Infusion"

    def __init__(self, offsets: dict, position: int, prompt_length: int, strength: float = 1.0):
        if not offsets:
            raise ValueError("offsets: no cross-attention layers")
        concept_positions(prompt_length, position, prompt_length)       # checks the position
        self.offsets = {k: (None if dk is None else dk.detach().float().cpu(), dv.detach().float().cpu())
                        for k, (dk, dv) in offsets.items()}
        self.position = int(position)
        self.prompt_length = int(prompt_length)
        self.strength = float(strength)
        self.attn2_keys = frozenset(self.offsets)
        self._device: dict = {}

    # -- technique protocol -------------------------------------------------------------
    def active(self, sigma: float) -> bool:
        return self.strength != 0.0

    def active_at(self, layout, extra_options) -> bool:
        return self.strength != 0.0

    # -- attention ----------------------------------------------------------------------
    def device_offsets(self, key, device):
        ck = (key, str(device))
        hit = self._device.get(ck)
        if hit is None:
            dk, dv = self.offsets[key]
            hit = (None if dk is None else dk.to(device), dv.to(device))
            self._device[ck] = hit
        return hit

    def cond_rows(self, q, extra_options, layout) -> list[int]:
        branches = extra_options.get(BRANCH_KEY)
        if branches is not None:
            # FreeCure: the personalised rows only; its foundation branch runs without the concept.
            return [] if branches.mode == "record" else branches.personal_rows(COND)
        if layout is not None:
            labels, n_target = layout.labels, layout.n_target
        else:
            labels, n_target = list(extra_options.get("cond_or_uncond") or [COND]), q.shape[0]
        if not labels or n_target % len(labels):
            return []
        chunk = n_target // len(labels)
        return [i for j, lab in enumerate(labels) if lab == COND for i in range(j * chunk, (j + 1) * chunk)]

    def attn2(self, q, k, v, extra_options, *, inner, layout, key, subset_ok=False):
        rows = self.cond_rows(q, extra_options, layout)
        if rows:
            dk, dv = self.device_offsets(key, k.device)
            positions = concept_positions(k.shape[1], self.position, self.prompt_length)
            k, v = infuse_kv(k, v, rows, positions, dk, dv, self.strength)
        return inner(q, k, v, extra_options)


# --------------------------------------------------------------------------- on a ComfyUI MODEL
# (duck-typed: nothing here imports ComfyUI)

_ENCODER = {"SD1.x": "l", "SD2.x": "h"}  # the CLIP that conditions each family, as clip.tokenize names it


def model_config_name(model) -> str:
    cfg = getattr(getattr(model, "model", None), "model_config", None)
    return type(cfg).__name__ if cfg is not None else type(getattr(model, "model", model)).__name__


def cross_attention_widths(model) -> tuple[dict, str]:
    """``({layer key: attn2 inner width}, family)`` of an SD1.x/SD2.x UNet; a clear error naming
    the model otherwise."""
    config = model_config_name(model)
    layers = cross_attention_modules(getattr(getattr(model, "model", None), "diffusion_model", None))
    if not layers:
        raise ValueError(f"model: Infusion supports SD1.x and SD2.x UNet models; this is a {config} model without "
                         f"UNet cross-attention layers")
    widths, contexts = {}, set()
    for k, a in layers.items():
        w = a.to_k.weight
        widths[k] = int(getattr(a.to_k, "out_features", w.shape[0]))
        contexts.add(int(getattr(a.to_k, "in_features", w.shape[1])))
    family = FAMILIES.get(next(iter(contexts))) if len(contexts) == 1 else None
    if family is None:
        ctx = ", ".join(str(c) for c in sorted(contexts))
        xl = " (the SDXL family)" if contexts == {2048} else ""
        raise ValueError(f"model: Infusion supports SD1.x and SD2.x models (768- or 1024-wide text conditioning); "
                         f"this is a {config} model with {ctx}-wide conditioning{xl}. The official Infusion code has no "
                         f"SDXL or FLUX version")
    return widths, family


def concept_position(clip, prompt: str, word: str, family: str) -> tuple[int, int]:
    """``(index of the concept word's first token, token count)`` in the prompt's conditioning, by
    the CLIP's own tokenizer (long prompts: chunks of 77 concatenated, so chunk c, index i is
    77 c + i)."""
    if not (prompt or "").strip():
        raise ValueError("prompt: empty; give the positive prompt you sample with, exactly as in your CLIP Text Encode")
    tokens = clip.tokenize(prompt)
    encoder = _ENCODER[family]
    if encoder not in tokens:
        if len(tokens) != 1:
            raise ValueError(f"clip: its tokenizer has the encoders {', '.join(sorted(tokens))}, not the {family} "
                             f"text encoder; use the CLIP of your {family} checkpoint")
        encoder = next(iter(tokens))
    ids = token_ids(tokens, encoder)
    special = token_ids(clip.tokenize(""), encoder)
    index = concept_token_index(ids, clip.tokenize(word), special, word=f"concept_word '{word}'", encoder=encoder)
    return index, len(ids)


def apply_infusion(model, loaded, clip, prompt: str, concept_word: str = "", strength: float = 1.0,
                   name: str = "infusion file"):
    """A clone of ``model`` with the Infusion offsets of ``loaded`` (``training.infusion.load_offsets``)
    at the concept word's token of ``prompt``; the checks of Apply Infusion (family, layer widths,
    the word). ``name`` starts the error messages about the file."""
    widths, family = cross_attention_widths(model)
    if loaded.family is not None and loaded.family != family:
        raise ValueError(f"{name} was trained on an {loaded.family} model; this is an {family} model "
                         f"({model_config_name(model)})")
    loaded.offsets.check_widths(widths, name=name)
    word = (concept_word or "").strip() or loaded.concept_word
    if not word:
        raise ValueError(f"concept_word: empty, and {name} stores no concept word (an official checkpoint); give "
                         f"the super-class word it was trained with, e.g. 'cat'")
    position, length = concept_position(clip, prompt, word, family)
    return install_technique(model, InfusionAttention(loaded.offsets.offsets(), position, length, strength))
