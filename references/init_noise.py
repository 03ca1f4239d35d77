"""MuDI's mean-shifted noise initialisation (docs/algorithms.md §5.4). Pure torch.

The paper starts sampling from noise whose mean is shifted toward a collage of the segmented
subjects; its code for this step is not public, so the formula here is a reconstruction:

    noise = eps + (gamma / sigma_max) * m * (z - mu_bg)

* ``eps``: the sampler's usual seeded noise (ComfyUI's ``prepare_noise``), so ``gamma = 0`` is plain
  noise, bit for bit.
* ``z``: the collage's latent in the model's space (VAE latent after ``process_latent_in``).
* ``m``: the union of the subject masks on the latent grid (area-resized, so soft at the edges);
  ``mu_bg``: the per-channel mean of ``z`` over the background (where ``m`` < 0.5). The shift is
  therefore zero outside the subjects, and inside them it is the subjects' difference from the
  background: the noise's mean moves toward the subjects, where they are, and the background stays
  free. Without masks ``m = 1`` and ``mu_bg`` is the mean over the whole latent: the latent with its
  per-channel mean removed.
* ``gamma / sigma_max``: a sampler starts from ``sigma_max * noise`` (ε-prediction models: the
  input latent plus ``sigma_max`` times the noise; flow models: ``sigma = 1``, the noise itself). The
  subjects therefore enter the starting point as ``gamma * m * (z - mu_bg)`` for every model
  family: ``gamma = 1`` puts the subjects' latent into the start at full strength, as an
  image-to-image start at full denoise would; the default is that.
"""
from __future__ import annotations

import torch

from .masks import as_mask_batch, resize_plane


def shift_latent(latent: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
    """``m * (z - mu_bg)`` for a model-space latent ``[1 or B, C, h, w]`` and subject masks
    ``[N, H, W]`` of the image it encodes (any size with its aspect ratio; None: no masks)."""
    z = latent.float()
    if masks is None:
        return z - z.mean(dim=(-2, -1), keepdim=True)
    m = as_mask_batch(masks, "masks").clamp(0, 1)
    if m.shape[0] > 1:
        m = m.max(dim=0, keepdim=True).values          # union of the subjects
    H, W = m.shape[-2:]
    h, w = z.shape[-2:]
    if abs(H / W - h / w) > 0.02 * (h / w):
        raise ValueError(f"masks: {W}x{H} masks do not have the aspect ratio of the latent ({w}x{h} cells); use the "
                         f"masks of the composed image")
    cov = resize_plane(m, h, w).clamp(0, 1)[:, None]     # [1, 1, h, w]
    bg = cov < 0.5
    if bool(bg.any()):
        weight = bg.to(z.dtype)
        mu = (z * weight).sum(dim=(-2, -1), keepdim=True) / weight.sum(dim=(-2, -1), keepdim=True)
    else:
        mu = z.mean(dim=(-2, -1), keepdim=True)
    return cov * (z - mu)


class MeanShiftedNoise:
    """A ComfyUI NOISE object (``seed`` + ``generate_noise(latent_dict)``) for SamplerCustomAdvanced.

    ``shift``: ``m * (z - mu_bg)`` ``[1 or B, C, h, w]`` (``shift_latent``); ``gamma``;
    ``sigma_max`` of the model's schedule. ``base_noise(latent_dict, seed)``: the plain noise
    (default: ComfyUI's ``prepare_noise``, the noise of core's RandomNoise node)."""

    def __init__(self, seed: int, shift: torch.Tensor, gamma: float, sigma_max: float, base_noise=None):
        if not sigma_max > 0:
            raise ValueError(f"model: its sigma_max must be positive, got {sigma_max}")
        self.seed = int(seed)
        self.shift = shift.detach().float().cpu()
        self.gamma = float(gamma)
        self.sigma_max = float(sigma_max)
        self.base_noise = base_noise

    def plain(self, input_latent: dict) -> torch.Tensor:
        if self.base_noise is not None:
            return self.base_noise(input_latent, self.seed)
        import comfy.sample
        latent = input_latent["samples"]
        return comfy.sample.prepare_noise(latent, self.seed, input_latent.get("batch_index"))

    def generate_noise(self, input_latent: dict) -> torch.Tensor:
        eps = self.plain(input_latent)
        if self.gamma == 0.0:
            return eps
        samples = input_latent["samples"]
        if samples.dim() != 4:
            raise ValueError(f"latent: mean-shifted noise needs an image latent [B,C,H,W], got shape "
                             f"{tuple(samples.shape)} (a video latent?)")
        b, c, h, w = samples.shape
        s = self.shift
        if s.shape[1] != c:
            raise ValueError(f"latent: the subjects' latent has {s.shape[1]} channels but the sampled latent has {c}; "
                             f"encode the composed image with the VAE of this model")
        if s.shape[-2:] != (h, w):
            sh, sw = s.shape[-2:]
            if abs(sh / sw - h / w) > 0.02 * (h / w):
                raise ValueError(f"latent: the composed image ({sw * 8}x{sh * 8} px) does not have the aspect ratio of "
                                 f"the latent being sampled ({w * 8}x{h * 8} px); compose at the size you generate")
            s = resize_plane(s, h, w)
        if s.shape[0] not in (1, b):
            raise ValueError(f"latent: {s.shape[0]} subject latents for a batch of {b}")
        return eps + (self.gamma / self.sigma_max) * s.to(eps.dtype).expand(b, -1, -1, -1)
