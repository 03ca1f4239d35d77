"""Multi-Reference, Disentangle-Mixing and Foundation-Aware Attention on the DiT families beyond
FLUX.1 and SD3, inside a real ComfyUI: tiny random FLUX.2 (loaded from a file), Chroma and Qwen-Image
(built in-process; tests/tiny_native.py). MRSA's attention in every patched block is recomputed
from the q/k/v the real blocks handed over; empty masks sample like the plain model; FASA's
foundation rows run; DMSA runs on Chroma and refuses FLUX.2 and Qwen-Image clearly. Skipped when no
ComfyUI tree is found (set COMFYUI_PATH)."""
from __future__ import annotations

import pytest
import torch

from comfy_host import import_comfy
from comfy_sampling import encode, snapshot, spy_joint_attention

FLUX2, CHROMA, QWEN = "flux2", "chroma", "qwen"
PRESETS = {FLUX2: ("FLUX.2 dev/klein: single blocks", "FLUX.2 dev/klein: all blocks"),
           CHROMA: ("Chroma: single blocks", "Chroma: all blocks"),
           QWEN: ("Qwen-Image: later half of the blocks", "Qwen-Image: all blocks")}
FASA_PRESET = "FLUX/SD3 FreeCure analogue (last 30% of blocks)"
TEXT_TOKENS = {FLUX2: 512, CHROMA: 77, QWEN: 7}            # FLUX.2 pads every prompt to 512 at the front


class Tiny:
    def __init__(self, name, model, channels, patch, dims, rope, text):
        self.name, self.model, self.channels, self.patch, self.dims, self.rope, self.text = (name, model, channels,
                                                                                             patch, dims, rope, text)

    def latent(self, batch, hw, seed=None):
        shape = (batch, self.channels) + ((1,) if self.dims == 3 else ()) + tuple(hw)
        if seed is None:
            return torch.zeros(shape)
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny(tiny_dir, sd15):
    import_comfy()
    import comfy.sd
    import tiny_native
    from personalize_pack.attention.kernels import Rope
    flux2 = comfy.sd.load_diffusion_model(str(tiny_native.build_flux2(tiny_dir / "diffusion_models" / "tiny_flux2_b.safetensors",
                                                                      depth=2, single=2, seed=21)))
    return {FLUX2: Tiny(FLUX2, flux2, 128, 1, 2, Rope(2000.0, (32, 32, 32, 32)), tiny_native.FLUX2_TEXT),
            CHROMA: Tiny(CHROMA, tiny_native.build_chroma(), 16, 2, 2, Rope(10000.0, (16, 56, 56)), 768),
            QWEN: Tiny(QWEN, tiny_native.build_qwen(), 16, 2, 3, Rope(10000.0, (8, 12, 12)), tiny_native.QWEN_TEXT)}


HW = (8, 8)            # the target latent (FLUX.2: 8x8 tokens; Chroma, Qwen: 4x4)


def text(fam, clip, words, seed):
    """Conditioning of the family's width: the SD1 CLIP for Chroma (768 wide, as the tiny FLUX.1
    tests do), seeded random tokens for FLUX.2 and Qwen-Image (whose text encoders are 7B+ models)."""
    if fam.name == CHROMA:
        return encode(clip, words)
    return [[torch.randn(1, 7, fam.text, generator=torch.Generator().manual_seed(seed)), {}]]


def subjects(fam, clip, masks=True):
    from personalize_pack.references.reference import Reference
    out = []
    for i in range(2):
        mask = torch.zeros(HW[0] * 8, HW[1] * 8)
        if masks:
            mask[8 * i: 40 + 8 * i, 16:56] = 1.0
        cap = text(fam, clip, ("a cat", "a dog")[i], 40 + i)
        out.append(Reference(latent=fam.latent(1, HW, 30 + i), mask=mask, weight=3.0, caption=cap[0][0],
                             caption_pooled=cap[0][1].get("pooled_output"), name=f"ref{i}"))
    return tuple(out)


def sample(fam, model, pos, neg, cfg=1.0, batch=1, steps=2, seed=3):
    import comfy.sample
    latent = fam.latent(batch, HW)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", pos, neg, latent, disable_pbar=True,
                               seed=seed)


def mrsa(model, refs, preset):
    from personalize_pack.nodes.attention import MultiReferenceAttentionNode
    return MultiReferenceAttentionNode.execute(model, refs, preset, "", 0.0, 1.0, 1.0, 0).result[0]


def close(a, b, tol=1e-4):
    return float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


# ---------------------------------------------------------------------------- MRSA

