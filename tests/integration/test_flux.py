"""MRSA, DMSA and FASA on FLUX and SD3 inside a real ComfyUI: a tiny random FLUX model (2 heads of
128 channels, 2 double and 2 single blocks, text width 768 so the SD1 CLIP of the tiny checkpoint
conditions it) sampled patched and unpatched, with guidance distillation (cfg 1, no uncond pass)
and with true CFG; and a tiny SD3-family MMDiT (3 joint blocks, the first with SD3.5-medium's
second image-only attention). Skipped when no ComfyUI tree is found (set COMFYUI_PATH)."""
from __future__ import annotations

import copy

import pytest
import torch

from comfy_host import import_comfy
from comfy_sampling import encode, snapshot, spy_joint_attention, tiny_diffusion_model
from comfy_techniques import FLUX_ALL as ALL
from comfy_techniques import FLUX_DOUBLE as DOUBLE
from comfy_techniques import FLUX_SINGLE as SINGLE
from comfy_techniques import flux_dmsa as dmsa
from comfy_techniques import flux_mrsa as mrsa
from comfy_techniques import flux_prompts as prompts
from comfy_techniques import flux_sample, guided


@pytest.fixture(scope="session")
def schnell(tiny_dir):
    return tiny_diffusion_model(tiny_dir, "build_flux", "tiny_flux_schnell.safetensors", heads=2, depth=2, single=2,
                                guidance=False, seed=7)


@pytest.fixture(scope="session")
def clip(sd15):
    return sd15[1]


def zero_masked(refs):
    from personalize_pack.references.reference import Reference
    return tuple(Reference(latent=r.latent, mask=torch.zeros_like(r.mask), weight=r.weight, caption=r.caption,
                           caption_pooled=r.caption_pooled) for r in refs)


def close(a, b, tol=1e-4):
    scale = max(1.0, float(b.abs().max()))
    return float((a - b).abs().max()) <= tol * scale


# ---------------------------------------------------------------------------- MRSA

@pytest.mark.parametrize("preset,cfg,batch", [(SINGLE, 1.0, 1), (ALL, 1.0, 2), (ALL, 2.5, 1), (DOUBLE, 2.5, 2)])
def test_empty_masks_sample_like_plain(flux, clip, flux_refs, preset, cfg, batch):
    pos, neg = prompts(clip)
    plain = flux_sample(flux, pos, neg, cfg=cfg, batch=batch)
    empty = flux_sample(mrsa(flux, zero_masked(flux_refs), preset), pos, neg, cfg=cfg, batch=batch)
    assert torch.isfinite(plain).all()
    assert close(empty, plain)


def test_references_change_sampling_and_input_model_is_untouched(flux, schnell, clip, flux_refs):
    pos, neg = prompts(clip)
    before = snapshot(flux)
    plain = flux_sample(flux, pos, neg)
    m = mrsa(flux, flux_refs)
    on = flux_sample(m, pos, neg)
    assert (on - plain).abs().max() > 1e-2
    assert snapshot(flux) == before
    assert "personalize" not in flux.model_options.get("transformer_options", {})
    assert not flux.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit")
    torch.testing.assert_close(flux_sample(flux, pos, neg), plain)
    # where the reference tokens sit matters; both give finite samples
    aligned = flux_sample(mrsa(flux, flux_refs, positions="aligned"), pos, neg)
    assert torch.isfinite(aligned).all() and (aligned - on).abs().max() > 1e-3
    # FLUX schnell: no guidance embedding, cfg 1
    s_plain = flux_sample(schnell, encode(clip, "a cat"), encode(clip, ""), steps=2)
    s_on = flux_sample(mrsa(schnell, flux_refs), encode(clip, "a cat"), encode(clip, ""), steps=2)
    assert torch.isfinite(s_on).all() and (s_on - s_plain).abs().max() > 1e-2


