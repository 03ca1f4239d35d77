"""The world model inside ComfyUI, for measuring effects: load the checkpoint with ComfyUI's loader,
encode prompts with its CLIP, sample with its samplers, decode with its VAE, read the images with the
world's scorer. The default sampler settings are the ones the quality bar is measured at."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import checkpoint, scorer

LATENT = (4, 16, 16)


@dataclass(frozen=True)
class Settings:
    steps: int = 20
    cfg: float = 5.0
    sampler: str = "euler"
    scheduler: str = "normal"
    negative: str = ""


class World:
    def __init__(self, model, clip, vae, reader: scorer.Scorer, settings: Settings = Settings()):
        self.model, self.clip, self.vae, self.scorer, self.settings = model, clip, vae, reader, settings
        self._conds: dict = {}

    @classmethod
    def load(cls, path: Path, weights: Path = checkpoint.WEIGHTS, settings: Settings = Settings()) -> World:
        """ComfyUI must be imported (CPU mode) before; ``path``: the built checkpoint."""
        model, clip, vae = checkpoint.check_loadable(path)
        reader = scorer.Scorer.from_state(checkpoint.read_part(checkpoint.SCORER_FILE, weights))
        return cls(model, clip, vae, reader, settings)

    def cond(self, text: str):
        if text not in self._conds:
            self._conds[text] = self.clip.encode_from_tokens_scheduled(self.clip.tokenize(text))
        return self._conds[text]

    @staticmethod
    def noise(seeds: list) -> torch.Tensor:
        """RandomNoise's noise for each seed (a one-image latent each), stacked."""
        import comfy.sample
        return torch.cat([comfy.sample.prepare_noise(torch.zeros(1, *LATENT), int(s)) for s in seeds])

    def sample(self, prompt: str, seeds: list, model=None, noise: torch.Tensor | None = None, positive=None,
               negative=None) -> torch.Tensor:
        """Latents [B, 4, 16, 16], one per seed (the seeds' noise unless ``noise`` is given); ``positive``
        and ``negative``: conditionings to use instead of the prompt's and the settings' negative."""
        import comfy.sample
        s = self.settings
        noise = self.noise(seeds) if noise is None else noise
        latent = torch.zeros(noise.shape[0], *LATENT)
        return comfy.sample.sample(model or self.model, noise, s.steps, s.cfg, s.sampler, s.scheduler,
                                   self.cond(prompt) if positive is None else positive,
                                   self.cond(s.negative) if negative is None else negative, latent, disable_pbar=True,
                                   seed=int(seeds[0]))

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Images float [B, 128, 128, 3] in [0, 1] (VAEDecode)."""
        with torch.no_grad():
            return self.vae.decode(latents).detach().float().clamp(0, 1).cpu().numpy()

    def images(self, prompt: str, seeds: list, model=None, noise=None) -> np.ndarray:
        return self.decode(self.sample(prompt, seeds, model, noise))

    def read(self, images: np.ndarray) -> list:
        return [self.scorer.read(img) for img in images]
