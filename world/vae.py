"""The world's VAE: ComfyUI's TAESD layout (``taesd_encoder.*`` / ``taesd_decoder.*`` with
``vae_scale`` and ``vae_shift``), trained here on the world's scenes.

The encoder's full- and half-resolution residual blocks are switched off (their last convolution is
zero, so each is a ReLU): the world's images need little encoder depth, and encoding the training
set then costs a sixth as much. The decoder is whole. ComfyUI needs nothing special: the file holds
every TAESD key, the switched-off ones as zeros."""
from __future__ import annotations

import time

import numpy as np
import torch

from . import data
from .init_weights import init_weights

LATENT_SCALE = 0.18215          # SD1.x's latent factor: the model sees (encoder output / vae_scale) * this
OFF_ENCODER_BLOCKS = (1, 3, 4, 5)   # indices in TAESD's Encoder sequence of the blocks switched off


def build_taesd(seed: int):
    """A TAESD of ComfyUI's class, initialised from ``seed``, with the light encoder in place."""
    from comfy.taesd.taesd import TAESD
    tae = TAESD(latent_channels=4)
    init_weights(tae, torch.Generator().manual_seed(seed))
    for i in OFF_ENCODER_BLOCKS:
        tae.taesd_encoder[i] = torch.nn.ReLU()
    return tae


def export_state(tae, latent_std: float) -> dict:
    """The VAE file's state dict: every TAESD key (switched-off blocks as zeros), ``vae_scale`` set so
    the diffusion model sees latents of unit spread, ``vae_shift`` zero."""
    from comfy.taesd.taesd import Block
    sd = {}
    for i, layer in enumerate(tae.taesd_encoder):
        if i in OFF_ENCODER_BLOCKS:
            off = Block(64, 64)
            sd.update({f"taesd_encoder.{i}.{k}": torch.zeros(v.shape) for k, v in off.state_dict().items()})
        else:
            sd.update({f"taesd_encoder.{i}.{k}": v.detach().clone() for k, v in layer.state_dict().items()})
    sd.update({f"taesd_decoder.{k}": v.detach().clone() for k, v in tae.taesd_decoder.state_dict().items()})
    sd["vae_scale"] = torch.tensor(LATENT_SCALE * latent_std)
    sd["vae_shift"] = torch.tensor(0.0)
    return sd


def load_state(sd: dict):
    """A ComfyUI TAESD with the world VAE's weights (for training the scorer and the UNet)."""
    from comfy.taesd.taesd import TAESD
    tae = TAESD(latent_channels=4)
    tae.load_state_dict({k: v.float() for k, v in sd.items()})
    for i in OFF_ENCODER_BLOCKS:
        tae.taesd_encoder[i] = torch.nn.ReLU()
    return tae.eval()


def _crops(rng: np.random.Generator, n: int, crop: int, object_weight: float = 1.0) -> tuple:
    """n crops of fresh training scenes, cut on the 8-pixel latent grid (the patterns' phase stays
    that of a whole image) and usually around an object; and per-pixel loss weights
    (``object_weight`` on objects, 1 on the background)."""
    out = np.empty((n, crop, crop, 3), np.float32)
    weights = np.ones((n, 1, crop, crop), np.float32)
    top = data.SIZE - crop
    for k in range(n):
        scene = data.sample_scene(rng)
        img, masks = data.render(scene)
        if rng.random() < 0.8:
            t = scene.things[rng.integers(len(scene.things))]
            x0 = int(np.clip(t.cx - crop / 2 + rng.uniform(-8, 8), 0, top)) // 8 * 8
            y0 = int(np.clip(t.cy - crop / 2 + rng.uniform(-8, 8), 0, top)) // 8 * 8
        else:
            x0, y0 = (int(v) * 8 for v in rng.integers(0, top // 8 + 1, size=2))
        out[k] = data.to_float(img[y0:y0 + crop, x0:x0 + crop])
        on = np.any(masks, axis=0)[y0:y0 + crop, x0:x0 + crop]
        weights[k, 0][on] = object_weight
    return torch.from_numpy(out).permute(0, 3, 1, 2), torch.from_numpy(weights)


# The two training phases: the first learns the layout and the colours; the second, from the first's
# weights, weights the objects' pixels 4x so the decoder learns the patterns' texture.
PHASES = ({"steps": 1500, "lr": 1e-3, "latent_noise": 0.1, "object_weight": 1.0},
          {"steps": 1200, "lr": 6e-4, "latent_noise": 0.05, "object_weight": 4.0})


def train(seed: int = 0, steps: int = 1500, batch: int = 32, crop: int = 32, lr: float = 1e-3,
          latent_noise: float = 0.1, latent_l2: float = 1e-3, object_weight: float = 1.0, init: dict | None = None,
          phase: int = 0, log=print) -> tuple:
    """Train encoder and decoder together on image crops (L1 + MSE reconstruction weighted per pixel, a
    small L2 pull on the latents, and Gaussian noise on the latents before decoding so the decoder
    tolerates a diffusion model's imperfect latents); ``init``: a previous phase's state dict.
    Returns (state dict, history)."""
    torch.manual_seed(seed + phase)
    rng = np.random.default_rng([seed, phase])
    tae = build_taesd(seed)
    if init is not None:
        state = {k: v.float() for k, v in init.items()}
        tae.taesd_encoder.load_state_dict({k[len("taesd_encoder."):]: v for k, v in state.items()
                                           if k.startswith("taesd_encoder.")
                                           and int(k.split(".")[1]) not in OFF_ENCODER_BLOCKS})
        tae.taesd_decoder.load_state_dict({k[len("taesd_decoder."):]: v for k, v in state.items()
                                           if k.startswith("taesd_decoder.")})
    params = list(tae.taesd_encoder.parameters()) + list(tae.taesd_decoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    history = []
    t0 = time.time()
    for step in range(steps):
        x, w = _crops(rng, batch, crop, object_weight)
        z = tae.taesd_encoder(x)
        y = tae.taesd_decoder(z + latent_noise * torch.randn_like(z))
        rec = ((y - x).abs() * w).mean() + ((y - x).square() * w).mean()
        loss = rec + latent_l2 * z.square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        history.append(float(rec.detach()))
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step} reconstruction {np.mean(history[-100:]):.4f} ({time.time() - t0:.0f} s)")
    tae.eval()
    with torch.no_grad():
        imgs = images_tensor([data.render(data.sample_scene(rng))[0] for _ in range(64)])
        std = float(tae.taesd_encoder(imgs).std())
    return export_state(tae, std), history


def images_tensor(images: list) -> torch.Tensor:
    """uint8 [H, W, 3] arrays -> float [N, 3, H, W] in [0, 1] (the encoder's input)."""
    return torch.from_numpy(np.stack([data.to_float(i) for i in images])).permute(0, 3, 1, 2)


@torch.no_grad()
def encode(tae, images: torch.Tensor, latent_scale: float | None = None) -> torch.Tensor:
    """[N, 3, H, W] in [0, 1] -> the latents the diffusion model sees (encoder output / vae_scale *
    LATENT_SCALE, as ComfyUI's VAEEncode and the SD1.x latent format compute them)."""
    scale = float(tae.vae_scale) if latent_scale is None else latent_scale
    return tae.taesd_encoder(images) / scale * LATENT_SCALE


@torch.no_grad()
def decode(tae, latents: torch.Tensor) -> torch.Tensor:
    """Model-space latents -> [N, 3, H, W] images in [0, 1]."""
    return tae.taesd_decoder(latents / LATENT_SCALE * float(tae.vae_scale)).clamp(0, 1)
