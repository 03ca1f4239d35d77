"""Random IP-Adapter / MIP-Adapter checkpoints in the official key layouts (docs/algorithms.md §3.4),
shaped for a given UNet: one ``{2n+1}.to_k_ip/to_v_ip`` pair (and for MIP a ``text_to_weight``) per
cross-attention layer in IP-Adapter's processor order, and an image projection of the chosen kind."""
from __future__ import annotations

import torch


def _rand(g, *shape, scale=None):
    fan_in = shape[-1] if len(shape) > 1 else 1
    return torch.randn(*shape, generator=g) * (scale if scale is not None else fan_in ** -0.5)


def image_proj_plain(g, clip_dim: int, ctx: int, tokens: int = 4) -> dict:
    return {"proj.weight": _rand(g, tokens * ctx, clip_dim), "proj.bias": _rand(g, tokens * ctx, scale=0.1),
            "norm.weight": 1 + _rand(g, ctx, scale=0.1), "norm.bias": _rand(g, ctx, scale=0.1)}


def image_proj_resampler(g, embed_dim: int, ctx: int, dim: int = 64, depth: int = 2, queries: int = 16,
                         dim_head: int = 64, heads: int = 1, ff_mult: int = 4) -> dict:
    inner = dim_head * heads
    sd = {"latents": _rand(g, 1, queries, dim, scale=dim ** -0.5),
          "proj_in.weight": _rand(g, dim, embed_dim), "proj_in.bias": _rand(g, dim, scale=0.1),
          "proj_out.weight": _rand(g, ctx, dim), "proj_out.bias": _rand(g, ctx, scale=0.1),
          "norm_out.weight": 1 + _rand(g, ctx, scale=0.1), "norm_out.bias": _rand(g, ctx, scale=0.1)}
    for i in range(depth):
        p = f"layers.{i}."
        sd.update({p + "0.norm1.weight": 1 + _rand(g, dim, scale=0.1), p + "0.norm1.bias": _rand(g, dim, scale=0.1),
                   p + "0.norm2.weight": 1 + _rand(g, dim, scale=0.1), p + "0.norm2.bias": _rand(g, dim, scale=0.1),
                   p + "0.to_q.weight": _rand(g, inner, dim), p + "0.to_kv.weight": _rand(g, 2 * inner, dim),
                   p + "0.to_out.weight": _rand(g, dim, inner),
                   p + "1.0.weight": 1 + _rand(g, dim, scale=0.1), p + "1.0.bias": _rand(g, dim, scale=0.1),
                   p + "1.1.weight": _rand(g, dim * ff_mult, dim), p + "1.3.weight": _rand(g, dim, dim * ff_mult)})
    return sd


def adapter_layers(g, widths: list, ctx: int, gate: bool, kv_scale: float = 1.0) -> dict:
    """``widths[n]``: the inner width of cross-attention layer n (IP-Adapter order)."""
    sd = {}
    for n, c in enumerate(widths):
        sd[f"{2 * n + 1}.to_k_ip.weight"] = _rand(g, c, ctx) * kv_scale
        sd[f"{2 * n + 1}.to_v_ip.weight"] = _rand(g, c, ctx) * kv_scale
        if gate:
            sd[f"{2 * n + 1}.text_to_weight.weight"] = _rand(g, 1, c)
    return sd


def unet_widths(model) -> tuple[list, int]:
    """Inner widths of the model's cross-attention layers in IP-Adapter order, and its context width."""
    from personalize_pack.attention.blocks import transformer_blocks
    blocks = transformer_blocks(model.model.diffusion_model)
    ws = [tb.attn2.to_k.weight.shape for tb in blocks.values()]
    return [int(w[0]) for w in ws], int(ws[0][1])


def adapter_state(model, kind: str = "mip_plus", clip_dim: int = 24, clip_hidden: int = 32, seed: int = 0,
                  kv_scale: float = 1.0) -> dict:
    """A nested ``{"image_proj": ..., "ip_adapter": ...}`` checkpoint for ``model``.
    ``kind``: ``plain`` / ``plus`` (IP-Adapter) or ``mip`` / ``mip_plus`` (with the learned gate)."""
    g = torch.Generator().manual_seed(seed)
    widths, ctx = unet_widths(model)
    if kind in ("plain", "mip"):
        proj = image_proj_plain(g, clip_dim, ctx)
    else:
        proj = image_proj_resampler(g, clip_hidden, ctx)
    return {"image_proj": proj, "ip_adapter": adapter_layers(g, widths, ctx, kind.startswith("mip"), kv_scale)}


def save_adapter(path, state: dict, fmt: str = "safetensors", dtype=torch.float16):
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        from safetensors.torch import save_file
        flat = {f"{part}.{k}": v.to(dtype).contiguous() for part, sd in state.items() for k, v in sd.items()}
        save_file(flat, str(path))
    else:
        torch.save({part: {k: v.to(dtype) for k, v in sd.items()} for part, sd in state.items()}, str(path))
    return path
