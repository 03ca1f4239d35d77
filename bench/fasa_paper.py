"""FreeCure's foundation-aware self-attention as the official code lays it out, for bench_fasa.py to
compare the pack against: the explicit-softmax kernel over own + foundation keys (``explicit_mrsa``), the
attn1 replace in FreeCure's row layout (``PaperFASA``) and the model patched that way
(``install_paper_layout``)."""
from __future__ import annotations

COND, UNCOND = 0, 1              # ComfyUI's cond_or_uncond labels


def token_hw(n_tokens: int, height: int, width: int) -> tuple[int, int]:
    """The (h, w) grid of a layer with ``n_tokens`` tokens in a UNet whose latent is height x width
    (each downsampling halves, rounding up)."""
    h, w = height, width
    while h * w > n_tokens:
        h, w = -(-h // 2), -(-w // 2)
    if h * w != n_tokens:
        raise ValueError(f"{n_tokens} tokens do not fit a {height}x{width} latent")
    return h, w


def row_runs(rows):
    """Contiguous runs of sorted row indices as (start, stop) pairs."""
    runs = []
    for r in sorted(rows):
        if runs and runs[-1][1] == r:
            runs[-1][1] = r + 1
        else:
            runs.append([r, r + 1])
    return [tuple(x) for x in runs]


def explicit_mrsa(q, k, v, k_ref, v_ref, ref_bias, heads):
    """FreeCure's FASA kernel (FreeCustom's MRSA with one reference, docs/algorithms.md §0.3),
    written the way the official code computes it: keys and values of the own rows and of the
    reference concatenated along tokens, the full ``[B, h, N, 2N]`` logits by einsum, the bias
    ``ref_bias`` (``w*m`` inside the mask, ``finfo.min`` outside) added to the reference block, an
    explicit softmax and a second einsum with the values. ``q, k, v, k_ref, v_ref``: ``[B, N, h*d]``."""
    import torch

    b, n, c = q.shape
    d = c // heads
    split = lambda x: x.reshape(x.shape[0], x.shape[1], heads, d).permute(0, 2, 1, 3)
    kk = torch.cat([k, k_ref], dim=1)
    vv = torch.cat([v, v_ref], dim=1)
    sim = torch.einsum("bhid,bhjd->bhij", split(q), split(kk)) * d ** -0.5
    sim[..., n:] += ref_bias.to(sim.dtype)
    attn = sim.softmax(dim=-1)
    out = torch.einsum("bhij,bhjd->bhid", attn, split(vv))
    return out.permute(0, 2, 1, 3).reshape(b, n, c)


class PaperFASA:
    """attn1 replace in FreeCure's layout: every chunk of ``cond_or_uncond`` is ``[personalised B,
    foundation B]``; the personalised cond rows run ``explicit_mrsa`` against the foundation rows of
    the same chunk, every other row ``attention(q, k, v, heads)``. The mask ``[H, W]`` (image space)
    is nearest-resized to the layer's token grid at every call, as FreeCure does."""

    def __init__(self, mask, weight: float, attention):
        self.mask = mask.float()
        self.weight = float(weight)
        self.attention = attention
        self.labels_seen = None

    def ref_bias(self, n_tokens, latent_hw, device, dtype):
        import torch
        import torch.nn.functional as F

        h, w = token_hw(n_tokens, *latent_hw)
        m = F.interpolate(self.mask[None, None], size=(h, w), mode="nearest").flatten().to(device, dtype)
        return torch.where(m != 0, self.weight * m, torch.full_like(m, torch.finfo(dtype).min))

    def __call__(self, q, k, v, extra_options):
        import torch

        heads = extra_options["n_heads"]
        labels = list(extra_options.get("cond_or_uncond") or [])
        rows = q.shape[0]
        if not labels or rows % (2 * len(labels)):
            return self.attention(q, k, v, heads)
        self.labels_seen = labels
        chunk = rows // len(labels)
        half = chunk // 2
        pers = [j * chunk for j, lab in enumerate(labels) if lab == COND]     # first row of each block
        special = {s + i for s in pers for i in range(half)}
        out = torch.empty_like(q)
        for a, b in row_runs(i for i in range(rows) if i not in special):
            out[a:b] = self.attention(q[a:b], k[a:b], v[a:b], heads)
        if pers and self.weight != 0:
            bias = self.ref_bias(q.shape[1], tuple(extra_options["original_shape"][-2:]), q.device, q.dtype)
        for s in pers:
            p, f = slice(s, s + half), slice(s + half, s + chunk)
            out[p] = explicit_mrsa(q[p], k[p], v[p], k[f], v[f], bias, heads) if self.weight != 0 else \
                self.attention(q[p], k[p], v[p], heads)
        return out


def paper_conditioning(foundation):
    """APPLY_MODEL wrapper: the foundation rows (second half of every cond chunk) get the
    foundation conditioning ``[1, T, D]``."""

    def wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        labels = list(transformer_options.get("cond_or_uncond") or [])
        if c_crossattn is not None and labels and x.shape[0] % (2 * len(labels)) == 0:
            chunk = x.shape[0] // len(labels)
            f = foundation.to(c_crossattn.device, c_crossattn.dtype)
            if f.shape[1] != c_crossattn.shape[1]:
                raise ValueError("the foundation conditioning must have the prompt's token count")
            ctx = c_crossattn.clone()
            for j, lab in enumerate(labels):
                if lab == COND:
                    ctx[j * chunk + chunk // 2:(j + 1) * chunk] = f
            c_crossattn = ctx
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    return wrapper


def install_paper_layout(model, keys, mask, weight, attention, foundation):
    from comfy.patcher_extension import WrappersMP

    m = model.clone()
    replace = PaperFASA(mask, weight, attention)
    for key in keys:
        m.set_model_attn1_replace(replace, key[0], key[1], key[2])
    m.add_wrapper_with_key(WrappersMP.APPLY_MODEL, "bench.paper_foundation", paper_conditioning(foundation))
    return m, replace
