"""Test set-up: import the pack under a valid module name (its folder may contain '-', and ComfyUI
has a top-level ``nodes`` module, so the pack root is never put on ``sys.path``), and find ComfyUI
for the integration tests (``COMFYUI_PATH``, or the pack sitting in ``custom_nodes/``)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

PACK_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PACK_ROOT / "tools"))
from pack_import import import_pack  # noqa: E402  (the tests and benchmarks import it from here)


def comfyui_root() -> Path | None:
    env = os.environ.get("COMFYUI_PATH")
    if env:
        p = Path(env).expanduser().resolve()
        return p if (p / "comfy").is_dir() else None
    guess = PACK_ROOT.parents[1]
    if PACK_ROOT.parent.name == "custom_nodes" and (guess / "comfy").is_dir():
        return guess
    return None


import_pack()


# ---------------------------------------------------------------------------- ComfyUI fixtures
# Shared by the integration tests (they skip without ComfyUI); the tiny models are built once per
# session.

def _comfy():
    from comfy_host import init_comfyui
    init_comfyui()
    import comfy.sample
    import comfy.sd  # noqa: F401
    return comfy


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_models")


TINY_SD15 = "tiny_sd15.safetensors"


@pytest.fixture(scope="session")
def tiny_sd15_path(tiny_dir):
    """A complete tiny SD1.5 checkpoint in ``tiny_dir/checkpoints`` (a ComfyUI models layout)."""
    _comfy()
    from tiny_models import build_sd15
    return build_sd15(tiny_dir / "checkpoints" / TINY_SD15)


@pytest.fixture(scope="session")
def sd15(tiny_sd15_path):
    import comfy.sd
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(tiny_sd15_path), output_vae=True,
                                                                output_clip=True)
    return model, clip, vae


@pytest.fixture(scope="session")
def sdxl(tiny_dir):
    _comfy()
    import comfy.sd
    from tiny_models import build_sdxl_unet
    path = build_sdxl_unet(tiny_dir / "diffusion_models" / "tiny_sdxl.safetensors")
    return comfy.sd.load_diffusion_model(str(path))


def encode(clip, text):
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def sample(model, positive, negative, size=(8, 8), batch=1, steps=3, cfg=5.0, seed=3, sampler="euler",
           scheduler="normal"):
    comfy = _comfy()
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
    import copy
    opts = model.model_options.get("transformer_options", {})
    return (copy.copy(opts), {k: dict(v) for k, v in opts.get("patches_replace", {}).items()},
            {k: {kk: list(vv) for kk, vv in v.items()} for k, v in getattr(model, "wrappers", {}).items()})


def ref_node():
    from personalize_pack.nodes.references import ReferenceEncode
    return ReferenceEncode


def load_image(path, size=64):
    import numpy as np
    from PIL import Image
    im = Image.open(path).convert("RGB").resize((size, size))
    return torch.from_numpy(np.asarray(im).astype("float32") / 255.0)[None]


def load_mask(path, size=64):
    return load_image(path, size)[..., 0]


@pytest.fixture(scope="session")
def data_dir():
    """The example references shipped with the pack (DreamBench photos, FreeCustom masks)."""
    from conftest import PACK_ROOT
    return PACK_ROOT / "workflows" / "inputs"


@pytest.fixture(scope="session")
def references(sd15, data_dir):
    model, clip, vae = sd15
    enc = ref_node()
    r = enc.execute(load_image(data_dir / "personalize_cat_04.jpg"), vae, load_mask(data_dir / "personalize_cat_04_mask.jpg"),
                    encode(clip, "a cat"), None, 3.0, 0.5, False, 64).result[0]
    r = enc.execute(load_image(data_dir / "personalize_dog6_02.jpg"), vae, load_mask(data_dir / "personalize_dog6_02_mask.jpg"),
                    encode(clip, "a dog"), r, 3.0, 0.5, False, 64).result[0]
    return r