def test_patched_attention_on_the_real_model_equals_an_independent_computation(flux, clip, flux_refs, monkeypatch):
    """Capture the q/k/v ComfyUI's FLUX blocks hand to the override in one patched model call (after
    QK-norm and RoPE) and recompute the target's output from them with the kernel and the masks."""
    from personalize_pack.attention import dit
    from personalize_pack.attention.kernels import joint_reference_attention, merge_heads, select_reference_keys
    from personalize_pack.attention.mrsa import reference_layer_mask

    seen = spy_joint_attention(monkeypatch)
    pos, neg = prompts(clip)
    flux_sample(mrsa(flux, flux_refs, ALL), pos, neg, steps=1)
    assert {s[0] for s in seen} == {("double_block", 0), ("double_block", 1), ("single_block", 0), ("single_block", 1)}
    rope = dit.RopeGrid(dit.Rope(10000.0, (16, 56, 56)), (4, 4))
    for key, T, (q, k, v), out, layout in seen:
        assert layout.mode == "joint" and layout.n_target == 1 and q.shape[0] == 3     # target + 2 references
        assert T == 77 and q.shape[2] == 77 + 16
        img = slice(T, T + 16)
        ks, vs, masks, weights = [], [], [], []
        for r, ref in enumerate(flux_refs):
            row = 1 + layout.rows[(ref, 0)]
            ks.append(rope.beside(merge_heads(k[row:row + 1, :, img])[0], r + 1))
            vs.append(merge_heads(v[row:row + 1, :, img])[0])
            masks.append(reference_layer_mask(ref, 16, (8, 8)))
            weights.append(ref.weight)
        refs = select_reference_keys(torch.stack(ks), torch.stack(vs), masks, weights)
        want = joint_reference_attention(merge_heads(q[:1]), merge_heads(k[:1]), merge_heads(v[:1]), refs, 2, img)
        torch.testing.assert_close(out[:1], want, atol=2e-5, rtol=1e-4)
        plain = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        torch.testing.assert_close(out[1:], merge_heads(plain[1:]), atol=2e-5, rtol=1e-4)   # reference rows plain
        torch.testing.assert_close(out[:1, :T], merge_heads(plain[:1])[:, :T], atol=2e-5, rtol=1e-4)  # text untouched


def test_reference_rows_skip_blocks_after_the_last_patched_one_exactly(flux, clip, flux_refs, monkeypatch):
    from personalize_pack.attention import dit_blocks
    pos, neg = prompts(clip)
    batches = []
    m = mrsa(flux, flux_refs, DOUBLE)
    original = dit_blocks.PersonalizeBlock._call

    def spy(self, args, extra):
        batches.append((self.key, args["img"].shape[0]))
        return original(self, args, extra)

    monkeypatch.setattr(dit_blocks.PersonalizeBlock, "_call", spy)
    skipped = flux_sample(m, pos, neg, steps=2)
    assert ("single_block", 0, 1) in {(k[0], k[1], b) for k, b in batches}        # the target row alone
    assert ("double_block", 1, 3) in {(k[0], k[1], b) for k, b in batches}
    monkeypatch.setattr(dit_blocks.PersonalizeBlock, "_targets_only", lambda self, args, extra, layout: self._call(args, extra))
    full = flux_sample(m, pos, neg, steps=2)
    assert close(skipped, full, 1e-5)


def test_separate_pass_and_caption_lengths(flux, clip, flux_refs):
    """Another pack's block replace makes the references run in a call of their own (record, then
    read); a caption of another length than the prompt runs in its own call too. Both sample like the
    joint layout, up to rounding."""
    from personalize_pack.references.reference import Reference
    pos, neg = prompts(clip)
    joint = flux_sample(mrsa(flux, flux_refs, ALL), pos, neg)
    other = flux.clone()
    calls = []

    def foreign(args, extra):
        calls.append(1)
        return extra["original_block"](args)

    other.set_model_patch_replace(foreign, "dit", "single_block", 1)
    separate = flux_sample(mrsa(other, flux_refs, ALL), pos, neg)
    assert calls and close(separate, joint, 1e-4)
    long_caption = encode(clip, " ".join(["a small grey cat"] * 30))              # 154 tokens, the prompt 77
    assert long_caption[0][0].shape[1] == 154
    r0 = flux_refs[0]
    refs = (Reference(latent=r0.latent, mask=r0.mask, weight=r0.weight, caption=long_caption[0][0],
                      caption_pooled=long_caption[0][1]["pooled_output"]), flux_refs[1])
    mixed = flux_sample(mrsa(flux, refs, ALL), pos, neg)
    assert torch.isfinite(mixed).all() and (mixed - joint).abs().max() > 1e-4
    assert close(flux_sample(mrsa(flux, zero_masked(refs), ALL), pos, neg), flux_sample(flux, pos, neg))


