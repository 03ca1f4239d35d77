"""MIP-Adapter inside a real ComfyUI: tiny random SD1.5- and SDXL-shaped models, a tiny CLIP vision
model built from ComfyUI's own classes, and random adapter files of the matching shapes in the
official key layouts. Skipped when no ComfyUI tree is found (set COMFYUI_PATH)."""
from __future__ import annotations

import pickle

import pytest
import torch

from comfy_sampling import assert_same_sample, encode, load_image, sample, snapshot


PROMPT = "a photo of a cat and a dog on the beach"


def nodes():
    from personalize_pack.nodes import mip
    return mip


@pytest.fixture(scope="session")
def clip_vision():
    from tiny_models import build_clip_vision
    return build_clip_vision()


@pytest.fixture(scope="session")
def adapter_dir(tiny_dir, sd15, sdxl):
    """Adapter files in an ``ipadapter`` models folder registered with ComfyUI."""
    import folder_paths
    from tiny_adapters import adapter_state, save_adapter
    from personalize_pack.nodes import mip  # noqa: F401  (registers the folder)
    d = tiny_dir / "ipadapter"
    model = sd15[0]
    save_adapter(d / "sd15_plain.safetensors", adapter_state(model, "plain", seed=1))
    save_adapter(d / "sd15_plus.bin", adapter_state(model, "plus", seed=2), fmt="bin")
    save_adapter(d / "sd15_mip_plus.safetensors", adapter_state(model, "mip_plus", seed=3))
    save_adapter(d / "sdxl_mip.bin", adapter_state(sdxl, "mip", seed=4), fmt="bin")
    folder_paths.add_model_folder_path("ipadapter", str(d))
    return d


def load(name):
    return nodes().MIPAdapterLoader.execute(name).result


def reference(image, entity, weight=1.0, mask=None, chain=None, crop="center"):
    return nodes().MIPAdapterReference.execute(image, entity, weight, crop, mask, chain).result[0]


@pytest.fixture(scope="session")
def prompts(data_dir):
    cat = load_image(data_dir / "personalize_cat_04.jpg", 96)
    dog = load_image(data_dir / "personalize_dog6_02.jpg", 96)
    return reference(dog, "dog", chain=reference(cat, "cat"))


def apply(model, adapter, clip_vision, clip, image_prompts, prompt=PROMPT, scale=-1.0, start=0.0, end=1.0):
    return nodes().MIPAdapterApply.execute(model, adapter, clip_vision, clip, prompt, image_prompts, scale, start,
                                           end).result[0]


def test_loader_recognises_the_variants(adapter_dir):
    a, info = load("sd15_plain.safetensors")
    assert a.kind == "IP-Adapter" and a.clip_output == "image_embeds" and a.default_scale == 1.0
    assert "IP-Adapter" in info
    a, info = load("sd15_plus.bin")
    assert a.kind == "IP-Adapter" and a.clip_output == "penultimate_hidden_states" and a.tokens == 16
    a, info = load("sd15_mip_plus.safetensors")
    assert a.kind == "MIP-Adapter" and all(layer[2] is not None for layer in a.layers)
    a, _ = load("sdxl_mip.bin")
    assert a.kind == "MIP-Adapter" and a.family == "SDXL"


@pytest.mark.parametrize("name", ["sd15_plain.safetensors", "sd15_plus.bin", "sd15_mip_plus.safetensors"])
def test_patched_differs_scale_zero_is_plain_and_input_untouched(sd15, adapter_dir, clip_vision, prompts, name):
    model, clip, vae = sd15
    adapter, _ = load(name)
    pos, neg = encode(clip, PROMPT), encode(clip, "blurry")
    before = snapshot(model)
    plain = sample(model, pos, neg)
    on = sample(apply(model, adapter, clip_vision, clip, prompts), pos, neg)
    off = sample(apply(model, adapter, clip_vision, clip, prompts, scale=0.0), pos, neg)
    assert torch.isfinite(on).all()
    assert (on - plain).abs().max() > 1e-3
    assert torch.equal(off, plain)
    assert snapshot(model) == before
    assert "personalize" not in model.model_options.get("transformer_options", {})


