"""Native reference control inside a real ComfyUI, on tiny random models of each family that takes
reference images itself: FLUX.2 (loaded from a file as Load Diffusion Model does), FLUX.1 Kontext
(the FLUX.1 class with reference latents, chained by core's ReferenceLatent) and Qwen-Image-Edit
(built in-process; references as TextEncodeQwenImageEditPlus sets them). The attention of every
controlled block is recomputed from the q/k/v the real blocks handed it; neutral controls sample
like the native model; weight 0 on every reference samples like the model without references; it
stacks with core's FluxKVCache and ModelAttentionBackend, and refuses what it cannot do. Skipped
when no ComfyUI tree is found (set COMFYUI_PATH)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from comfy_host import import_comfy
from comfy_sampling import snapshot

FLUX2, KONTEXT, QWEN = "flux2", "kontext", "qwen"


class Family:
    """A tiny model of one family and how to condition and sample it."""

    def __init__(self, name, model, channels, text, text_width, dims=2):
        self.name, self.model, self.channels, self.text, self.text_width, self.dims = (name, model, channels, text,
                                                                                        text_width, dims)

    def latent(self, batch, hw, seed=0):
        shape = (batch, self.channels) + ((1,) if self.dims == 3 else ()) + tuple(hw)
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed))

    def conditioning(self, refs, seed):
        import node_helpers
        from comfy_extras.nodes_edit_model import ReferenceLatent
        ctx = torch.randn(1, self.text, self.text_width, generator=torch.Generator().manual_seed(seed))
        cond = [[ctx, {}]]
        if self.name == QWEN:           # TextEncodeQwenImageEditPlus sets all its images at once
            return node_helpers.conditioning_set_values(cond, {"reference_latents": list(refs)}, append=True)
        for r in refs:                  # ReferenceLatent, one node per reference
            cond = ReferenceLatent.execute(cond, {"samples": r}).result[0]
        return cond


@pytest.fixture(scope="module")
def families(tiny_dir):
    import_comfy()
    import comfy.sd
    import tiny_flux
    import tiny_native
    flux2 = comfy.sd.load_diffusion_model(str(tiny_native.build_flux2(tiny_dir / "diffusion_models" / "tiny_flux2.safetensors")))
    kontext = comfy.sd.load_diffusion_model(str(tiny_flux.build_flux(tiny_dir / "diffusion_models" / "tiny_kontext.safetensors",
                                                                     heads=2, depth=1, single=1, seed=13)))
    return {FLUX2: Family(FLUX2, flux2, 128, 7, tiny_native.FLUX2_TEXT),
            KONTEXT: Family(KONTEXT, kontext, 16, 7, 768),
            QWEN: Family(QWEN, tiny_native.build_qwen(), 16, 6, tiny_native.QWEN_TEXT, dims=3)}


SIZES = {FLUX2: ((6, 8), [(4, 4), (6, 4)]), KONTEXT: ((12, 16), [(8, 8), (12, 8)]),
         QWEN: ((12, 16), [(8, 8), (12, 8)])}


def refs_of(fam, seed=5):
    return [fam.latent(1, hw, seed + i) for i, hw in enumerate(SIZES[fam.name][1])]


def sample(fam, model, refs, cfg=1.0, batch=1, steps=2, seed=3, neg_refs=None):
    import comfy.sample
    hw = SIZES[fam.name][0]
    latent = torch.zeros_like(fam.latent(batch, hw))
    noise = comfy.sample.prepare_noise(latent, seed)
    pos = fam.conditioning(refs, 1)
    neg = fam.conditioning(refs if neg_refs is None else neg_refs, 2)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", pos, neg, latent, disable_pbar=True,
                               seed=seed)


def pixel_plane(grid, fill, seed):
    """A mask at 4x the token grid of a reference (same aspect), soft values, some zeros."""
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(1, grid[0] * 4, grid[1] * 4, generator=g)
    m[m < fill] = 0.0
    m[:, :4, :4] = 1.0
    return m


def controls_for(fam, weights=(0.6, 2.5), with_masks=True, with_region=True):
    from personalize_pack.nodes.native_refs import NativeReferenceNode
    target_hw, ref_hws = SIZES[fam.name]
    p = fam.model.model.diffusion_model.patch_size
    grids = [(h // p, w // p) for h, w in ref_hws]
    tgt = (target_hw[0] // p, target_hw[1] // p)
    region = torch.zeros(1, tgt[0] * 8, tgt[1] * 8)
    region[:, : tgt[0] * 4] = 1.0                    # the top half of the output
    chain = None
    for i, w in enumerate(weights):
        mask = pixel_plane(grids[i], 0.35, 20 + i) if with_masks else None
        chain = NativeReferenceNode.execute(w, mask, region if with_region and i == 0 else None, chain).result[0]
    return chain


def control(model, chain, start=0.0, end=1.0):
    from personalize_pack.nodes.native_refs import NativeReferenceControlNode
    return NativeReferenceControlNode.execute(model, chain, start, end).result[0]


def recording(monkeypatch):
    """Record (txt_len, q, k, v, mask, options, output) of every controlled attention call."""
    from personalize_pack.attention import native_refs
    log = []
    real = native_refs.NativeReferenceAttention.__call__

    def rec(self, func, *args, **kwargs):
        out = real(self, func, *args, **kwargs)
        mask = args[4] if len(args) > 4 else kwargs.get("mask")
        log.append((self.txt_len, args[0], args[1], args[2], mask, kwargs.get("transformer_options"), out))
        return out

    monkeypatch.setattr(native_refs.NativeReferenceAttention, "__call__", rec)
    return log


def dense(q, k, v, T, N, counts, covers, weights, regions, mask):
    """float64 joint attention with the whole logit matrix (see tests/test_native_refs.py)."""
    q, k, v = (t.detach().double().numpy() for t in (q, k, v))
    B, h, Lq, d = q.shape
    Lk = k.shape[2]
    bias = np.zeros((Lq, Lk))
    start = T + N
    for r, n in enumerate(counts):
        s = np.asarray(covers[r], dtype=np.float64) * weights[r]
        for i in range(min(Lq, T + N)):
            row = s.copy()
            if regions[r] is not None and i >= T and not regions[r][i - T]:
                row[:] = 0.0
            with np.errstate(divide="ignore"):
                bias[i, start:start + n] = np.log(row)
        start += n
    logits = np.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(d) + bias
    if mask is not None:
        m = mask.detach().double().numpy()
        logits = logits + (m.reshape(m.shape[0], 1, 1, Lk) if m.ndim == 3 else m)
    logits -= logits.max(-1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bhkd->bhqd", p, v).transpose(0, 2, 1, 3).reshape(B, Lq, h * d)


def check_log(log, chain, fam, expect_calls, text_len):
    from personalize_pack.references.masks import layer_mask
    target_hw, ref_hws = SIZES[fam.name]
    p = fam.model.model.diffusion_model.patch_size
    grids = [(h // p, w // p) for h, w in ref_hws]
    counts = [a * b for a, b in grids]
    tgt = (target_hw[0] // p, target_hw[1] // p)
    N = tgt[0] * tgt[1]
    covers = [layer_mask(c.mask[0] if c.mask.dim() == 3 else c.mask, *g, soft=True).clamp(0, 1).numpy()
              if c.mask is not None else np.ones(a * b) for c, g, (a, b) in zip(chain, grids, grids)]
    regions = [(layer_mask(c.region, *tgt, soft=False) > 0).numpy() if c.region is not None else None for c in chain]
    assert len(log) == expect_calls
    for T, q, k, v, mask, opts, out in log:
        assert T == text_len and opts["reference_image_num_tokens"] == counts
        assert k.shape[2] == T + N + sum(counts) and q.shape[2] in (T + N, k.shape[2])
        want = dense(q, k, v, T, N, counts, covers, [c.weight for c in chain], regions, mask)
        scale = max(1.0, float(np.abs(want).max()))
        assert float(np.abs(out.detach().double().numpy() - want).max()) <= 2e-5 * scale


def blocks(fam):
    dm = fam.model.model.diffusion_model
    return len(getattr(dm, "double_blocks", getattr(dm, "transformer_blocks", []))) + len(getattr(dm, "single_blocks", []))


TEXT = {FLUX2: 512, KONTEXT: 7, QWEN: 6}          # FLUX.2 pads its text to 512 tokens


# ---------------------------------------------------------------------------- the controlled attention

@pytest.mark.parametrize("name", [FLUX2, KONTEXT, QWEN])
@pytest.mark.parametrize("cfg,batch", [(1.0, 2), (3.0, 1)])
def test_attention_equals_an_independent_computation(families, monkeypatch, name, cfg, batch):
    fam = families[name]
    chain = controls_for(fam)
    log = recording(monkeypatch)
    out = sample(fam, control(fam.model, chain), refs_of(fam), cfg=cfg, batch=batch)
    assert torch.isfinite(out).all()
    calls = 2 * blocks(fam)                       # 2 steps; cond and uncond share one call when CFG is on
    check_log(log, chain, fam, calls, TEXT[name])
    if cfg > 1:
        assert all(len(opts["cond_or_uncond"]) == 2 for *_, opts, _ in log)


@pytest.mark.parametrize("name", [FLUX2, KONTEXT, QWEN])
def test_neutral_controls_sample_like_the_native_model(families, name):
    from personalize_pack.attention.native_refs import ReferenceControl
    fam = families[name]
    refs = refs_of(fam)
    neutral = (ReferenceControl(torch.ones(16, 16)), ReferenceControl())
    before = snapshot(fam.model)
    native = sample(fam, fam.model, refs, cfg=2.0)
    torch.testing.assert_close(sample(fam, control(fam.model, neutral), refs, cfg=2.0), native, atol=0, rtol=0)
    changed = sample(fam, control(fam.model, controls_for(fam)), refs, cfg=2.0)
    assert float((changed - native).abs().max()) > 1e-3
    assert snapshot(fam.model) == before
    assert "personalize" not in fam.model.model_options.get("transformer_options", {})


@pytest.mark.parametrize("name", [FLUX2, KONTEXT, QWEN])
def test_weight_zero_everywhere_samples_like_no_references(families, name):
    """The target never reads a reference it may not attend, so its tokens evolve as without
    references (the reference tokens still run, unread)."""
    fam = families[name]
    zero = controls_for(fam, weights=(0.0, 0.0), with_region=False)
    without = sample(fam, fam.model, [])
    got = sample(fam, control(fam.model, zero), refs_of(fam))
    torch.testing.assert_close(got, without, atol=2e-5, rtol=1e-4)


def test_start_and_end_percent_gate_by_sigma(families, monkeypatch):
    fam = families[KONTEXT]
    log = recording(monkeypatch)
    sample(fam, control(fam.model, controls_for(fam), 0.5, 1.0), refs_of(fam), steps=4)
    assert 0 < len(log) < 4 * blocks(fam)


# ---------------------------------------------------------------------------- stacking

@pytest.mark.parametrize("name", [FLUX2, QWEN])
def test_stacks_with_core_kv_cache(families, monkeypatch, name):
    from comfy_extras.nodes_flux import FluxKVCache
    fam = families[name]
    refs = refs_of(fam)
    cached = FluxKVCache.execute(fam.model).result[0]
    from personalize_pack.attention.native_refs import ReferenceControl
    neutral = (ReferenceControl(), ReferenceControl())
    torch.testing.assert_close(sample(fam, control(cached, neutral), refs), sample(fam, cached, refs), atol=0, rtol=0)
    chain = controls_for(fam)
    log = recording(monkeypatch)
    out = sample(fam, FluxKVCache.execute(control(fam.model, chain)).result[0], refs, steps=3)
    assert torch.isfinite(out).all()
    assert any(q.shape[2] < k.shape[2] for _, q, k, *_ in log)      # later steps: cached reference keys only
    check_log(log, chain, fam, 3 * blocks(fam), TEXT[name])


def test_stacks_with_core_attention_backend(families, monkeypatch):
    import comfy.ldm.modules.attention as attention
    from comfy_extras.nodes_model_advanced import ModelAttentionBackend
    fam = families[FLUX2]
    refs = refs_of(fam)
    seen = []
    real = attention.get_attention_function("pytorch")

    def backend(*args, **kwargs):
        seen.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(attention, "get_attention_function", lambda name, default=None: backend)
    chosen = ModelAttentionBackend().patch(fam.model, "pytorch attention")[0]
    chain = controls_for(fam)
    plain = sample(fam, control(fam.model, chain), refs)
    seen.clear()
    both = sample(fam, control(chosen, chain), refs)
    assert len(seen) > 2 * blocks(fam)            # the backend computed every query group
    torch.testing.assert_close(both, plain, atol=1e-5, rtol=1e-4)


def test_refuses_what_it_cannot_do(families, sd15):
    from personalize_pack.nodes.attention import MultiReferenceAttentionNode
    from personalize_pack.attention.native_refs import ReferenceControl
    fam = families[KONTEXT]
    chain = controls_for(fam)
    with pytest.raises(ValueError, match="received 2 reference image.*3 reference control"):
        sample(fam, control(fam.model, chain + (ReferenceControl(),)), refs_of(fam))
    with pytest.raises(ValueError, match="positive conditioning reaches the model without reference images"):
        sample(fam, control(fam.model, chain), [])
    with pytest.raises(ValueError, match="UNet.*takes no reference images"):
        control(sd15[0], chain)
    with pytest.raises(ValueError, match="already carries a Native Reference Control"):
        control(control(fam.model, chain), chain)
    ref = _flux_reference(fam)
    mrsa = MultiReferenceAttentionNode.execute(fam.model, (ref,), "FLUX dev/schnell: single blocks", "", 0.0, 1.0, 1.0,
                                               0).result[0]
    with pytest.raises(ValueError, match="Native Reference Control and FreeCustom MRSA both rewrite"):
        control(mrsa, chain)


def _flux_reference(fam):
    from personalize_pack.references.reference import Reference
    lat = fam.latent(1, (8, 8), 9)
    return Reference(latent=lat, mask=torch.ones(1, 64, 64), weight=3.0, caption=None, caption_pooled=None)
