"""CLIP-T, CLIP-I and DINO as MIP-Adapter's and Custom Diffusion's evaluation computes them
(docs/metrics.md §3.1), on embeddings; and the image preprocessing of each. Pure torch.

* CLIP-T (CLIPScore form): per image ``2.5 * max(0, cos(E_img(g), E_txt(prompt_g)))``, averaged.
* CLIP-I / DINO: the mean over every (generated, reference) pair of ``cos``; no factor, no clipping.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def clip_t(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """Per image ``2.5 * max(0, cos)`` of ``image_embeds[i]`` and ``text_embeds[i]`` (``[N, d]``; one
    text row is used for every image); returns ``[N]`` (average it for the score)."""
    if text_embeds.shape[0] == 1 and image_embeds.shape[0] > 1:
        text_embeds = text_embeds.expand(image_embeds.shape[0], -1)
    if text_embeds.shape != image_embeds.shape:
        raise ValueError(f"prompts: {text_embeds.shape[0]} prompt embeddings for {image_embeds.shape[0]} images")
    cos = F.cosine_similarity(image_embeds.double(), text_embeds.double(), dim=-1)
    return 2.5 * cos.clamp_min(0.0)


def pairwise_mean_cosine(generated: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """CLIP-I / DINO: the mean of ``cos(g, r)`` over every generated ``[N, d]`` × reference ``[K, d]``
    pair (a scalar)."""
    if generated.shape[0] == 0 or references.shape[0] == 0:
        raise ValueError("images: CLIP-I and DINO need at least one generated and one reference image")
    g = F.normalize(generated.double(), dim=-1)
    r = F.normalize(references.double(), dim=-1)
    return (g @ r.T).mean()


def preprocess(images: torch.Tensor, resize: int, crop: int, mean, std) -> torch.Tensor:
    """ComfyUI IMAGE ``[B, H, W, 3]`` (0..1) → ``[B, 3, crop, crop]``: the shorter side resized to
    ``resize`` (bicubic, antialiased), a centre crop, normalised. CLIP: 224/224 with CLIP's mean/std;
    DINO: 256/224 with ImageNet's."""
    if images.dim() != 4 or images.shape[-1] < 3:
        raise ValueError(f"images: expected a ComfyUI IMAGE [B,H,W,3], got {tuple(images.shape)}")
    x = images[..., :3].movedim(-1, 1).float()
    h, w = x.shape[-2:]
    s = resize / min(h, w)
    nh, nw = max(crop, round(h * s)), max(crop, round(w * s))
    x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    top, left = (nh - crop) // 2, (nw - crop) // 2
    x = x[..., top:top + crop, left:left + crop]
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    sd = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / sd


def clip_preprocess(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    return preprocess(images, size, size, CLIP_MEAN, CLIP_STD)


def dino_preprocess(images: torch.Tensor) -> torch.Tensor:
    return preprocess(images, 256, 224, IMAGENET_MEAN, IMAGENET_STD)