def test_masks_and_weights_change_the_result_and_end_percent_gates(sd15, adapter_dir, clip_vision, data_dir):
    model, clip, _ = sd15
    adapter, _ = load("sd15_mip_plus.safetensors")
    cat = load_image(data_dir / "personalize_cat_04.jpg", 96)
    dog = load_image(data_dir / "personalize_dog6_02.jpg", 96)
    left, right = torch.zeros(1, 64, 64), torch.zeros(1, 64, 64)
    left[..., :32], right[..., 32:] = 1, 1
    pos, neg = encode(clip, PROMPT), encode(clip, "blurry")
    by_words = sample(apply(model, adapter, clip_vision, clip, reference(dog, "dog", chain=reference(cat, "cat"))),
                      pos, neg)
    by_masks = sample(apply(model, adapter, clip_vision, clip,
                            reference(dog, "dog", mask=right, chain=reference(cat, "cat", mask=left))), pos, neg)
    weighted = sample(apply(model, adapter, clip_vision, clip,
                            reference(dog, "dog", 2.0, chain=reference(cat, "cat"))), pos, neg)
    assert (by_masks - by_words).abs().max() > 1e-3
    assert (weighted - by_words).abs().max() > 1e-3
    # Gated to the last part of the schedule only: differs from both plain and the full range.
    plain = sample(model, pos, neg)
    late = sample(apply(model, adapter, clip_vision, clip, reference(cat, "cat"), start=0.6), pos, neg)
    full = sample(apply(model, adapter, clip_vision, clip, reference(cat, "cat")), pos, neg)
    assert (late - plain).abs().max() > 1e-4 and (late - full).abs().max() > 1e-4


def test_stacks_with_mrsa_on_one_model(sd15, adapter_dir, clip_vision, prompts, references):
    from personalize_pack.nodes.attention import MultiReferenceAttentionNode
    model, clip, _ = sd15
    adapter, _ = load("sd15_plain.safetensors")
    pos, neg = encode(clip, PROMPT), encode(clip, "blurry")
    m = MultiReferenceAttentionNode.execute(model, references, "SD1.5 FreeCustom (output 6-11)", "", 0.0, 1.0, 1.0,
                                            0).result[0]
    mrsa_only = sample(m, pos, neg)
    both = sample(apply(m, adapter, clip_vision, clip, prompts), pos, neg)
    other_order = sample(MultiReferenceAttentionNode.execute(apply(model, adapter, clip_vision, clip, prompts),
                                                             references, "SD1.5 FreeCustom (output 6-11)", "", 0.0,
                                                             1.0, 1.0, 0).result[0], pos, neg)
    assert (both - mrsa_only).abs().max() > 1e-3
    assert_same_sample(other_order, both)


class WideClip:
    """The tiny SD1.5 CLIP with its conditioning mapped to SDXL's 2048 width (a fixed random map),
    for entity embeddings on the SDXL-shaped model (a tiny SDXL CLIP would be a 700M-parameter bigG)."""

    def __init__(self, clip):
        self.clip = clip
        self.map = torch.randn(768, 2048, generator=torch.Generator().manual_seed(5)) / 768 ** 0.5

    def tokenize(self, text):
        return self.clip.tokenize(text)

    def encode_from_tokens(self, tokens):
        return self.clip.encode_from_tokens(tokens) @ self.map


def sdxl_conds():
    g = torch.Generator().manual_seed(0)
    ctx = lambda: [[torch.randn(1, 77, 2048, generator=g), {"pooled_output": torch.randn(1, 1280, generator=g)}]]
    return ctx(), ctx()


def test_sdxl_shaped_model(sdxl, sd15, adapter_dir, clip_vision, prompts):
    adapter, _ = load("sdxl_mip.bin")
    clip = WideClip(sd15[1])
    pos, neg = sdxl_conds()
    plain = sample(sdxl, pos, neg)
    on = sample(apply(sdxl, adapter, clip_vision, clip, prompts), pos, neg)
    off = sample(apply(sdxl, adapter, clip_vision, clip, prompts, scale=0.0), pos, neg)
    assert (on - plain).abs().max() > 1e-3
    assert torch.equal(off, plain)


# ---------------------------------------------------------------------------- bad input

def test_family_mismatch_is_a_clear_error(sd15, sdxl, adapter_dir, clip_vision, prompts):
    model, clip, _ = sd15
    with pytest.raises(ValueError, match="SD1.5"):
        apply(sdxl, load("sd15_plain.safetensors")[0], clip_vision, WideClip(clip), prompts)
    with pytest.raises(ValueError, match="SDXL"):
        apply(model, load("sdxl_mip.bin")[0], clip_vision, clip, prompts)


def test_clip_vision_of_the_wrong_width(sd15, adapter_dir, prompts):
    from tiny_models import build_clip_vision
    model, clip, _ = sd15
    wrong = build_clip_vision(hidden_size=48, projection_dim=40)
    for name in ("sd15_plain.safetensors", "sd15_plus.bin"):
        with pytest.raises(ValueError, match="clip_vision"):
            apply(model, load(name)[0], wrong, clip, prompts)