def test_true_cfg_style_fidelity_acts_on_the_uncond_pass(flux, clip, flux_refs):
    pos, neg = prompts(clip)
    a = flux_sample(mrsa(flux, flux_refs), pos, neg, cfg=2.5)
    b = flux_sample(mrsa(flux, flux_refs, style_fidelity=0.5), pos, neg, cfg=2.5)
    assert (a - b).abs().max() > 1e-4
    # at cfg 1 ComfyUI runs no uncond pass, so style fidelity has nothing to act on
    c = flux_sample(mrsa(flux, flux_refs), pos, neg)
    d = flux_sample(mrsa(flux, flux_refs, style_fidelity=0.5), pos, neg)
    assert close(c, d, 1e-6)


# ---------------------------------------------------------------------------- DMSA and FASA

def test_dmsa_on_flux(flux, clip, flux_refs):
    prompt = "a cat on a sofa"
    pos, neg = guided(encode(clip, prompt)), guided(encode(clip, ""))
    s, a = (flux_refs[0],), (flux_refs[1],)
    plain = flux_sample(flux, pos, neg, steps=4)
    both = flux_sample(dmsa(flux, clip, s, a, prompt), pos, neg, steps=4)
    structure_only = flux_sample(dmsa(flux, clip, s, a, prompt, appearance_phase=False), pos, neg, steps=4)
    assert torch.isfinite(both).all()
    assert (both - plain).abs().max() > 1e-2 and (both - structure_only).abs().max() > 1e-4
    empty = flux_sample(dmsa(flux, clip, zero_masked(s), a, prompt, appearance_phase=False), pos, neg, steps=4)
    assert close(empty, plain)
    with pytest.raises(ValueError, match="is for UNet models, but this is a FLUX model"):
        dmsa(flux, clip, s, a, prompt, preset="SD1.5 FreeMix")


def fasa(model, masks, foundation, **kw):
    from personalize_pack.nodes.attention import FoundationAwareAttentionNode
    args = dict(layers="FLUX/SD3 FreeCure analogue (last 30% of blocks)", weight=1.5)
    args.update(kw)
    return FoundationAwareAttentionNode.execute(model, masks, foundation=foundation, **args).result[0]


def test_fasa_on_flux(flux, clip):
    pos = guided(encode(clip, "a photo of a man with red hair img"))
    found = guided(encode(clip, "a photo of a man with red hair"))
    neg = guided(encode(clip, ""))
    mask = torch.zeros(1, 64, 64)
    mask[:, :24, 16:48] = 1
    plain = flux_sample(flux, pos, neg)
    on = flux_sample(fasa(flux, mask, found), pos, neg)
    assert torch.isfinite(on).all() and on.shape == plain.shape and (on - plain).abs().max() > 1e-3
    empty = flux_sample(fasa(flux, torch.zeros(1, 64, 64), found), pos, neg)
    assert close(empty, plain)
    # the foundation branch without the identity patches: another pack's block replace is dropped there
    ident = flux.clone()
    rows = []

    def identity_patch(args, extra):
        rows.append(args["img"].shape[0])
        out = extra["original_block"](args)
        return {"img": out["img"] + 0.05, "txt": out["txt"]}

    ident.set_model_patch_replace(identity_patch, "dit", "double_block", 0)
    stripped = flux_sample(fasa(ident, mask, None, foundation_mode="model without identity patches (InstantID-style)"),
                           pos, neg)
    assert torch.isfinite(stripped).all() and rows and set(rows) == {1}          # personalised rows only
    with pytest.raises(ValueError, match="is for UNet models, but this is a FLUX model"):
        fasa(flux, mask, found, layers="SD1.5 FreeCure (output 6-11)")
    # the foundation text joins the joint attention: another length than the prompt's is an error
    long_found = guided(encode(clip, " ".join(["a photo of a man with red hair"] * 12)))
    with pytest.raises(ValueError, match="foundation: its conditioning has 154 text tokens but the prompt has 77"):
        flux_sample(fasa(flux, mask, long_found), pos, neg)


