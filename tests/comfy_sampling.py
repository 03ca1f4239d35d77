"""Running the pack inside ComfyUI from an integration test: images and masks in ComfyUI's IMAGE and
MASK layouts, text conditioning, sampling a latent, comparing two samples, and a snapshot of what a
patch node must leave unchanged on its input MODEL."""
from __future__ import annotations

import copy

import torch

from comfy_host import import_comfy


def load_image(path, size=64):
    """An image file as a ComfyUI IMAGE (1, size, size, 3) in [0, 1]."""
    import numpy as np
    from PIL import Image
    im = Image.open(path).convert("RGB").resize((size, size))
    return torch.from_numpy(np.asarray(im).astype("float32") / 255.0)[None]


def load_mask(path, size=64):
    """An image file's first channel as a ComfyUI MASK (1, size, size)."""
    return load_image(path, size)[..., 0]


def tiny_diffusion_model(tiny_dir, builder: str, name: str, **kw):
    """Build ``tiny_flux.<builder>`` into ``tiny_dir/diffusion_models/<name>`` and load it as Load
    Diffusion Model does."""
    import_comfy()
    import comfy.sd
    import tiny_flux
    path = getattr(tiny_flux, builder)(tiny_dir / "diffusion_models" / name, **kw)
    return comfy.sd.load_diffusion_model(str(path))


def ref_node():
    from personalize_pack.nodes.references import ReferenceEncode
    return ReferenceEncode


def encode(clip, text):
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def sample(model, positive, negative, size=(8, 8), batch=1, steps=3, cfg=5.0, seed=3, sampler="euler",
           scheduler="normal"):
    comfy = import_comfy()
    latent = torch.zeros(batch, 4, *size)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, positive, negative, latent,
                               disable_pbar=True, seed=seed)


def assert_same_sample(a, b, vae=None):
    """Equal up to float32 rounding. Running the references in the same UNet call changes the batch
    size, which changes the rounding of a few kernels (about 1e-7 relative per call); a random model
    leaves the latent at noise scale (~15), so the bound is 1e-4 relative to the latent's size, and
    1e-4 absolute on the decoded image."""
    scale = max(1.0, float(b.abs().max()))
    assert float((a - b).abs().max()) <= 1e-4 * scale
    if vae is not None:
        torch.testing.assert_close(vae.decode(a), vae.decode(b), atol=1e-4, rtol=0)


def snapshot(model):
    """What a patch node must not change on its input MODEL: its transformer options (patches and
    replaces, one level deep) and its wrappers."""
    opts = model.model_options.get("transformer_options", {})
    return (copy.copy(opts), {k: dict(v) for k, v in opts.get("patches_replace", {}).items()},
            {k: {kk: list(vv) for kk, vv in v.items()} for k, v in getattr(model, "wrappers", {}).items()})


def spy_joint_attention(monkeypatch) -> list:
    """Record every call of the pack's DiT attention override (``dit_blocks.JointAttention``) as
    ``(block key, text length, (q, k, v), output, row layout)``: the q/k/v a real block handed it."""
    from personalize_pack.attention import dit_blocks
    seen = []
    original = dit_blocks.JointAttention.__call__

    def spy(self, func, *args, **kwargs):
        out = original(self, func, *args, **kwargs)
        seen.append((self.key, self.txt_len, args[:3], out, self.layout))
        return out

    monkeypatch.setattr(dit_blocks.JointAttention, "__call__", spy)
    return seen