def test_entity_not_in_prompt(sd15, adapter_dir, clip_vision, data_dir):
    model, clip, _ = sd15
    cat = load_image(data_dir / "personalize_cat_04.jpg", 64)
    with pytest.raises(ValueError, match="entity 'horse'.*not found in the prompt"):
        apply(model, load("sd15_plain.safetensors")[0], clip_vision, clip, reference(cat, "horse"))
    with pytest.raises(ValueError, match="entity: empty"):
        reference(cat, "  ")


def test_more_masks_than_references(data_dir):
    cat = load_image(data_dir / "personalize_cat_04.jpg", 64)
    with pytest.raises(ValueError, match="2 masks given for one image prompt"):
        reference(cat, "cat", mask=torch.ones(2, 64, 64))
    with pytest.raises(ValueError, match="mask: the mask is empty"):
        reference(cat, "cat", mask=torch.zeros(1, 64, 64))


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_unsafe_and_broken_files_are_refused(adapter_dir, tmp_path):
    import folder_paths
    marker = tmp_path / "executed"
    with open(adapter_dir / "evil.bin", "wb") as f:
        pickle.dump({"image_proj": {"x": Payload(str(marker))}, "ip_adapter": {}}, f)
    good = (adapter_dir / "sd15_plain.safetensors").read_bytes()
    (adapter_dir / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    folder_paths.filename_list_cache.clear() if hasattr(folder_paths, "filename_list_cache") else None
    with pytest.raises(ValueError, match="evil.bin"):
        load("evil.bin")
    assert not marker.exists()
    with pytest.raises(ValueError, match="truncated"):
        load("truncated.safetensors")
    msg = nodes().MIPAdapterLoader.validate_inputs("missing.safetensors")
    assert isinstance(msg, str) and "ipadapter folder" in msg and "hqhQAQ/MIP-Adapter" in msg


def test_image_prompt_encoding_with_comfyui_clip_vision(adapter_dir, clip_vision, data_dir):
    """Tokens = the adapter's projection of the CLIP vision output, averaged over the views; the
    unconditional tokens: zero image embeds, or the encoder on an image that normalises to zero."""
    import comfy.clip_model
    from personalize_pack.references.image_prompt import encode_image_prompts, mean_colour_image
    cat = load_image(data_dir / "personalize_cat_04.jpg", 80)
    cat2 = load_image(data_dir / "personalize_mip_2_cat.jpg", 80)
    views = reference(torch.cat([cat, cat2]), "cat")
    for name, field in (("sd15_plain.safetensors", "image_embeds"), ("sd15_plus.bin", "penultimate_hidden_states")):
        adapter, _ = load(name)
        tokens, uncond = encode_image_prompts(adapter, clip_vision, views)
        feats = clip_vision.encode_image(torch.cat([cat, cat2]), crop=True)[field]
        want = adapter.image_proj(feats.float()).mean(0)
        torch.testing.assert_close(tokens[0], want)
        assert tokens[0].shape == (adapter.tokens, adapter.context_dim)
        if field == "image_embeds":
            torch.testing.assert_close(uncond, adapter.image_proj(torch.zeros(1, adapter.clip_width))[0])
        else:
            pix = comfy.clip_model.clip_preprocess(mean_colour_image(clip_vision.image_mean), size=224,
                                                   mean=clip_vision.image_mean, std=clip_vision.image_std)
            assert float(pix.abs().max()) < 0.01                 # the encoder sees (almost) an all-zero input
            feats0 = clip_vision.encode_image(mean_colour_image(clip_vision.image_mean))[field]
            torch.testing.assert_close(uncond, adapter.image_proj(feats0.float())[0])
        assert (tokens[0] - uncond).abs().max() > 1e-3


def test_entity_embeddings_are_the_words_own_tokens(sd15, prompts):
    from personalize_pack.references.image_prompt import encode_entities
    model, clip, _ = sd15
    out = encode_entities(clip, PROMPT, prompts, 768)
    for (cond, uncond), word in zip(out, ("cat", "dog")):
        full = clip.encode_from_tokens(clip.tokenize(word))
        empty = clip.encode_from_tokens(clip.tokenize(""))
        assert cond.shape == (1, 768)                           # 'cat' and 'dog' are one token each
        torch.testing.assert_close(cond, full[0, 1:2].float())
        torch.testing.assert_close(uncond, empty[0, 1:2].float())
    two = encode_entities(clip, "a teddy bear on a sofa", reference(torch.rand(1, 32, 32, 3), "teddy bear"),
                                  768)
    assert two[0][0].shape == (2, 768)
    with pytest.raises(ValueError, match="conditioning is 768 wide"):
        encode_entities(clip, PROMPT, prompts, 2048)
