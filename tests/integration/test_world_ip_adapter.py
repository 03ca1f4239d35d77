"""The world's IP-Adapter (``world/ip_adapter.py``) inside a real ComfyUI: the seeded image encoder is a
file ComfyUI's CLIP vision loader accepts, the adapter file built from the small trained form is read by
the pack's MIP-Adapter loader as an SD1.5 IP-Adapter on ViT-L image embeds, and in the 320-channel model
it computes what it computed in training on the 64-channel one."""
from __future__ import annotations

import torch

from comfy_host import import_comfy


def _perturbed(module, seed: int, scale: float = 0.05):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return module


def test_the_adapter_in_sd15_width_computes_what_it_trained():
    import_comfy()
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from personalize_pack.attention.blocks import cross_attention_modules
    from personalize_pack.attention.ip_adapter import adapter_from_state_dict
    from personalize_pack.attention.kernels import sdpa_attention
    from personalize_pack.attention.mip import mip_delta
    from personalize_pack.world import ip_adapter, unet
    small = _perturbed(unet.build_small(0), 1).eval()
    adapter = _perturbed(ip_adapter.SmallAdapter(small), 2)
    gen = torch.Generator().manual_seed(3)
    adapter.standardise_on(torch.randn(50, ip_adapter.EMBED, generator=gen) * 0.2 + torch.randn(ip_adapter.EMBED, generator=gen))
    full = UNetModel(**unet.SD15_LAYOUT, operations=comfy.ops.disable_weight_init).eval()
    full.load_state_dict(unet.embed(small.state_dict(), torch.float32))
    loaded = adapter_from_state_dict(adapter.comfy_state_dict(torch.float32), "world")
    assert loaded.variant == "sd15_vit-l" and len(loaded.layers) == 16 and loaded.tokens == ip_adapter.TOKENS

    embeds = torch.randn(2, ip_adapter.EMBED, generator=gen)
    x, t, c = torch.randn(2, 4, 16, 16, generator=gen), torch.tensor([10.0, 700.0]), torch.randn(2, 77, 768, generator=gen)
    with torch.no_grad():
        tokens = adapter.tokens(embeds)
        torch.testing.assert_close(loaded.project(embeds), tokens, atol=1e-5, rtol=1e-5)
        a = small(x, t, context=c, transformer_options={"patches_replace": adapter.replaces(tokens)})
        plain = small(x, t, context=c)

        attn2 = cross_attention_modules(full)
        widths = {k: (int(m.to_k.weight.shape[0]), int(m.to_k.weight.shape[1])) for k, m in attn2.items()}
        table = {}
        for key, n in loaded.layer_keys(widths).items():
            wk, wv, _ = loaded.layers[n]

            def replace(q, k, v, extra_options, wk=wk, wv=wv):
                heads = extra_options["n_heads"]
                text = sdpa_attention(q, k, v, heads)
                return text + torch.cat([mip_delta(q[i:i + 1], text[i:i + 1], [tokens[i] @ wk.T], [tokens[i] @ wv.T],
                                                   None, heads) for i in range(q.shape[0])])
            table[key] = replace
        b = full(x, t, context=c, transformer_options={"patches_replace": {"attn2": table}})
    assert float((a - plain).abs().max()) > 0.05          # the adapter changes the output
    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


def test_the_seeded_encoder_is_a_clip_vision_file_comfyui_loads(tmp_path):
    import_comfy()
    import comfy.clip_vision
    from personalize_pack.world import ip_adapter
    path = ip_adapter.build_vision(tmp_path / ip_adapter.VISION_NAME)
    enc = comfy.clip_vision.load(str(path))
    assert enc is not None and enc.model.vision_model.encoder.layers.__len__() == 24
    img = torch.rand(2, 128, 128, 3, generator=torch.Generator().manual_seed(0))
    out = enc.encode_image(img)["image_embeds"]
    assert out.shape == (2, ip_adapter.EMBED)
    direct = ip_adapter.image_embeds(ip_adapter.load_vision(), img)
    torch.testing.assert_close(out.float(), direct, atol=0.05, rtol=0.02)      # the file is fp16
    assert float((out[0] - out[1]).abs().max()) > 1e-2                          # it sees the image
    # random weights, yet the world's colours are told apart (the adapter carries colour from this)
    sep = ip_adapter.colour_separation(enc, per_colour=3)       # measured: colour 0.62, shape 0.17
    assert sep["colour"] >= 0.45 and sep["colour"] > 2 * sep["shape"], sep     # chance: 1/8 and 1/6


def test_the_trained_adapter_loads_with_the_mip_loader(world, tmp_path):
    import folder_paths
    from personalize_pack.nodes.mip import MIPAdapterLoader
    from personalize_pack.world import ip_adapter
    from pack_paths import world_weights
    from personalize_pack.world import training_effects as te
    with te.work_folders(tmp_path):
        ip_adapter.build(tmp_path / "ipadapter" / ip_adapter.ADAPTER_NAME, world_weights())
        assert ip_adapter.ADAPTER_NAME in folder_paths.get_filename_list("ipadapter")
        adapter, info = MIPAdapterLoader.execute(ip_adapter.ADAPTER_NAME).result
    assert adapter.variant == "sd15_vit-l" and "16 cross-attention layers" in info
