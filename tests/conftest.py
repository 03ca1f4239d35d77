"""Test set-up and shared fixtures. The pack is imported under a valid module name (its folder may
contain '-', and ComfyUI has a top-level ``nodes`` module, so the pack root is never put on
``sys.path``). Shared code lives in helper modules beside this file (``pack_paths``, ``comfy_host``,
``comfy_sampling``, ``tiny_*``, ...), never here; the ComfyUI skip is in ``integration/conftest.py``."""
from __future__ import annotations

import sys

import pytest

from comfy_host import import_comfy
from comfy_sampling import encode, load_image, load_mask, ref_node
from pack_paths import PACK_ROOT, no_world_weights, world_weights
from tiny_models import TINY_SD15, build_sd15, build_sdxl_unet

sys.path.insert(0, str(PACK_ROOT / "tools"))
from pack_import import import_pack

import_pack()


# ---------------------------------------------------------------------------- ComfyUI fixtures
# For the tests that run inside ComfyUI (they skip without it); the tiny models are built once per
# session.

@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_models")


@pytest.fixture(scope="session")
def tiny_sd15_path(tiny_dir):
    """A complete tiny SD1.5 checkpoint in ``tiny_dir/checkpoints`` (a ComfyUI models layout)."""
    import_comfy()
    return build_sd15(tiny_dir / "checkpoints" / TINY_SD15)


@pytest.fixture(scope="session")
def world_models_dir(tmp_path_factory):
    """A models folder whose checkpoints/ holds the world checkpoint, built once per session by
    ``world.checkpoint.build`` from the world's weights (``pack_paths.world_weights``); skips, saying
    why, when they are absent."""
    reason = no_world_weights()
    if reason:
        pytest.skip(reason)
    import_comfy()
    from personalize_pack.world import checkpoint
    models = tmp_path_factory.mktemp("world_models")
    checkpoint.build(models / "checkpoints" / checkpoint.CHECKPOINT_NAME, world_weights())
    return models


@pytest.fixture(scope="session")
def sd15(tiny_sd15_path):
    import comfy.sd
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(tiny_sd15_path), output_vae=True,
                                                                output_clip=True)
    return model, clip, vae


@pytest.fixture(scope="session")
def sdxl(tiny_dir):
    import_comfy()
    import comfy.sd
    path = build_sdxl_unet(tiny_dir / "diffusion_models" / "tiny_sdxl.safetensors")
    return comfy.sd.load_diffusion_model(str(path))


@pytest.fixture(scope="session")
def data_dir():
    """The example references shipped with the pack (DreamBench photos, FreeCustom masks)."""
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


# ---------------------------------------------------------------------------- the tiny SAM
# For the SAM unit tests (they skip without segment_anything before these are requested).

@pytest.fixture(scope="session")
def tiny_sam_path(tmp_path_factory):
    """A tiny randomly initialised SAM checkpoint (tests/tiny_sam.py), written once per session."""
    from tiny_sam import save_tiny_sam
    return save_tiny_sam(tmp_path_factory.mktemp("sams") / "tiny_sam.pth")


@pytest.fixture(scope="session")
def tiny_sam(tiny_sam_path):
    """The tiny SAM loaded by the pack's own loader."""
    from personalize_pack.references.sam_checkpoint import load_sam
    return load_sam(tiny_sam_path)