# ---------------------------------------------------------------------------- bad input

def test_bad_input_is_a_clear_error(flux, sd15, clip, flux_refs, references):
    model = sd15[0]
    with pytest.raises(ValueError, match="is for UNet models, but this is a FLUX model"):
        mrsa(flux, flux_refs, "SD1.5 FreeCustom (output 6-11)")
    with pytest.raises(ValueError, match="is for FLUX models, but this model is a UNet"):
        mrsa(model, references, SINGLE)
    with pytest.raises(ValueError, match="custom_blocks: this FLUX model has double blocks 0-1 and single blocks "
                                         "0-1; it lacks single:2"):
        mrsa(flux, flux_refs, "custom", custom_blocks="single:0-5")
    with pytest.raises(ValueError, match="4-channel latents, but this model .* 16-channel"):
        mrsa(flux, references, SINGLE)
    from personalize_pack.nodes.attention import MultiReferenceAttentionNode
    fake = flux.clone()
    Wan = type("WanModel", (torch.nn.Module,), {"__module__": "comfy.ldm.wan.model"})
    fake.model = copy.copy(flux.model)
    object.__setattr__(fake.model, "diffusion_model", Wan())
    with pytest.raises(ValueError, match="WanModel .*not supported yet"):
        MultiReferenceAttentionNode.execute(fake, flux_refs, SINGLE, "", 0.0, 1.0, 1.0, 0)
    with pytest.raises(ValueError, match="reference_positions: unknown"):
        mrsa(flux, flux_refs, positions="sideways")
    with pytest.raises(ValueError, match="preset 'SD3/SD3.5: all joint blocks' is not for this FLUX model"):
        mrsa(flux, flux_refs, "SD3/SD3.5: all joint blocks")
    with pytest.raises(ValueError, match="is for DiT models, but this model is a UNet"):
        dmsa(model, clip, references[:1], references[1:], "a cat on a sofa")
    with pytest.raises(ValueError, match=r"is for DiT models \(FLUX, FLUX.2, Chroma, Qwen-Image, SD3\), but this model is a UNet"):
        fasa(model, torch.ones(1, 64, 64), encode(clip, "a man"))


# ---------------------------------------------------------------------------- SD3 (MMDiT)

SD3_LATE = "SD3/SD3.5: later half of the joint blocks"
SD3_ALL = "SD3/SD3.5: all joint blocks"


@pytest.fixture(scope="session")
def sd3(tiny_dir):
    return tiny_diffusion_model(tiny_dir, "build_sd3", "tiny_sd3.safetensors", depth=3, self_attn_layers=(0,))


def test_sd3_mrsa(sd3, clip, flux_refs, monkeypatch):
    from personalize_pack.attention import dit_blocks
    pos, neg = encode(clip, "a cat and a dog on a sofa"), encode(clip, "blurry")
    before = snapshot(sd3)
    plain = flux_sample(sd3, pos, neg, cfg=4.0)
    for preset in (SD3_LATE, SD3_ALL):
        assert close(flux_sample(mrsa(sd3, zero_masked(flux_refs), preset), pos, neg, cfg=4.0), plain)
    calls = []
    original = dit_blocks.JointAttention.__call__

    def spy(self, func, *args, **kwargs):
        calls.append((self.key, self.calls, args[0].shape))
        return original(self, func, *args, **kwargs)

    monkeypatch.setattr(dit_blocks.JointAttention, "__call__", spy)
    on = flux_sample(mrsa(sd3, flux_refs, SD3_ALL), pos, neg, cfg=4.0)
    assert torch.isfinite(on).all() and (on - plain).abs().max() > 1e-2
    # block 0 has a second, image-only attention: it reaches the override and is passed through plain
    assert {(k, n) for k, n, _ in calls} >= {(("double_block", 0), 0), (("double_block", 0), 1), (("double_block", 2), 0)}
    assert calls[0][2][1] == 77 + 16          # SD3 hands [B, text + image tokens, heads * 64]
    assert snapshot(sd3) == before
    with pytest.raises(ValueError, match="not for this SD3 model"):
        mrsa(sd3, flux_refs, SINGLE)
    with pytest.raises(ValueError, match="lacks double:3"):
        mrsa(sd3, flux_refs, "custom", custom_blocks="joint:1-3")


