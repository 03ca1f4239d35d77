"""Tiny random-weight FLUX models that ComfyUI detects as FLUX (docs/comfyui-host.md §5): 128
channels per head (RoPE axes [16, 56, 56]), text and pooled width 768 so that the SD1 CLIP of the
tiny checkpoint conditions them, guidance embedding (FLUX dev) or none (schnell). Built with
ComfyUI's own ``Flux`` class on the meta device, every key filled with ``tiny_models.random_state``,
saved unprefixed (UNETLoader / ``comfy.sd.load_diffusion_model``). Also a 16-channel VAE, the
shape of FLUX's ``ae.safetensors``, with a slim decoder, and a tiny SD3-family MMDiT."""
from __future__ import annotations

from pathlib import Path

import torch

from tiny_models import VAE_DDCONFIG, random_state


def flux_params(heads: int = 1, depth: int = 1, single: int = 1, guidance: bool = True) -> dict:
    return dict(in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=768, hidden_size=128 * heads,
                mlp_ratio=4.0, num_heads=heads, depth=depth, depth_single_blocks=single, axes_dim=[16, 56, 56],
                theta=10000, patch_size=2, qkv_bias=True, guidance_embed=guidance, txt_ids_dims=[])


def build_flux(path: Path, heads: int = 1, depth: int = 1, single: int = 1, guidance: bool = True,
               seed: int = 5) -> Path:
    import comfy.ops
    from comfy.ldm.flux.model import Flux
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    model = Flux(image_model="flux", device="meta", operations=comfy.ops.disable_weight_init,
                 **flux_params(heads, depth, single, guidance))
    sd = random_state(model, "", gen)
    # A trained model's velocity is about unit size; the random final layer gives ~10x that.
    sd["final_layer.linear.weight"] = (sd["final_layer.linear.weight"].float() / 8).to(torch.float16)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path


def build_flux_vae(path: Path, seed: int = 6) -> Path:
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    config = dict(VAE_DDCONFIG, z_channels=16)
    with torch.device("meta"):
        vae = AutoencoderKL(ddconfig=config, embed_dim=16, decoder_ddconfig=dict(config, ch=32))
    sd = random_state(vae, "", gen)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path


def build_sd3(path: Path, depth: int = 2, self_attn_layers=(0,), seed: int = 8) -> Path:
    """A tiny SD3-family MMDiT (``OpenAISignatureMMDITWrapper``): ``depth`` joint blocks of width
    64·depth (ComfyUI reads the depth from the width), 16 latent channels, patch 2, text and pooled
    width 768 (the SD1 CLIP conditions it), RMS QK-norm, and SD3.5-medium's second image-only
    attention in the blocks ``self_attn_layers``. Detected as SD3; position table for up to 32x32
    latents."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.mmdit import OpenAISignatureMMDITWrapper
    from safetensors.torch import save_file

    config = dict(input_size=None, patch_size=2, in_channels=16, depth=depth, out_channels=16, adm_in_channels=768,
                  context_embedder_config={"target": "torch.nn.Linear",
                                           "params": {"in_features": 768, "out_features": 64 * depth}},
                  num_patches=256, pos_embed_max_size=16, qk_norm="rms", x_block_self_attn_layers=list(self_attn_layers),
                  pos_embed_scaling_factor=None)
    model = OpenAISignatureMMDITWrapper(**config, device="meta", operations=comfy.ops.disable_weight_init)
    sd = random_state(model, "", torch.Generator().manual_seed(seed))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path