@pytest.mark.parametrize("name", [FLUX2, CHROMA, QWEN])
@pytest.mark.parametrize("cfg,batch", [(1.0, 2), (3.0, 1)])
def test_mrsa_empty_masks_sample_like_plain(tiny, sd15, name, cfg, batch):
    fam, clip = tiny[name], sd15[1]
    pos, neg = text(fam, clip, "a cat and a dog", 1), text(fam, clip, "", 2)
    plain = sample(fam, fam.model, pos, neg, cfg, batch)
    before = snapshot(fam.model)
    empty = sample(fam, mrsa(fam.model, subjects(fam, clip, masks=False), PRESETS[name][1]), pos, neg, cfg, batch)
    assert torch.isfinite(plain).all() and close(empty, plain)
    on = sample(fam, mrsa(fam.model, subjects(fam, clip), PRESETS[name][0]), pos, neg, cfg, batch)
    assert float((on - plain).abs().max()) > 1e-3
    assert snapshot(fam.model) == before


@pytest.mark.parametrize("name", [FLUX2, CHROMA, QWEN])
def test_mrsa_attention_equals_an_independent_computation(tiny, sd15, name, monkeypatch):
    """The q/k/v the family's real blocks hand the override (after QK-norm and RoPE), recomputed:
    the target's image queries over its own keys plus every reference's masked image keys, turned
    beside the target (shifted positions); the text queries and the reference rows plain."""
    from personalize_pack.attention import dit
    from personalize_pack.attention.kernels import joint_reference_attention, merge_heads, select_reference_keys
    from personalize_pack.attention.mrsa import reference_layer_mask
    fam, clip = tiny[name], sd15[1]
    refs = subjects(fam, clip)
    seen = spy_joint_attention(monkeypatch)
    sample(fam, mrsa(fam.model, refs, PRESETS[name][1]), text(fam, clip, "a cat and a dog", 1), text(fam, clip, "", 2),
           steps=1)
    n_blocks = len(fam.model.model.diffusion_model.double_blocks if name != QWEN
                   else fam.model.model.diffusion_model.transformer_blocks)
    assert len({s[0] for s in seen}) == n_blocks + (len(fam.model.model.diffusion_model.single_blocks)
                                                    if name != QWEN else 0)
    grid = (HW[0] // fam.patch, HW[1] // fam.patch)
    N = grid[0] * grid[1]
    rope = dit.RopeGrid(fam.rope, grid)
    for key, T, (q, k, v), out, layout in seen:
        assert layout.mode == "joint" and q.shape[0] == 3 and T == TEXT_TOKENS[name] and q.shape[2] == T + N
        img = slice(T, T + N)
        ks, vs, masks, weights = [], [], [], []
        for r, ref in enumerate(refs):
            row = 1 + layout.rows[(ref, 0)]
            ks.append(rope.beside(merge_heads(k[row:row + 1, :, img])[0], r + 1))
            vs.append(merge_heads(v[row:row + 1, :, img])[0])
            masks.append(reference_layer_mask(ref, N, HW))
            weights.append(ref.weight)
        sel = select_reference_keys(torch.stack(ks), torch.stack(vs), masks, weights)
        heads = q.shape[1]
        want = joint_reference_attention(merge_heads(q[:1]), merge_heads(k[:1]), merge_heads(v[:1]), sel, heads, img)
        torch.testing.assert_close(out[:1], want, atol=2e-5, rtol=1e-4)
        plain = merge_heads(torch.nn.functional.scaled_dot_product_attention(q, k, v))
        torch.testing.assert_close(out[1:], plain[1:], atol=2e-5, rtol=1e-4)


def with_native_references(fam, cond, seeds=(5, 6)):
    """``cond`` with reference latents of the model's own (ReferenceLatent), two of other sizes."""
    import node_helpers
    refs = [fam.latent(1, (4 + 2 * i, 6), s) for i, s in enumerate(seeds)]
    return node_helpers.conditioning_set_values(cond, {"reference_latents": refs}, append=True)


@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_mrsa_and_fasa_with_the_models_own_references(tiny, sd15, cfg, monkeypatch):
    """The pack's references beside FLUX.2's own (ReferenceLatent): every reference row carries the
    target's reference latents, the joint attention holds them after the image tokens, and MRSA's
    image queries attend over them as over any own key (recomputed from the captured q/k/v)."""
    from personalize_pack.attention import dit
    from personalize_pack.attention.kernels import joint_reference_attention, merge_heads, select_reference_keys
    from personalize_pack.attention.mrsa import reference_layer_mask
    from personalize_pack.nodes.attention import FoundationAwareAttentionNode
    fam, clip = tiny[FLUX2], sd15[1]
    pos = with_native_references(fam, text(fam, clip, "a cat and a dog", 1))
    neg = with_native_references(fam, text(fam, clip, "", 2))
    plain = sample(fam, fam.model, pos, neg, cfg)
    assert close(sample(fam, mrsa(fam.model, subjects(fam, clip, masks=False), PRESETS[FLUX2][1]), pos, neg, cfg),
                 plain)
    refs = subjects(fam, clip)
    seen = spy_joint_attention(monkeypatch)
    on = sample(fam, mrsa(fam.model, refs, PRESETS[FLUX2][1]), pos, neg, cfg, steps=1)
    assert torch.isfinite(on).all() and float((on - plain).abs().max()) > 1e-3
    native = 4 * 6 + 6 * 6                           # the two reference latents' tokens (patch 1)
    N = HW[0] * HW[1]
    img = slice(TEXT_TOKENS[FLUX2], TEXT_TOKENS[FLUX2] + N)
    rope = dit.RopeGrid(fam.rope, HW)
    masks = [reference_layer_mask(ref, N, HW) for ref in refs]
    assert seen
    for key, T, (q, k, v), out, layout in seen:
        assert layout.mode == "joint" and q.shape[2] == T + N + native
        rows = [layout.n_target + layout.rows[(ref, 0)] for ref in refs]
        ks = [rope.beside(merge_heads(k[r:r + 1, :, img])[0], i + 1) for i, r in enumerate(rows)]
        vs = [merge_heads(v[r:r + 1, :, img])[0] for r in rows]
        sel = select_reference_keys(torch.stack(ks), torch.stack(vs), masks, [ref.weight for ref in refs])
        cond = layout.target_rows(0)
        want = joint_reference_attention(merge_heads(q[cond]), merge_heads(k[cond]), merge_heads(v[cond]), sel,
                                         q.shape[1], img)
        torch.testing.assert_close(out[cond], want, atol=2e-5, rtol=1e-4)
    found = with_native_references(fam, text(fam, clip, "a man", 3))
    fasa = FoundationAwareAttentionNode.execute(fam.model, torch.zeros(1, 64, 64), foundation=found,
                                                layers=FASA_PRESET, weight=1.5).result[0]
    assert close(sample(fam, fasa, pos, neg, cfg), plain)


def test_presets_belong_to_their_family(tiny, sd15, references):
    refs = subjects(tiny[CHROMA], sd15[1])
    with pytest.raises(ValueError, match="preset 'FLUX dev/schnell: single blocks' is not for this Chroma model"):
        mrsa(tiny[CHROMA].model, refs, "FLUX dev/schnell: single blocks")
    with pytest.raises(ValueError, match="is not for this Qwen-Image model"):
        mrsa(tiny[QWEN].model, subjects(tiny[QWEN], sd15[1]), PRESETS[FLUX2][0])
    with pytest.raises(ValueError, match="is for Chroma models, but this model is a UNet"):
        mrsa(sd15[0], references, PRESETS[CHROMA][0])


# ---------------------------------------------------------------------------- FASA and DMSA

@pytest.mark.parametrize("name", [FLUX2, CHROMA, QWEN])
def test_fasa_runs_and_an_empty_mask_is_plain(tiny, sd15, name):
    from personalize_pack.nodes.attention import FoundationAwareAttentionNode
    fam, clip = tiny[name], sd15[1]
    pos, neg = text(fam, clip, "a man with red hair img", 1), text(fam, clip, "", 2)
    found = text(fam, clip, "a man with red hair", 3)
    mask = torch.zeros(1, 64, 64)
    mask[:, :24, 16:48] = 1.0

    def fasa(m):
        return FoundationAwareAttentionNode.execute(fam.model, m, foundation=found, layers=FASA_PRESET,
                                                    weight=1.5).result[0]

    plain = sample(fam, fam.model, pos, neg, cfg=2.0)
    on = sample(fam, fasa(mask), pos, neg, cfg=2.0)
    assert torch.isfinite(on).all() and float((on - plain).abs().max()) > 1e-3
    assert close(sample(fam, fasa(torch.zeros(1, 64, 64)), pos, neg, cfg=2.0), plain)


def test_dmsa_on_chroma_and_clear_refusals(tiny, sd15):
    from personalize_pack.nodes.attention import DisentangleMixingAttentionNode
    fam, clip = tiny[CHROMA], sd15[1]
    prompt = "a cat on a sofa"
    pos, neg = encode(clip, prompt), encode(clip, "")
    refs = subjects(fam, clip)

    def dmsa(model, refs, **kw):
        args = dict(blend_word="cat", preset="Chroma FreeMix analogue", appearance_start=0.3)
        args.update(kw)
        return DisentangleMixingAttentionNode.execute(model, refs[:1], refs[1:], clip, prompt, **args).result[0]

    plain = sample(fam, fam.model, pos, neg, steps=4)
    both = sample(fam, dmsa(fam.model, refs), pos, neg, steps=4)
    assert torch.isfinite(both).all() and float((both - plain).abs().max()) > 1e-2
    empty = sample(fam, dmsa(fam.model, subjects(fam, clip, masks=False), appearance_phase=False), pos, neg, steps=4)
    assert close(empty, plain)
    for name in (FLUX2, QWEN):
        with pytest.raises(ValueError, match="Disentangle-Mixing Attention does not reach"):
            dmsa(tiny[name].model, subjects(tiny[name], clip))
