"""The world's text encoder: a full-size CLIP-L (what an SD1.x checkpoint carries) whose weights are
drawn from a seed instead of trained, so it is rebuilt rather than committed. Each tensor has its own
generator, seeded from the world's seed and the tensor's name, so the weights do not depend on the
order ComfyUI's class lists its parameters in. Its output still carries each token and the tokens
before it; the world's UNet learns to read it."""
from __future__ import annotations

import math
import zlib

import torch

CLIP_SEED = 1234
CHECKPOINT_PREFIX = "cond_stage_model."        # where an SD1.x checkpoint keeps its CLIP-L
SKIPPED = ("clip_l.transformer.text_projection.weight", "clip_l.logit_scale")


def seeded_tensor(name: str, shape: tuple, seed: int) -> torch.Tensor:
    """One tensor of the seeded encoder: token and position embeddings N(0, 0.02^2), biases 0, norm
    weights 1, every other matrix N(0, 1/fan_in)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    leaf = name.rsplit(".", 1)[-1]
    if "embedding" in name and len(shape) == 2:
        return torch.randn(shape, generator=gen) * 0.02
    if leaf == "bias":
        return torch.zeros(shape)
    if len(shape) <= 1:
        return torch.ones(shape)
    return torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))


def clip_state_dict(seed: int = CLIP_SEED, prefix: str = CHECKPOINT_PREFIX, dtype=torch.float16) -> dict:
    """The seeded CLIP-L under an SD1.x checkpoint's key names (needs ComfyUI for the key list)."""
    import comfy.sd1_clip
    with torch.device("meta"):
        clip = comfy.sd1_clip.SD1ClipModel(device="meta")
    out = {}
    for name, p in list(clip.named_parameters()) + list(clip.named_buffers()):
        if name in SKIPPED or not name.startswith("clip_l."):
            continue
        if name.endswith("position_ids"):
            out[prefix + name[len("clip_l."):]] = torch.arange(p.shape[-1]).expand(p.shape).clone()
            continue
        out[prefix + name[len("clip_l."):]] = seeded_tensor(name, tuple(p.shape), seed).to(dtype)
    return out


def load_clip(seed: int = CLIP_SEED):
    """A ComfyUI CLIP object (tokenizer and encoder) holding the seeded weights."""
    import comfy.sd
    sd = clip_state_dict(seed, prefix="", dtype=torch.float32)
    sd = {k[len("transformer."):]: v for k, v in sd.items()}
    return comfy.sd.load_text_encoder_state_dicts([sd], clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION)


@torch.no_grad()
def encode_captions(clip, captions: list, batch: int = 32, log=None) -> torch.Tensor:
    """[N, 77, 768] conditioning for each caption, as CLIPTextEncode computes it (captions of one
    77-token chunk, weights 1), several captions per encoder call."""
    clip.load_model()
    enc = clip.cond_stage_model
    out = []
    for i in range(0, len(captions), batch):
        toks = []
        for text in captions[i:i + batch]:
            chunks = clip.tokenize(text)["l"]
            if len(chunks) != 1:
                raise ValueError(f"caption {text!r} is longer than one 77-token chunk")
            toks.append([t for t, _w in chunks[0]])
        enc.reset_clip_options()
        z, _ = enc.clip_l.encode(toks)
        out.append(z.float().cpu())
        if log is not None and (i // batch) % 20 == 0:
            log(f"captions {i + len(toks)}/{len(captions)}")
    return torch.cat(out)
