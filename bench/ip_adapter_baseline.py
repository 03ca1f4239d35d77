"""The baseline bench_mip.py measures MIP-Adapter against: IP-Adapter's decoupled cross-attention with
one image prompt, ``Attn(q, k, v) + Attn(q, K_ip, V_ip)``, as an attn2 replace on every patched block."""
from __future__ import annotations

COND, UNCOND = 0, 1              # ComfyUI's cond_or_uncond labels


class IPAdapterAttn2:
    """The baseline: IP-Adapter's decoupled cross-attention with one image prompt on one block,
    ``Attn(q, k, v) + Attn(q, K_ip, V_ip)``, as an attn2 replace. ``kv[label] = (K_ip, V_ip)``
    ``[n_tok, C]`` (scale folded into V_ip); the per-batch K_ip/V_ip (cond rows get the cond
    tokens, uncond rows the uncond ones, by ``cond_or_uncond``) are built once per layout and kept
    on the device."""

    def __init__(self, kv: dict, attention):
        self.kv = kv
        self.attention = attention
        self._cache = {}

    def ip_kv(self, labels, rows: int, device, dtype):
        ck = (tuple(labels), rows, str(device), dtype)
        hit = self._cache.get(ck)
        if hit is None:
            import torch
            chunk = rows // len(labels)
            hit = tuple(torch.cat([self.kv[lab][i].unsqueeze(0).expand(chunk, -1, -1) for lab in labels])
                        .to(device, dtype).contiguous() for i in (0, 1))
            self._cache[ck] = hit
        return hit

    def __call__(self, q, k, v, extra_options):
        heads = extra_options["n_heads"]
        labels = list(extra_options.get("cond_or_uncond") or [COND])
        out = self.attention(q, k, v, heads)
        if q.shape[0] % len(labels):
            return out
        ip_k, ip_v = self.ip_kv(labels, q.shape[0], q.device, q.dtype)
        return out + self.attention(q, ip_k, ip_v, heads)


def ip_adapter_kv(prompt, layers: dict, scale: float) -> dict:
    """``{key: {label: (K_ip, V_ip)}}``: one object's tokens projected by each layer's adapter weights."""
    import torch

    out = {}
    with torch.no_grad():
        for key, (wk, wv, _) in layers.items():
            out[key] = {lab: (toks.float() @ wk.float().T, (toks.float() @ wv.float().T) * scale)
                        for lab, toks in ((COND, prompt.tokens), (UNCOND, prompt.uncond_tokens))}
    return out


def install_ip_adapter(model, kv: dict, attention):
    m = model.clone()
    for key, per_label in kv.items():
        m.set_model_attn2_replace(IPAdapterAttn2(per_label, attention), key[0], key[1], key[2])
    return m
