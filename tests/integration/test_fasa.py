"""FreeCure's FASA inside a real ComfyUI on the tiny random SD1.5 model: the foundation branch runs
beside the personalised one from the same noise. Skipped when no ComfyUI tree is found (set
COMFYUI_PATH)."""
from __future__ import annotations


import pytest
import torch

from comfy_sampling import assert_same_sample, encode, sample, snapshot


PERSONAL = "a photo of a man with red hair and glasses"
FOUNDATION = "a photo of a woman with blue eyes at the beach"
SD15 = "SD1.5 FreeCure (output 6-11)"


def node():
    from personalize_pack.nodes.attention import FoundationAwareAttentionNode
    return FoundationAwareAttentionNode


def box_mask(size=64):
    m = torch.zeros(1, size, size)
    m[:, size // 4: 3 * size // 4, size // 8: 7 * size // 8] = 1
    return m


def fasa(model, foundation, masks=None, weight=1.5, mode=0, layers=SD15, **kw):
    from personalize_pack.nodes.attention import FOUNDATION_MODES
    args = dict(custom_blocks="output:6-11", start_percent=0.0, end_percent=1.0, mask_threshold=0.5)
    args.update(kw)
    return node().execute(model, box_mask() if masks is None else masks, FOUNDATION_MODES[mode], foundation, weight,
                          layers, **args).result[0]


def capture_full_batch(model):
    """An OUTER_SAMPLE wrapper inside the pack's: it sees the doubled batch the sampler produced."""
    from comfy.patcher_extension import WrappersMP
    seen = {}

    def capture(executor, *args, **kwargs):
        out = executor(*args, **kwargs)
        seen["out"] = out
        return out
    m = model.clone()
    m.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, "test.capture", capture)
    return m, seen


@pytest.mark.parametrize("batch,cfg", [(1, 5.0), (2, 5.0), (1, 1.0)])
def test_weight_zero_and_empty_masks_sample_like_plain(sd15, batch, cfg):
    model, clip, vae = sd15
    pos, neg, found = encode(clip, PERSONAL), encode(clip, "blurry"), encode(clip, FOUNDATION)
    plain = sample(model, pos, neg, batch=batch, cfg=cfg)
    off = sample(fasa(model, found, weight=0.0), pos, neg, batch=batch, cfg=cfg)
    empty = sample(fasa(model, found, masks=torch.zeros(1, 64, 64)), pos, neg, batch=batch, cfg=cfg)
    assert torch.isfinite(plain).all() and off.shape == plain.shape
    assert_same_sample(off, plain, vae)
    assert_same_sample(empty, plain, vae)


def test_patched_differs_and_the_foundation_branch_is_the_plain_foundation_run(sd15):
    model, clip, _ = sd15
    before = snapshot(model)
    pos, neg, found = encode(clip, PERSONAL), encode(clip, "blurry"), encode(clip, FOUNDATION)
    m, seen = capture_full_batch(fasa(model, found))
    on = sample(m, pos, neg, batch=2)
    plain = sample(model, pos, neg, batch=2)
    assert (on - plain).abs().max() > 1e-3
    full = seen["out"] if seen["out"].shape[0] == 4 else None
    assert full is not None, "the sampler did not see the doubled batch"
    # The personalised half is what the node returns; the foundation half is exactly a plain run
    # with the foundation prompt from the same noise (FASA never touches the foundation rows).
    assert_same_sample(full[:2], on)
    assert_same_sample(full[2:], sample(model, found, neg, batch=2))
    assert snapshot(model) == before
    assert "personalize" not in model.model_options.get("transformer_options", {})


def test_identity_patches_are_switched_off_only_in_the_foundation_branch(sd15):
    """InstantID-style: the identity lives in another pack's cross-attention replace."""
    model, clip, vae = sd15
    from comfy.ldm.modules.attention import optimized_attention
    from personalize_pack.attention.blocks import transformer_blocks

    def identity(q, k, v, extra_options):       # a stand-in identity adapter: shifts cross-attention
        return optimized_attention(q, k, v, extra_options["n_heads"]) + 0.5
    ident = model.clone()
    for key in transformer_blocks(ident.model.diffusion_model):
        ident.set_model_attn2_replace(identity, *key)
    pos, neg = encode(clip, PERSONAL), encode(clip, "blurry")
    patched, seen = capture_full_batch(fasa(ident, None, weight=0.0, mode=1))
    out = sample(patched, pos, neg)
    assert_same_sample(out, sample(ident, pos, neg), vae)                    # personalised: identity on
    foundation = seen["out"][1:]
    assert_same_sample(foundation, sample(model, pos, neg))                  # foundation: identity off
    assert (sample(ident, pos, neg) - sample(model, pos, neg)).abs().max() > 1e-3
    on = sample(fasa(ident, None, mode=1), pos, neg)
    assert (on - out).abs().max() > 1e-3


