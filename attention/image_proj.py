"""The image-projection models of IP-Adapter / MIP-Adapter checkpoints (docs/algorithms.md §3.4): CLIP
vision output -> the extra context tokens; and which one an ``image_proj`` state dict holds, with its
sizes, read from its tensors (``projection_from_state_dict``). Parameter names follow the checkpoint
keys, so a state dict loads with ``strict=True``. Pure torch.

* ``ImageProjModel`` (linear): ``proj`` Linear ``E -> tokens*ctx``, then LayerNorm ``norm`` per token.
* ``MLPProjModel`` (full face): ``Linear, GELU, Linear, LayerNorm`` on every CLIP token.
* ``Resampler`` (plus): learned queries cross-attending (``PerceiverAttention``) to the CLIP tokens.
"""
from __future__ import annotations

import re

import torch
from torch import nn

IMAGE_EMBEDS = "image_embeds"
PENULTIMATE = "penultimate_hidden_states"
DIM_HEAD = 64              # every official Resampler uses 64-wide heads; the tensors cannot say
FULL_FACE_TOKENS = 257     # CLIP ViT-H/14 at 224 px: 16 x 16 patches + the class token


class ImageProjModel(nn.Module):
    """``LayerNorm(proj(e).reshape(B, tokens, ctx))`` for CLIP image embeds ``e [B, E]``."""

    def __init__(self, embed_dim: int, tokens: int, ctx: int):
        super().__init__()
        self.tokens, self.ctx = tokens, ctx
        self.proj = nn.Linear(embed_dim, tokens * ctx)
        self.norm = nn.LayerNorm(ctx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).reshape(x.shape[0], self.tokens, self.ctx))


class MLPProjModel(nn.Module):
    """Full-face projection of every CLIP token: ``LayerNorm(W2 GELU(W1 x + b1) + b2)``."""

    def __init__(self, embed_dim: int, hidden: int, ctx: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(embed_dim, hidden), nn.GELU(), nn.Linear(hidden, ctx),
                                  nn.LayerNorm(ctx))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class PerceiverAttention(nn.Module):
    """The latents (queries) attend over the image features and themselves:
    ``softmax(q k^T / sqrt(d)) v`` with ``q = W_q LN2(lat)``, ``[k; v] = W_kv [LN1(x); LN2(lat)]``,
    then ``W_out``. The ``1/sqrt(d)`` is applied as ``d^-1/4`` on each of q and k, as the
    official code does for half-precision range."""

    def __init__(self, dim: int, inner: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x)
        latents = self.norm2(latents)
        b, n, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        q, k, v = (t.reshape(b, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))
        s = q.shape[-1] ** -0.25
        w = torch.softmax(((q * s) @ (k * s).transpose(-1, -2)).float(), dim=-1).to(v.dtype)
        out = (w @ v).transpose(1, 2).reshape(b, n, -1)
        return self.to_out(out)


def _feed_forward(dim: int, inner: int) -> nn.Sequential:
    """``x -> W2 GELU(W1 LN(x))`` without biases (keys ``0`` LayerNorm, ``1`` and ``3`` Linear)."""
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(),
                         nn.Linear(inner, dim, bias=False))


class Resampler(nn.Module):
    """IP-Adapter Plus projection: ``x' = proj_in(x)``; per layer ``lat += attn(x', lat)``,
    ``lat += ff(lat)``; output ``norm_out(proj_out(lat))`` of shape ``[B, queries, out]``."""

    def __init__(self, embed_dim: int, dim: int, inner: int, heads: int, queries: int, depth: int,
                 ff_inner: int, out_dim: int):
        super().__init__()
        self.latents = nn.Parameter(torch.empty(1, queries, dim))
        self.proj_in = nn.Linear(embed_dim, dim)
        self.proj_out = nn.Linear(dim, out_dim)
        self.norm_out = nn.LayerNorm(out_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, inner, heads), _feed_forward(dim, ff_inner)])
            for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        latents = self.latents.expand(x.shape[0], -1, -1)
        x = self.proj_in(x)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


# --------------------------------------------------------------------------- from a state dict

def _check_keys(sd: dict, shapes: dict, name: str, what: str) -> None:
    """Every expected key present with its shape, and nothing else."""
    missing = [k for k in shapes if k not in sd]
    extra = sorted(k for k in sd if k not in shapes)
    wrong = [f"{k} {tuple(sd[k].shape)} (expected {tuple(s)})" for k, s in shapes.items()
             if k in sd and tuple(sd[k].shape) != tuple(s)]
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
    if extra:
        problems.append(f"unexpected {', '.join(extra[:6])}{' ...' if len(extra) > 6 else ''}")
    if wrong:
        problems.append(f"wrong shapes {', '.join(wrong[:4])}")
    if problems:
        raise ValueError(f"ipadapter: '{name}' has an image projection like {what} but it does not "
                         f"match that layout: {'; '.join(problems)}")


