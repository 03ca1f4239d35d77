"""MRSA inside a real ComfyUI: tiny random-weight SD1.5- and SDXL-shaped models sampled with and
without the patch. Skipped when no ComfyUI tree is found (set COMFYUI_PATH)."""
from __future__ import annotations


import pytest
import torch

from comfy_sampling import assert_same_sample, encode, load_image, ref_node, sample, snapshot
from comfy_techniques import mrsa_patch as patch



def zero_masked(refs):
    from personalize_pack.references.reference import Reference
    return tuple(Reference(latent=r.latent, mask=torch.zeros_like(r.mask), weight=r.weight, caption=r.caption)
                 for r in refs)


@pytest.mark.parametrize("batch,cfg", [(1, 5.0), (2, 5.0), (1, 1.0)])
def test_zero_masks_sample_like_plain(sd15, references, batch, cfg):
    model, clip, vae = sd15
    pos, neg = encode(clip, "a cat and a dog on a sofa"), encode(clip, "blurry")
    plain = sample(model, pos, neg, batch=batch, cfg=cfg)
    patched = sample(patch(model, zero_masked(references)), pos, neg, batch=batch, cfg=cfg)
    assert torch.isfinite(plain).all()
    assert_same_sample(patched, plain, vae)


def test_references_change_the_sample_and_input_model_is_untouched(sd15, references):
    model, clip, _ = sd15
    before = snapshot(model)
    pos, neg = encode(clip, "a cat and a dog on a sofa"), encode(clip, "blurry")
    plain = sample(model, pos, neg)
    m = patch(model, references)
    patched = sample(m, pos, neg)
    assert (patched - plain).abs().max() > 1e-3
    assert snapshot(model) == before
    assert "personalize" not in model.model_options.get("transformer_options", {})
    # ComfyUI's memory estimate of the patched model counts the two reference rows (batch 1 + CFG)
    base = model.get_model_object("memory_usage_factor")
    assert m.get_model_object("memory_usage_factor") == pytest.approx(base * 2.0)
    assert "memory_usage_factor" not in model.object_patches
    stacked = patch(m, references[:1])
    assert stacked.get_model_object("memory_usage_factor") == pytest.approx(base * 2.5)
    again = sample(model, pos, neg)
    torch.testing.assert_close(again, plain)


def test_two_patched_models_do_not_leak(sd15, references):
    model, clip, _ = sd15
    pos, neg = encode(clip, "a cat and a dog on a sofa"), encode(clip, "blurry")
    a = patch(model, references[:1])
    b = patch(model, references[1:])
    sa = sample(a, pos, neg)
    sb = sample(b, pos, neg)
    sa2 = sample(a, pos, neg)
    assert (sa - sb).abs().max() > 1e-3
    torch.testing.assert_close(sa2, sa)


@pytest.mark.parametrize("sampler,scheduler,steps", [("dpmpp_2m", "karras", 4), ("heun", "normal", 2),
                                                     ("ddim", "ddim_uniform", 3)])
def test_any_sampler_and_step_range(sd15, references, sampler, scheduler, steps):
    model, clip, _ = sd15
    pos, neg = encode(clip, "a dog"), encode(clip, "")
    plain = sample(model, pos, neg, steps=steps, sampler=sampler, scheduler=scheduler)
    on = sample(patch(model, references), pos, neg, steps=steps, sampler=sampler, scheduler=scheduler)
    off = sample(patch(model, references, start_percent=1.0, end_percent=1.0), pos, neg, steps=steps,
                 sampler=sampler, scheduler=scheduler)
    assert (on - plain).abs().max() > 1e-3
    torch.testing.assert_close(off, plain, atol=1e-4, rtol=0)


def test_style_fidelity_below_one_changes_uncond(sd15, references):
    model, clip, _ = sd15
    pos, neg = encode(clip, "a dog"), encode(clip, "")
    a = sample(patch(model, references), pos, neg)
    b = sample(patch(model, references, style_fidelity=0.5), pos, neg)
    assert (a - b).abs().max() > 1e-4


def test_controlnet_style_residuals_do_not_break_the_pass(sd15, references):
    """ControlNet residuals arrive with the target's batch; the reference rows get zeros."""
    model, clip, _ = sd15
    from personalize_pack.attention.reference_pass import _pad_control
    res = torch.randn(2, 320, 8, 8)
    padded = _pad_control({"input": [res], "middle": [], "output": []}, 2, 2)
    assert padded["input"][0].shape[0] == 4


def test_sdxl_shaped_model(sdxl):
    from personalize_pack.references.reference import Reference
    g = torch.Generator().manual_seed(0)
    ctx = lambda: [[torch.randn(1, 77, 2048, generator=g), {"pooled_output": torch.randn(1, 1280, generator=g)}]]
    pos, neg = ctx(), ctx()
    mask = torch.zeros(64, 64)
    mask[16:48, 16:48] = 1
    refs = (Reference(latent=torch.randn(1, 4, 8, 8, generator=g), mask=mask, caption=torch.randn(1, 77, 2048, generator=g)),)
    plain = sample(sdxl, pos, neg)
    on = sample(patch(sdxl, refs, preset="SDXL decoder (output 0-5)"), pos, neg)
    zero = sample(patch(sdxl, zero_masked(refs), preset="SDXL decoder (output 0-5)"), pos, neg)
    assert (on - plain).abs().max() > 1e-3
    assert_same_sample(zero, plain)
    with pytest.raises(ValueError, match="output:6"):
        patch(sdxl, refs)    # the SD1.5 preset names blocks an SDXL UNet does not have


