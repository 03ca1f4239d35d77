"""Apply Infusion inside a real ComfyUI on the tiny random SD1.5 model: random offsets files in this
pack's format and in the official checkpoint layout, sampling with and without them, the keys and
values an attn2 layer receives, stacking with MIP-Adapter, and the errors. Skipped when no ComfyUI
tree is found (set COMFYUI_PATH)."""
from __future__ import annotations


import pytest
import torch

from comfy_sampling import assert_same_sample, encode, load_image, sample, snapshot


PROMPT = "a photo of a cat on the beach"
CAT = 5                      # "cat" is token 5: <start> a photo of a cat


def node():
    from personalize_pack.nodes.infusion import InfusionApply
    return InfusionApply


def apply(model, clip, name="cat_kv.safetensors", prompt=PROMPT, word="cat", strength=1.0):
    return node().execute(model, name, clip, prompt, word, strength).result[0]


def random_offsets(widths, kv="kv", seed=0, scale=1.0):
    from personalize_pack.training.infusion import InfusionOffsets
    m = InfusionOffsets(widths, kv=kv)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return m


@pytest.fixture(scope="session")
def patch_dir(tiny_dir, sd15):
    """Infusion files in a ``model_patches`` folder registered with ComfyUI."""
    import folder_paths
    from personalize_pack.attention.infusion import cross_attention_widths
    from personalize_pack.training.infusion import save_offsets
    widths, family = cross_attention_widths(sd15[0])
    assert family == "SD1.x" and len(widths) == 16
    d = tiny_dir / "model_patches"
    save_offsets(d / "cat_kv.safetensors", random_offsets(widths, seed=1), "cat", family)
    v_only = random_offsets(widths, kv="v", seed=2)
    save_offsets(d / "cat_v.safetensors", v_only, "cat", family)
    d.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": 500, "C_inv": torch.eye(4), "target_input": torch.zeros(1, 77, 4),
                "embedding": {"string_to_token": {"*": torch.tensor(265)}, "initializer_words": ["cat"]},
                "target_output": v_only.to_tensors()}, d / "official_cat.ckpt")
    save_offsets(d / "wide.safetensors", random_offsets({k: 2 * w for k, w in widths.items()}), "cat", family)
    save_offsets(d / "sd2.safetensors", random_offsets(widths, seed=3), "cat", "SD2.x")
    folder_paths.add_model_folder_path("model_patches", str(d))
    return d, widths


def test_strength_zero_is_plain_one_differs_and_input_untouched(sd15, patch_dir):
    model, clip, _ = sd15
    pos, neg = encode(clip, PROMPT), encode(clip, "blurry")
    before = snapshot(model)
    plain = sample(model, pos, neg)
    on = sample(apply(model, clip), pos, neg)
    off = sample(apply(model, clip, strength=0.0), pos, neg)
    half = sample(apply(model, clip, strength=0.5), pos, neg)
    assert torch.isfinite(on).all()
    assert (on - plain).abs().max() > 1e-3 and (half - on).abs().max() > 1e-4
    assert torch.equal(off, plain)
    assert snapshot(model) == before
    assert "personalize" not in model.model_options.get("transformer_options", {})


class Recorder:
    """A foreign attn2 replace that records the keys and values it is given (Apply Infusion wraps it)."""

    def __init__(self):
        self.calls = []

    def __call__(self, q, k, v, extra_options):
        from comfy.ldm.modules.attention import optimized_attention
        self.calls.append((list(extra_options["cond_or_uncond"]), k.detach().clone(), v.detach().clone()))
        return optimized_attention(q, k, v, extra_options["n_heads"], transformer_options=extra_options)


