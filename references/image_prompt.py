"""Image prompts for MIP-Adapter (``PERSONALIZE_IMAGE_PROMPT``): the images of one object, the
word of the prompt that names it, an optional region of the generated image and a weight; the
square framing of the images before the CLIP vision encoder; and their encoding into an adapter's
image-prompt tokens. Pure torch (the CLIP vision model and the adapter are duck-typed)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .masks import as_mask_batch, fit_box, resize_plane
from .prompt_tokens import find_token_positions, prompt_token_ids, word_token_ids
from .reference import check_image

CROPS = ("center", "pad")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)      # the CLIP vision encoder's normalisation mean


@dataclass(frozen=True, eq=False)
class ImagePrompt:
    """``image``: ``[B, H, W, 3]`` views of one object (their image-prompt tokens are averaged).
    ``entity``: the word of the prompt naming the object. ``mask``: ``[H, W]`` region of the
    generated image the object should take (overrides the entity word's attention map) or None.
    ``crop``: how a non-square image is framed for the CLIP vision encoder."""
    image: torch.Tensor
    entity: str
    weight: float = 1.0
    mask: torch.Tensor | None = None
    crop: str = "center"
    name: str = "image prompt"


def make_image_prompt(image, entity: str, weight: float = 1.0, mask=None, crop: str = "center",
                      name: str = "image prompt") -> ImagePrompt:
    """Checks the inputs of one image prompt and normalises them."""
    check_image(image)
    entity = (entity or "").strip()
    if not entity:
        raise ValueError("entity: empty; give the word of your prompt that names this object (e.g. 'cat')")
    if crop not in CROPS:
        raise ValueError(f"crop: unknown '{crop}'; choose one of {list(CROPS)}")
    m = None
    if mask is not None:
        mb = as_mask_batch(mask, "mask")
        if mb.shape[0] != 1:
            raise ValueError(f"mask: {mb.shape[0]} masks given for one image prompt; give one mask (the region "
                             f"of the generated image this object takes), one per MIP-Adapter Reference")
        m = mb[0].clamp(0, 1).contiguous()
        if float(m.max()) <= 0:
            raise ValueError("mask: the mask is empty, so this object would appear nowhere; draw its region or "
                             "leave the mask unconnected to let the entity word place it")
    return ImagePrompt(image=image[..., :3].float().cpu(), entity=entity, weight=float(weight), mask=m, crop=crop,
                       name=name)


def square_pad(image: torch.Tensor, fill: float = 1.0) -> torch.Tensor:
    """Pad ``[B, H, W, 3]`` to a square with ``fill`` (white, as MIP-Adapter's training crops were),
    the image centred and not resized."""
    _, H, W, _ = image.shape
    if H == W:
        return image
    s = max(H, W)
    top, left, h, w = fit_box(H, W, s, s)
    out = torch.full((image.shape[0], s, s, image.shape[-1]), fill, dtype=image.dtype)
    out[:, top:top + h, left:left + w] = image if (h, w) == (H, W) else \
        resize_plane(image.movedim(-1, 1), h, w).movedim(1, -1)
    return out


def framed(prompt: ImagePrompt) -> torch.Tensor:
    """The images as they go to the CLIP vision encoder (which centre-crops to a square)."""
    return square_pad(prompt.image) if prompt.crop == "pad" else prompt.image


def mean_colour_image(mean, size: int = 224) -> torch.Tensor:
    """An image whose CLIP normalisation is (within 8-bit rounding) zero: the encoder input the
    official plus adapters use for the unconditional image prompt."""
    colour = torch.tensor([round(255 * float(c)) / 255 for c in mean], dtype=torch.float32)
    return colour.view(1, 1, 1, 3).expand(1, size, size, 3).contiguous()


def encode_image_prompts(adapter, clip_vision, prompts) -> tuple[list, torch.Tensor]:
    """Image-prompt tokens ``[n_tok, ctx]`` per object (views averaged) and the empty image's tokens:
    ``clip_vision.encode_image`` (ComfyUI's CLIP vision model) gives the output the adapter reads
    (``adapter.clip_output``), ``adapter.project`` (``attention.ip_adapter``) makes the tokens."""
    want = adapter.clip_output

    def feats(images, crop=True):
        out = clip_vision.encode_image(images, crop=crop)
        try:
            return out[want]
        except (KeyError, AttributeError):
            raise ValueError(f"clip_vision: this CLIP vision model gives no '{want}', which the adapter needs") from None

    tokens = []
    for p in prompts:
        with torch.no_grad():
            tokens.append(adapter.project(feats(framed(p)).float().cpu()).mean(0))
    with torch.no_grad():
        if want == "image_embeds":
            uncond = adapter.project(torch.zeros(1, adapter.clip_width))[0]
        else:
            mean = getattr(clip_vision, "image_mean", CLIP_MEAN)
            size = int(getattr(clip_vision, "image_size", 224))
            uncond = adapter.project(feats(mean_colour_image(mean, size)).float().cpu())[0]
    return tokens, uncond


def encode_entities(clip, prompt: str, prompts, context_dim: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per object: the entity word's embedding tokens ``1..L`` (after the start token) for the
    positive side and the empty prompt's tokens ``1..L`` for the negative side (§3.2)."""
    if not (prompt or "").strip():
        raise ValueError("prompt: empty; give the positive prompt, exactly as in your CLIP Text Encode")
    prompt_ids = prompt_token_ids(clip, prompt)
    empty = clip.encode_from_tokens(clip.tokenize(""))
    if empty.shape[-1] != context_dim:
        raise ValueError(f"clip: its conditioning is {empty.shape[-1]} wide but the adapter was trained for "
                         f"{context_dim}; use the CLIP of the checkpoint the adapter belongs to")
    out = []
    for p in prompts:
        word_ids = word_token_ids(clip, p.entity)
        find_token_positions(prompt_ids, word_ids, word=f"entity '{p.entity}' of {p.name}")
        n = len(word_ids)
        if n > empty.shape[1] - 2:
            raise ValueError(f"entity '{p.entity}': {n} tokens is too long; use the one or two words naming it")
        cond = clip.encode_from_tokens(clip.tokenize(p.entity))
        out.append((cond[0, 1:1 + n].float().cpu(), empty[0, 1:1 + n].float().cpu()))
    return out