# ---------------------------------------------------------------------------- bad input

class FluxLikeVAE:
    latent_channels = 16

    def encode(self, pixels):
        return torch.zeros(pixels.shape[0], 16, pixels.shape[1] // 8, pixels.shape[2] // 8)


class VideoLikeVAE:
    def encode(self, pixels):
        return torch.zeros(pixels.shape[0], 16, 1, pixels.shape[1] // 8, pixels.shape[2] // 8)


def test_bad_inputs_give_clear_errors(sd15, references, data_dir):
    model, clip, vae = sd15
    enc = ref_node()
    img = load_image(data_dir / "personalize_cat_04.jpg")
    nan = img.clone()
    nan[0, 3, 3, 0] = float("nan")
    with pytest.raises(ValueError, match="image: image 1 of 1 contains NaN or infinite values"):
        enc.execute(nan, vae, None, None, None, 3.0, 0.5, False, 64)
    with pytest.raises(ValueError, match="mask: batch of 2 masks for 1 images"):
        enc.execute(img, vae, torch.ones(2, 64, 64), None, None, 3.0, 0.5, False, 64)
    with pytest.raises(ValueError, match="mask: mask 0 is empty"):
        enc.execute(img, vae, torch.zeros(1, 64, 64), None, None, 3.0, 0.5, False, 64)
    with pytest.raises(ValueError, match="caption: expected a CONDITIONING"):
        enc.execute(img, vae, None, "a cat", None, 3.0, 0.5, False, 64)
    with pytest.raises(ValueError, match="caption: expected a CONDITIONING"):
        enc.execute(img, vae, None, [[torch.zeros(77, 768), {}]], None, 3.0, 0.5, False, 64)
    with pytest.raises(ValueError, match="vae: this VAE does not produce an image latent"):
        enc.execute(img, VideoLikeVAE(), None, None, None, 3.0, 0.5, False, 64)
    other = enc.execute(img, FluxLikeVAE(), None, None, None, 3.0, 0.5, False, 64).result[0]
    with pytest.raises(ValueError, match="16-channel latents.*4-channel"):
        patch(model, other)
    zero = tuple(enc.execute(img, vae, None, None, None, 0.0, 0.5, False, 64).result[0])
    with pytest.raises(ValueError, match="every reference has weight 0"):
        patch(model, zero)
    with pytest.raises(ValueError, match="preset 'SDXL decoder \\(output 0-5\\)' names blocks"):
        patch(model, references, preset="SDXL decoder (output 0-5)")
    with pytest.raises(ValueError, match="custom_blocks: cannot read"):
        patch(model, references, preset="custom", custom_blocks="decoder 6")
    with pytest.raises(ValueError, match="start_percent"):
        patch(model, references, start_percent=0.8, end_percent=0.2)
    with pytest.raises(ValueError, match="no references"):
        patch(model, ())


def test_latent_that_does_not_fit_the_layers(sd15, references):
    from personalize_pack.references.masks import token_grid
    assert token_grid(4 * 5, 7, 9) == (4, 5)
    with pytest.raises(ValueError, match="does not fit an attention layer with 17 tokens"):
        token_grid(17, 8, 8)
    model, clip, _ = sd15
    pos, neg = encode(clip, "a dog"), encode(clip, "")
    out = sample(patch(model, references), pos, neg, size=(7, 9))     # odd, non-square latent
    assert out.shape == (1, 4, 7, 9) and torch.isfinite(out).all()


def test_node_registration():
    import asyncio

    from comfy_host import init_comfyui
    from pack_import import import_pack
    init_comfyui()
    ext = asyncio.run(import_pack().comfy_entrypoint())
    ids = [n.define_schema().node_id for n in asyncio.run(ext.get_node_list())]
    assert ids == ["PersonalizeReferenceEncode", "PersonalizeMultiReferenceAttention",
                   "PersonalizeDisentangleMixingAttention", "PersonalizeFoundationAwareAttention",
                   "PersonalizeSAMModelLoader", "PersonalizeSAMMask", "PersonalizeFaceParsingLoader",
                   "PersonalizeFaceAttributeMask",
                   "PersonalizeMIPAdapterLoader", "PersonalizeMIPAdapterReference", "PersonalizeMIPAdapterApply",
                   "PersonalizeSubject", "PersonalizeSubjectComposer", "PersonalizeMeanShiftedNoise",
                   "PersonalizeEvalModelLoader", "PersonalizeCLIPScore", "PersonalizeDINOScore",
                   "PersonalizeDetectCompareLoader", "PersonalizeDetectCompareSubject", "PersonalizeDetectCompare",
                   "PersonalizeApplyInfusion",
                   "PersonalizeSegMixDataset", "PersonalizeTrainSegMixLoRA", "PersonalizeTrainInfusion",
                   "PersonalizeOverfittingMetrics", "PersonalizeNativeReference", "PersonalizeNativeReferenceControl",
                   "PersonalizeReferenceReuse"]
    for n in asyncio.run(ext.get_node_list()):
        schema = n.define_schema()
        assert schema.category.startswith("personalize/") and schema.description
        assert all(i.tooltip for i in schema.inputs), f"{schema.node_id}: every input needs a tooltip"