def test_only_the_cond_rows_concept_token_changes(sd15, patch_dir):
    """At the attention level: the uncond rows' keys and values are the plain ones bit for bit; the
    cond rows' differ at the concept token only, by exactly the file's offsets."""
    from personalize_pack.training.infusion import load_offsets
    model, clip, _ = sd15
    d, _ = patch_dir
    pos, neg = encode(clip, PROMPT), encode(clip, "blurry")
    key = ("input", 4, 0)
    runs = []
    for infused in (False, True):
        rec = Recorder()
        m = model.clone()
        m.set_model_patch_replace(rec, "attn2", *key)
        if infused:
            m = apply(m, clip, strength=0.5)
        sample(m, pos, neg, steps=1)
        runs.append(rec.calls[0])
    (labels, k0, v0), (labels1, k1, v1) = runs
    assert labels == labels1 and sorted(labels) == [0, 1]
    dk, dv = load_offsets(d / "cat_kv.safetensors").offsets.delta(key)
    for j, lab in enumerate(labels):
        if lab == 1:
            assert torch.equal(k1[j], k0[j]) and torch.equal(v1[j], v0[j])
            continue
        others = [i for i in range(k0.shape[1]) if i != CAT]
        assert torch.equal(k1[j, others], k0[j, others]) and torch.equal(v1[j, others], v0[j, others])
        torch.testing.assert_close(k1[j, CAT] - k0[j, CAT], 0.5 * dk.to(k0.dtype), atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(v1[j, CAT] - v0[j, CAT], 0.5 * dv.to(v0.dtype), atol=1e-4, rtol=1e-3)


def test_official_v_only_checkpoint_and_the_stored_word(sd15, patch_dir):
    model, clip, _ = sd15
    pos, neg = encode(clip, PROMPT), encode(clip, "blurry")
    plain = sample(model, pos, neg)
    official = sample(apply(model, clip, "official_cat.ckpt"), pos, neg)
    ours = sample(apply(model, clip, "cat_v.safetensors", word=""), pos, neg)     # the word stored in the file
    assert (official - plain).abs().max() > 1e-3
    assert torch.equal(official, ours)
    with pytest.raises(ValueError, match="concept_word: empty.*stores no concept word"):
        apply(model, clip, "official_cat.ckpt", word=" ")


def test_long_prompt_concept_in_the_second_chunk(sd15, patch_dir):
    from personalize_pack.attention.infusion import concept_position
    model, clip, _ = sd15
    prompt = ", ".join(["a very detailed sunny beach scene"] * 14) + ", a photo of a cat"
    index, length = concept_position(clip, prompt, "cat", "SD1.x")
    assert length == 154 and index > 77
    pos, neg = encode(clip, prompt), encode(clip, "blurry")
    assert pos[0][0].shape[1] == 154
    plain = sample(model, pos, neg)
    on = sample(apply(model, clip, prompt=prompt), pos, neg)
    assert torch.isfinite(on).all() and (on - plain).abs().max() > 1e-3
    # the node's prompt longer than the conditioning: a clear error at sampling time
    with pytest.raises(ValueError, match="conditioning has 77 tokens.*has 154.*same prompt"):
        sample(apply(model, clip, prompt=prompt), encode(clip, PROMPT), neg)


def test_stacks_with_mip_adapter_on_one_model(sd15, tiny_dir, patch_dir, data_dir):
    import folder_paths
    from personalize_pack.nodes import mip
    from tiny_adapters import adapter_state, save_adapter
    from tiny_models import build_clip_vision
    model, clip, _ = sd15
    d = tiny_dir / "ipadapter_infusion"
    save_adapter(d / "inf_sd15_plain.safetensors", adapter_state(model, "plain", seed=1))
    folder_paths.add_model_folder_path("ipadapter", str(d))
    adapter = mip.MIPAdapterLoader.execute("inf_sd15_plain.safetensors").result[0]
    cv = build_clip_vision()
    cat = load_image(data_dir / "personalize_cat_04.jpg", 96)
    refs = mip.MIPAdapterReference.execute(cat, "cat", 1.0, "center", None, None).result[0]

    def with_mip(m):
        return mip.MIPAdapterApply.execute(m, adapter, cv, clip, PROMPT, refs, -1.0, 0.0, 1.0).result[0]

    pos, neg = encode(clip, PROMPT), encode(clip, "blurry")
    mip_only = sample(with_mip(model), pos, neg)
    both = sample(with_mip(apply(model, clip)), pos, neg)
    other_order = sample(apply(with_mip(model), clip), pos, neg)
    assert (both - mip_only).abs().max() > 1e-3
    assert_same_sample(other_order, both)


# ---------------------------------------------------------------------------- bad input

def test_errors(sd15, sdxl, patch_dir):
    model, clip, _ = sd15
    with pytest.raises(ValueError, match="widths do not match.*320 wide in the model, 640 in the file"):
        apply(model, clip, "wide.safetensors")
    with pytest.raises(ValueError, match="concept_word 'dog'.*not found in the prompt"):
        apply(model, clip, word="dog")
    with pytest.raises(ValueError, match="trained on an SD2.x model; this is an SD1.x model"):
        apply(model, clip, "sd2.safetensors")
    with pytest.raises(ValueError, match="SD1.x and SD2.x.*Segmind_Vega model with 2048-wide.*SDXL"):
        apply(sdxl, clip)
    with pytest.raises(ValueError, match="prompt: empty"):
        apply(model, clip, prompt="  ")
    msg = node().validate_inputs("nope.safetensors")
    assert node().validate_inputs("cat_kv.safetensors") is True
    assert isinstance(msg, str) and "model_patches" in msg
    with pytest.raises(FileNotFoundError, match="infusion_name"):
        apply(model, clip, "nope.safetensors")


def test_family_from_the_conditioning_width():
    """SD2.x is recognised by its 1024-wide text conditioning (a UNet built on the meta device)."""
    from types import SimpleNamespace

    from comfy_host import init_comfyui
    init_comfyui()
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from personalize_pack.attention.infusion import cross_attention_widths
    from tiny_models import SD15_UNET

    class SD21:
        pass

    for ctx, family in ((768, "SD1.x"), (1024, "SD2.x")):
        unet = UNetModel(**dict(SD15_UNET, context_dim=ctx), device="meta", operations=comfy.ops.disable_weight_init)
        widths, got = cross_attention_widths(SimpleNamespace(model=SimpleNamespace(model_config=SD21(),
                                                                                   diffusion_model=unet)))
        assert got == family and len(widths) == 16 and set(widths.values()) == {320}
    with pytest.raises(ValueError, match="this is a Flux model without UNet cross-attention"):
        class Flux:
            pass
        cross_attention_widths(SimpleNamespace(model=SimpleNamespace(model_config=Flux(),
                                                                     diffusion_model=torch.nn.Linear(2, 2))))


class FakeClip:
    """A CLIP whose tokenizer output has the given encoder names (SD2.x's is ``h``)."""

    def __init__(self, *encoders):
        self.encoders = encoders

    def tokenize(self, text):
        ids = [49406] + [100 + len(w) for w in text.split()] + [49407]
        chunk = [(t, 1.0) for t in ids + [0] * (77 - len(ids))]
        return {e: [chunk] for e in self.encoders}


def test_concept_position_by_the_family_encoder():
    from comfy_host import init_comfyui
    init_comfyui()
    from personalize_pack.attention.infusion import concept_position
    assert concept_position(FakeClip("h"), "a photo of a kitten", "kitten", "SD2.x") == (5, 77)
    assert concept_position(FakeClip("g", "l"), "a photo of a kitten", "kitten", "SD1.x") == (5, 77)
    with pytest.raises(ValueError, match="clip: its tokenizer has the encoders g, l, not the SD2.x text encoder"):
        concept_position(FakeClip("g", "l"), "a photo of a kitten", "kitten", "SD2.x")