def test_lora_hook_mode_runs_the_foundation_branch_on_the_model_without_the_lora(sd15):
    """A DreamBooth-style identity LoRA set on the conditioning as a ComfyUI hook: the personalised rows
    carry it, the foundation rows run on the model without it (the base model)."""
    import comfy.hooks
    import comfy.lora
    model, clip, vae = sd15
    keys = comfy.lora.model_lora_keys_unet(model.model)
    gen = torch.Generator().manual_seed(5)
    sd = model.model.state_dict()
    lora = {f"{name}.diff": torch.randn(sd[key].shape, generator=gen) * 0.2
            for name, key in keys.items() if isinstance(key, str) and key.endswith(("attn2.to_v.weight", "ff.net.2.weight"))}
    assert lora
    hooks = comfy.hooks.create_hook_lora(lora, 1.0, 0.0)
    pos, neg = encode(clip, PERSONAL), encode(clip, "blurry")
    hpos, hneg = (comfy.hooks.set_hooks_for_conditioning(c, hooks) for c in (pos, neg))
    personal = sample(model, hpos, hneg)
    base = sample(model, pos, neg)
    assert (personal - base).abs().max() > 1e-3                              # the LoRA does something
    patched, seen = capture_full_batch(fasa(model, None, weight=0.0, mode=2))
    out = sample(patched, hpos, hneg)
    assert_same_sample(out, personal, vae)                                   # personalised: the LoRA on
    assert_same_sample(seen["out"][1:], base)                                # foundation: the base model
    on = sample(fasa(model, None, mode=2), hpos, hneg)
    assert (on - out).abs().max() > 1e-3
    with pytest.raises(ValueError, match="LoRA-hook mode"):                  # no hooks on the prompt
        sample(fasa(model, None, mode=2), pos, neg)


# ---------------------------------------------------------------------------- bad input

def test_bad_inputs(sd15, sdxl):
    model, clip, _ = sd15
    pos, neg, found = encode(clip, PERSONAL), encode(clip, "blurry"), encode(clip, FOUNDATION)
    with pytest.raises(ValueError, match="foundation: not connected"):
        fasa(model, None)
    with pytest.raises(ValueError, match="SDXL's decoder"):
        fasa(model, found, layers="SDXL FreeCure (output 1.6-9, 2-5)")
    with pytest.raises(ValueError, match="2 attribute masks for 3 images"):
        sample(fasa(model, found, masks=torch.ones(2, 64, 64)), pos, neg, batch=3)
    with pytest.raises(ValueError, match="aspect ratio"):
        sample(fasa(model, found, masks=torch.ones(1, 64, 128)), pos, neg)
    with pytest.raises(ValueError, match="expected a CONDITIONING"):
        fasa(model, "not a conditioning")
    from personalize_pack.nodes.attention import MultiReferenceAttentionNode
    from comfy_sampling import load_image, ref_node
    from pack_paths import PACK_ROOT
    refs = ref_node().execute(load_image(PACK_ROOT / "workflows" / "inputs" /
                                         "personalize_cat_04.jpg"), sd15[2], None, None, None, 3.0, 0.5, False,
                              64).result[0]
    mrsa = MultiReferenceAttentionNode.execute(model, refs, "SD1.5 FreeCustom (output 6-11)", "", 0.0, 1.0, 1.0,
                                               0).result[0]
    with pytest.raises(ValueError, match="cannot be combined"):
        fasa(mrsa, found)
    with pytest.raises(ValueError, match="cannot be combined"):
        MultiReferenceAttentionNode.execute(fasa(model, found), refs, "SD1.5 FreeCustom (output 6-11)", "", 0.0, 1.0,
                                            1.0, 0)
