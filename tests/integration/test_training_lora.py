"""training/lora.py inside a real ComfyUI: injection into the UNet of a tiny SD1.5 finds exactly
the projections of ComfyUI's ``CrossAttention`` modules, and a saved file is read by core's LoRA
loader (``comfy.lora.model_lora_keys_unet`` maps every key, ``comfy.sd.load_lora_for_models``
patches every target weight to exactly ``merged_weight()``). Skipped when no ComfyUI tree is found
(set COMFYUI_PATH)."""
from __future__ import annotations

import logging

import pytest
import torch



TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@pytest.fixture(scope="module")
def fresh_sd15(tiny_sd15_path):
    """A model of its own (the session's ``sd15`` is shared with other tests and stays untouched)."""
    import comfy.sd
    model, *_ = comfy.sd.load_checkpoint_guess_config(str(tiny_sd15_path), output_vae=False, output_clip=False)
    return model


def expected_targets(unet):
    from comfy.ldm.modules.attention import CrossAttention
    return {f"{p}.{t}" for p, m in unet.named_modules() if isinstance(m, CrossAttention) for t in TARGETS}


def unet_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500.0]), torch.randn(1, 77, 768, generator=g))


def test_injection_finds_exactly_the_comfy_attention_projections(fresh_sd15):
    from personalize_pack.training.lora import LoRALinear, inject_lora, remove_lora
    unet = fresh_sd15.model.diffusion_model
    expected = expected_targets(unet)
    # tiny SD1.5: attention in input 1,2,4,5,7,8, middle, output 3-11 -> 16 transformer blocks
    assert len(expected) == 16 * 2 * 4
    assert "input_blocks.1.1.transformer_blocks.0.attn1.to_q" in expected
    keys_before = list(unet.state_dict())
    try:
        loras = inject_lora(unet, rank=4, seed=0)
        assert set(loras) == expected
        assert all(isinstance(unet.get_submodule(p), LoRALinear) for p in expected)
        # fresh LoRA (up = 0): the UNet's output is unchanged, bit for bit
        x, t, c = unet_inputs()
        with torch.no_grad():
            with_lora = unet(x, timesteps=t, context=c)
    finally:
        assert remove_lora(unet) == len(expected)
    assert list(unet.state_dict()) == keys_before
    with torch.no_grad():
        assert torch.equal(unet(x, timesteps=t, context=c), with_lora)


def test_comfy_loads_the_saved_lora_exactly(fresh_sd15, tmp_path, caplog):
    import comfy.lora
    import comfy.model_management
    import comfy.sd
    import comfy.utils
    from safetensors.torch import save_file
    from personalize_pack.training.lora import inject_lora, lora_state_dict, remove_lora

    model = fresh_sd15
    unet = model.model.diffusion_model
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    x, t, c = unet_inputs(1)
    try:
        loras = inject_lora(unet, rank=4, alpha=3.0, seed=2)
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for m in loras.values():
                m.up.copy_(torch.randn(m.up.shape, generator=g) * 0.05)
        merged = {p: m.merged_weight().clone() for p, m in loras.items()}
        assert all(not torch.equal(w, before[f"{p}.weight"]) for p, w in merged.items())
        sd = lora_state_dict(loras)
        with torch.no_grad():
            lora_out = unet(x, timesteps=t, context=c)
    finally:
        remove_lora(unet)
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in before.items())
    path = tmp_path / "segmix_lora.safetensors"
    save_file(sd, str(path))
    lora = comfy.utils.load_torch_file(str(path), safe_load=True)

    # every saved module name is mapped onto diffusion_model.<path>.weight
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    for p in loras:
        name = "lora_unet_" + p.replace(".", "_")
        assert key_map[name] == f"diffusion_model.{p}.weight"
        assert {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"} <= set(lora)
    assert len(lora) == 3 * len(loras)

    with caplog.at_level(logging.WARNING):
        patched, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
    assert not [r for r in caplog.records if "not loaded" in r.getMessage().lower()]
    assert set(patched.patches) == {f"diffusion_model.{p}.weight" for p in loras}

    # ComfyUI's own load applies the patches to the weights: exactly merged_weight()
    comfy.model_management.load_models_gpu([patched])
    try:
        for p, w in merged.items():
            got = comfy.utils.get_attr(patched.model, f"diffusion_model.{p}.weight")
            assert got.dtype == w.dtype and torch.equal(got.detach().cpu(), w), p
        for k, v in before.items():                   # everything else untouched
            if k.removesuffix(".weight") not in loras:
                assert torch.equal(unet.state_dict()[k], v), k
        with torch.no_grad():
            comfy_out = unet(x, timesteps=t, context=c)
        # the LoRA wrapper's forward and ComfyUI's merged weights: the same network up to rounding
        assert (comfy_out - lora_out).abs().max() <= 1e-4 * max(1.0, float(lora_out.abs().max()))
    finally:
        comfy.model_management.unload_model_and_clones(patched)      # unpatches; other models stay loaded
    for k, v in before.items():
        assert torch.equal(unet.state_dict()[k], v), k