def test_sd3_dmsa_and_fasa(sd3, clip, flux_refs):
    prompt = "a cat on a sofa"
    pos, neg = encode(clip, prompt), encode(clip, "")
    plain = flux_sample(sd3, pos, neg, cfg=4.0, steps=4)
    mixed = flux_sample(dmsa(sd3, clip, (flux_refs[0],), (flux_refs[1],), prompt, preset="SD3/SD3.5 FreeMix analogue"),
                        pos, neg, cfg=4.0, steps=4)
    assert torch.isfinite(mixed).all() and (mixed - plain).abs().max() > 1e-2
    mask = torch.zeros(1, 64, 64)
    mask[:, :24, 16:48] = 1
    found = encode(clip, "a cat")
    on = flux_sample(fasa(sd3, mask, found), pos, neg, cfg=4.0)
    empty = flux_sample(fasa(sd3, torch.zeros(1, 64, 64), found), pos, neg, cfg=4.0)
    plain3 = flux_sample(sd3, pos, neg, cfg=4.0)
    assert (on - plain3).abs().max() > 1e-3 and close(empty, plain3)


def test_blend_word_is_found_among_flux_t5_tokens():
    """FLUX's text tokens are T5's (padded to 256): the blend word's position there differs from its
    CLIP position, and the DMSA node looks it up among the T5 tokens for FLUX."""
    import_comfy()
    from comfy.text_encoders.flux import FluxTokenizer

    from personalize_pack.references.prompt_tokens import blend_word_tokens
    tokenizer = FluxTokenizer()
    clip = type("FluxClip", (), {"tokenize": lambda self, text: tokenizer.tokenize_with_weights(text)})()
    ids = [t for t, _ in tokenizer.tokenize_with_weights("a photo of a dog on a sofa")["t5xxl"][0]]
    positions, length = blend_word_tokens(clip, "a photo of a dog on a sofa", "dog", ("t5xxl", "l"))
    assert length == 256 and positions == [6] and ids[6] == 1782          # "▁a" is two T5 tokens
    assert blend_word_tokens(clip, "a photo of a dog on a sofa", "dog", ("l",)) == ([5], 77)


@pytest.mark.parametrize("preset", [SINGLE, DOUBLE])
def test_subject_only_references(flux, clip, flux_refs, preset, monkeypatch):
    """'subject only' runs each reference alone on the tokens its mask touches (a FLUX post_input
    patch), stopping after the last patched block. With full masks that is the whole-image
    computation (up to rounding); with the real masks the reference calls are smaller."""
    from personalize_pack.attention import dit, dit_blocks
    from personalize_pack.references.reference import Reference
    pos, neg = prompts(clip)
    full = tuple(Reference(latent=r.latent, mask=torch.ones_like(r.mask), weight=r.weight, caption=r.caption,
                           caption_pooled=r.caption_pooled) for r in flux_refs)
    whole = flux_sample(mrsa(flux, full, preset), pos, neg)
    subject = flux_sample(mrsa(flux, full, preset, reference_tokens="subject only (faster)"), pos, neg)
    assert close(subject, whole, 1e-5)
    tokens = []
    original = dit_blocks.JointAttention.__call__

    def spy(self, func, *args, **kwargs):
        tokens.append((getattr(self.layout, "mode", None), args[0].shape[0], args[0].shape[2]))
        return original(self, func, *args, **kwargs)

    monkeypatch.setattr(dit_blocks.JointAttention, "__call__", spy)
    masked = flux_sample(mrsa(flux, flux_refs, preset, reference_tokens="subject only (faster)"), pos, neg, cfg=2.5)
    assert torch.isfinite(masked).all()
    want = {int(dit.subject_tokens(r, (8, 8), dit.DiTSpec("flux", 2, 2, 2, None)).numel()) for r in flux_refs}
    recorded = {n - 77 for mode, b, n in tokens if mode == "record"}
    assert recorded == want and max(want) < 16                 # each reference on its subject's tokens only
    assert {(b, n) for mode, b, n in tokens if mode == "read"} == {(2, 77 + 16)}   # cond + uncond target rows
    with pytest.raises(ValueError, match="reference_tokens: unknown"):
        mrsa(flux, flux_refs, reference_tokens="half")