def projection_from_state_dict(proj: dict, name: str):
    """``(module, projection, tokens, clip_output, clip_width, out_dim)`` from an adapter's ``image_proj``
    tensors (float32, CPU): the module loaded with them (``strict=True``, no random initialisation),
    ``projection`` ``"linear"``/``"resampler"``/``"mlp"``, the CLIP vision output it reads and that
    output's width. Any other layout, a missing or extra key or a wrong shape is a ValueError
    naming ``name``."""
    if "latents" in proj:
        make, tokens, width, out = _resampler_from(proj, name)
        projection, clip_output = "resampler", PENULTIMATE
    elif "proj.3.weight" in proj:
        if "proj.0.weight" not in proj or proj["proj.0.weight"].ndim != 2:
            raise ValueError(f"ipadapter: '{name}' has a full-face LayerNorm 'proj.3' without the "
                             f"'proj.0' Linear before it; it is not a checkpoint of a known layout")
        hidden, width = proj["proj.0.weight"].shape
        out = proj["proj.3.weight"].shape[0]
        _check_keys(proj, {"proj.0.weight": (hidden, width), "proj.0.bias": (hidden,),
                           "proj.2.weight": (out, hidden), "proj.2.bias": (out,),
                           "proj.3.weight": (out,), "proj.3.bias": (out,)},
                    name, "the full-face MLP")
        make = lambda: MLPProjModel(width, hidden, out)
        projection, clip_output, tokens = "mlp", PENULTIMATE, FULL_FACE_TOKENS
    elif "proj.weight" in proj:
        if "norm.weight" not in proj or proj["proj.weight"].ndim != 2:
            raise ValueError(f"ipadapter: '{name}' has a 'proj' image projection without its "
                             f"LayerNorm 'norm'; it is not an IP-Adapter checkpoint of a known layout")
        out = proj["norm.weight"].shape[0]
        rows, width = proj["proj.weight"].shape
        if rows % out:
            raise ValueError(f"ipadapter: '{name}': image projection rows {rows} are not a multiple "
                             f"of its token width {out}")
        tokens = rows // out
        _check_keys(proj, {"proj.weight": (rows, width), "proj.bias": (rows,),
                           "norm.weight": (out,), "norm.bias": (out,)}, name, "ImageProjModel")
        make = lambda: ImageProjModel(width, tokens, out)
        projection, clip_output = "linear", IMAGE_EMBEDS
    else:
        keys = ", ".join(sorted(proj)[:6])
        raise ValueError(f"ipadapter: '{name}' has an image projection of an unknown layout (keys: "
                         f"{keys}); supported are IP-Adapter base/light, plus, plus-face, full-face, "
                         f"SDXL and MIP-Adapter files")
    with torch.device("meta"):                 # no random initialisation: the file fills it
        module = make()
    module.load_state_dict(proj, strict=True, assign=True)
    module.requires_grad_(False).eval()
    return module, projection, tokens, clip_output, width, out


def _resampler_from(proj: dict, name: str):
    """Derive the Resampler's sizes from its tensors and check every key; returns a factory."""
    lat = proj["latents"]
    if lat.ndim != 3 or lat.shape[0] != 1 or "proj_in.weight" not in proj \
            or "layers.0.0.to_q.weight" not in proj or "proj_out.weight" not in proj \
            or "layers.0.1.1.weight" not in proj:
        raise ValueError(f"ipadapter: '{name}' has Resampler latents {tuple(lat.shape)} but not the "
                         f"rest of a Resampler (proj_in, layers.0, proj_out)")
    queries, dim = lat.shape[1], lat.shape[2]
    width = proj["proj_in.weight"].shape[1]
    inner = proj["layers.0.0.to_q.weight"].shape[0]
    ff_inner = proj["layers.0.1.1.weight"].shape[0]
    out = proj["proj_out.weight"].shape[0]
    depth = 1 + max(int(m.group(1)) for m in (re.match(r"^layers\.(\d+)\.", k) for k in proj) if m)
    if inner % DIM_HEAD:
        raise ValueError(f"ipadapter: '{name}': Resampler attention width {inner} is not a multiple "
                         f"of the {DIM_HEAD}-wide heads every IP-Adapter Resampler uses")
    shapes = {"latents": (1, queries, dim), "proj_in.weight": (dim, width), "proj_in.bias": (dim,),
              "proj_out.weight": (out, dim), "proj_out.bias": (out,),
              "norm_out.weight": (out,), "norm_out.bias": (out,)}
    for i in range(depth):
        a, f = f"layers.{i}.0.", f"layers.{i}.1."
        shapes.update({a + "norm1.weight": (dim,), a + "norm1.bias": (dim,),
                       a + "norm2.weight": (dim,), a + "norm2.bias": (dim,),
                       a + "to_q.weight": (inner, dim), a + "to_kv.weight": (2 * inner, dim),
                       a + "to_out.weight": (dim, inner),
                       f + "0.weight": (dim,), f + "0.bias": (dim,),
                       f + "1.weight": (ff_inner, dim), f + "3.weight": (dim, ff_inner)})
    _check_keys(proj, shapes, name, "the IP-Adapter Plus Resampler")
    make = lambda: Resampler(width, dim, inner, inner // DIM_HEAD, queries, depth, ff_inner, out)
    return make, queries, width, out


__all__ = ["ImageProjModel", "MLPProjModel", "PerceiverAttention", "Resampler", "projection_from_state_dict",
           "IMAGE_EMBEDS", "PENULTIMATE"]
