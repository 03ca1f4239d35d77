"""Tiny random-weight checkpoints that ComfyUI detects as SD1.5 and as SDXL-family models
(docs/comfyui-host.md §5). Built with ComfyUI's own classes on the meta device, every key filled
with explicit random values (ComfyUI never initialises weights), saved as fp16 safetensors.

* ``sd15``: UNet width 320 (detection needs it), every level 320 channels, SD1.5's attention
  layout (input 1,2,4,5,7,8; middle; output 3-11), full CLIP-L, SD VAE with a slim decoder: a
  complete checkpoint that CheckpointLoaderSimple loads as SD15.
* ``sdxl``: a UNet-only file with SDXL's conditioning (context 2048, ADM 2816, linear
  transformers, 64-channel heads) and Segmind-Vega's input transformer depths, output attention in
  blocks 0-5: detected as an SDXL-family model (``Segmind_Vega``), loaded with UNETLoader.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

TINY_SD15 = "tiny_sd15.safetensors"     # the file name of the session's tiny SD1.5 checkpoint (conftest.py)

SD15_UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
                 channel_mult=[1, 1, 1, 1], num_heads=8, num_head_channels=-1, use_spatial_transformer=True,
                 legacy=False, context_dim=768, use_linear_in_transformer=False, adm_in_channels=None,
                 transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                 transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], transformer_depth_middle=1)

SDXL_UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2],
                 channel_mult=[1, 1, 1], num_heads=-1, num_head_channels=64, use_spatial_transformer=True,
                 legacy=False, context_dim=2048, use_linear_in_transformer=True, adm_in_channels=2816,
                 num_classes="sequential", transformer_depth=[0, 0, 1, 1, 2, 2],
                 transformer_depth_output=[0, 0, 0, 1, 1, 1, 2, 2, 2], transformer_depth_middle=1)

VAE_DDCONFIG = {'double_z': True, 'z_channels': 4, 'resolution': 256, 'in_channels': 3, 'out_ch': 3, 'ch': 128,
                'ch_mult': [1, 2, 4, 4], 'num_res_blocks': 2, 'attn_resolutions': [], 'dropout': 0.0}


def random_state(module: torch.nn.Module, prefix: str, gen: torch.Generator) -> dict:
    out = {}
    for name, p in list(module.named_parameters()) + list(module.named_buffers()):
        shape = tuple(p.shape)
        leaf = name.rsplit(".", 1)[-1]
        if "embedding" in name or "position" in name and leaf == "weight" and len(shape) == 2:
            t = torch.randn(shape, generator=gen) * 0.02
        elif leaf == "bias":
            t = torch.zeros(shape)
        elif len(shape) <= 1:
            t = torch.ones(shape)          # norm weights, scalars
        else:
            fan_in = math.prod(shape[1:])
            t = torch.randn(shape, generator=gen) / math.sqrt(fan_in)
        out[prefix + name] = t.to(torch.float16)
    return out


def _calibrated(sd: dict, prefix: str) -> dict:
    """Scale the UNet's last convolution so its noise prediction has about unit size, like a trained
    model's (with plain random weights it is ~20x larger, which magnifies rounding differences)."""
    key = prefix + "out.2.weight"
    sd[key] = (sd[key].float() / 16).to(torch.float16)
    return sd


def _unet(config: dict):
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    return UNetModel(**config, device="meta", operations=comfy.ops.disable_weight_init)


def build_sd15(path: Path, seed: int = 0) -> Path:
    import comfy.sd1_clip
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    sd = _calibrated(random_state(_unet(SD15_UNET), "model.diffusion_model.", gen), "model.diffusion_model.")
    slim = dict(VAE_DDCONFIG, ch=32)
    with torch.device("meta"):
        vae = AutoencoderKL(ddconfig=VAE_DDCONFIG, embed_dim=4, decoder_ddconfig=slim)
        clip = comfy.sd1_clip.SD1ClipModel(device="meta")
    sd.update(random_state(vae, "first_stage_model.", gen))
    for k, v in random_state(clip, "", gen).items():
        if k in ("clip_l.transformer.text_projection.weight", "clip_l.logit_scale"):
            continue
        if k.startswith("clip_l."):
            sd["cond_stage_model." + k[len("clip_l."):]] = v
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path


def build_sdxl_unet(path: Path, seed: int = 1) -> Path:
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    sd = _calibrated(random_state(_unet(SDXL_UNET), "", gen), "")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path


TINY_CLIP_VISION = dict(hidden_size=32, image_size=224, intermediate_size=64, num_attention_heads=2,
                        num_hidden_layers=3, patch_size=32, projection_dim=24, num_channels=3, hidden_act="gelu",
                        layer_norm_eps=1e-5, model_type="clip_vision_model")


def build_clip_vision(seed: int = 2, **overrides):
    """A CLIP vision model of ComfyUI's own classes (``comfy.clip_vision.ClipVisionModel``) at a
    tiny width, every weight filled with explicit random values."""
    import comfy.clip_vision

    cv = comfy.clip_vision.ClipVisionModel(dict(TINY_CLIP_VISION, **overrides))
    sd = {k: v.float() for k, v in random_state(cv.model, "", torch.Generator().manual_seed(seed)).items()}
    missing, unexpected = cv.load_sd(sd)
    assert not missing and not unexpected, (missing, unexpected)
    return cv


def tiny_photomaker_class(pm=None):
    """ComfyUI's own PhotoMaker ID encoder (``comfy_extras.nodes_photomaker``: its forward, its fuse
    module) at a tiny width fitted to SD1.x's 768-wide conditioning: a tiny CLIP vision tower whose two
    projections give 384 + 384 (the real one: ViT-L, 768 + 1280 for SDXL's 2048)."""
    import comfy.clip_model
    import comfy.model_management
    import comfy.ops
    if pm is None:                    # the module ComfyUI loaded the PhotoMaker nodes from, or a fresh import
        from comfy_extras import nodes_photomaker as pm

    class TinyPhotoMakerIDEncoder(pm.PhotoMakerIDEncoder):
        def __init__(self):
            self.load_device = comfy.model_management.text_encoder_device()
            cfg = dict(TINY_CLIP_VISION, projection_dim=384, hidden_act="quick_gelu")
            comfy.clip_model.CLIPVisionModelProjection.__init__(self, cfg, torch.float32, "cpu", comfy.ops.manual_cast)
            self.visual_projection_2 = comfy.ops.manual_cast.Linear(cfg["hidden_size"], 384, bias=False)
            self.fuse_module = pm.FuseModule(768, comfy.ops.manual_cast)

    return TinyPhotoMakerIDEncoder


def build_photomaker(path: Path, seed: int = 4) -> Path:
    """A random tiny PhotoMaker file (the ID encoder's keys, as a safetensors PhotoMaker file holds
    them) for ``tiny_photomaker_class``."""
    from safetensors.torch import save_file

    enc = tiny_photomaker_class()()
    sd = {k: v.float() for k, v in random_state(enc, "", torch.Generator().manual_seed(seed)).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path
