"""Tiny random-weight models of the families that take reference images natively, built from
ComfyUI's own classes (docs/comfyui-host.md §5):

* FLUX.2 (``Flux`` with ``image_model="flux2"``: global modulation, 4 RoPE axes of 32, patch 1,
  128 latent channels), saved unprefixed so that Load Diffusion Model detects it as FLUX.2;
* Qwen-Image (``QwenImageTransformer2DModel``). ComfyUI reads only its depth and input width from a
  file (the rest are the 20B model's widths), so the tiny one is built in-process through the
  ``QwenImage`` model config and wrapped in a ``ModelPatcher``, as the loader would.

* Chroma (``Chroma``: FLUX.1's blocks, modulations from a small approximator network), built
  in-process too: ComfyUI fixes its approximator's widths to the 8.9B model's.

FLUX.1 Kontext is the FLUX.1 class with reference latents, so ``tiny_flux.build_flux`` serves it.
"""
from __future__ import annotations

from pathlib import Path

import torch

from tiny_models import random_state

FLUX2_TEXT = 64          # text width of the tiny FLUX.2 (real: 7680 / 12288, Qwen3 / Mistral hidden states)
QWEN_TEXT = 64           # text width of the tiny Qwen-Image (real: 3584)


def flux2_params(heads: int = 2, depth: int = 1, single: int = 1, text: int = FLUX2_TEXT) -> dict:
    return dict(in_channels=128, out_channels=128, vec_in_dim=None, context_in_dim=text, hidden_size=128 * heads,
                mlp_ratio=3.0, num_heads=heads, depth=depth, depth_single_blocks=single, axes_dim=[32, 32, 32, 32],
                theta=2000, patch_size=1, qkv_bias=False, guidance_embed=False, txt_ids_dims=[3],
                global_modulation=True, mlp_silu_act=True, ops_bias=False, default_ref_method="index",
                ref_index_scale=10.0)


def build_flux2(path: Path, heads: int = 2, depth: int = 1, single: int = 1, seed: int = 11,
                text: int = FLUX2_TEXT) -> Path:
    import comfy.ops
    from comfy.ldm.flux.model import Flux
    from safetensors.torch import save_file

    model = Flux(image_model="flux2", device="meta", operations=comfy.ops.disable_weight_init,
                 **flux2_params(heads, depth, single, text))
    sd = random_state(model, "", torch.Generator().manual_seed(seed))
    sd["final_layer.linear.weight"] = (sd["final_layer.linear.weight"].float() / 8).to(torch.float16)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path


def qwen_config(heads: int = 2, depth: int = 2, text: int = QWEN_TEXT) -> dict:
    return dict(image_model="qwen_image", patch_size=2, in_channels=64, out_channels=16, num_layers=depth,
                attention_head_dim=32, num_attention_heads=heads, joint_attention_dim=text,
                axes_dims_rope=(8, 12, 12))


def _in_process(config_class, unet_config: dict, seed: int, last: str):
    """A ModelPatcher of ``config_class(unet_config)``'s model on the CPU in float32, every weight
    random (``tiny_models.random_state``), the output layer ``last`` scaled to about unit output."""
    import comfy.model_patcher

    config = config_class(unet_config)
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, device=torch.device("cpu"))
    sd = random_state(model.diffusion_model, "", torch.Generator().manual_seed(seed))
    sd[last] = (sd[last].float() / 8).to(torch.float16)
    model.diffusion_model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def build_qwen(heads: int = 2, depth: int = 2, seed: int = 12, text: int = QWEN_TEXT):
    """A tiny Qwen-Image (Edit) as a ModelPatcher, on the CPU in float32."""
    import comfy.supported_models
    return _in_process(comfy.supported_models.QwenImage, qwen_config(heads, depth, text), seed, "proj_out.weight")


def chroma_config(heads: int = 2, depth: int = 2, single: int = 2, text: int = 768) -> dict:
    return dict(image_model="chroma", in_channels=64, out_channels=64, context_in_dim=text, hidden_size=128 * heads,
                mlp_ratio=4.0, num_heads=heads, depth=depth, depth_single_blocks=single, axes_dim=[16, 56, 56],
                theta=10000, patch_size=2, qkv_bias=True, in_dim=64, out_dim=128 * heads, hidden_dim=128,
                n_layers=1, txt_ids_dims=[], vec_in_dim=None)


def build_chroma(heads: int = 2, depth: int = 2, single: int = 2, text: int = 768, seed: int = 14):
    """A tiny Chroma as a ModelPatcher (text width 768: the SD1 CLIP of the tiny checkpoint conditions
    it, as it does the tiny FLUX.1)."""
    import comfy.supported_models
    return _in_process(comfy.supported_models.Chroma, chroma_config(heads, depth, single, text), seed,
                       "final_layer.linear.weight")


def build_flux2_vae(path: Path, seed: int = 15) -> Path:
    """A VAE ComfyUI loads as FLUX.2's: 32 latent channels with the batch-norm of the 2x2-packed latent
    (``bn.running_mean``), so 128 channels at 1/16 of the image; slim decoder."""
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from safetensors.torch import save_file

    from tiny_models import VAE_DDCONFIG
    config = dict(VAE_DDCONFIG, z_channels=32, batch_norm_latent=True)
    with torch.device("meta"):
        vae = AutoencoderKL(ddconfig=config, embed_dim=32, decoder_ddconfig=dict(config, ch=32))
    sd = random_state(vae, "", torch.Generator().manual_seed(seed))
    sd["bn.num_batches_tracked"] = torch.tensor(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path


def build_wan_vae(path: Path, dim: int = 8, seed: int = 16) -> Path:
    """A Wan 2.1-layout VAE (Qwen-Image's) of base width ``dim`` (the real one: 96): 16 latent channels,
    1/8 of the image, latents ``[B, 16, T, H, W]``."""
    from comfy.ldm.wan.vae import WanVAE
    from safetensors.torch import save_file

    with torch.device("meta"):
        vae = WanVAE(dim=dim, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                     temperal_downsample=[False, True, True], dropout=0.0)
    sd = random_state(vae, "", torch.Generator().manual_seed(seed))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path
