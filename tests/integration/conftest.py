"""Every test under ``tests/integration/`` runs the pack inside a real ComfyUI: it is marked
``integration`` and, when no ComfyUI tree is found (``COMFYUI_PATH``, or the pack sitting in
``ComfyUI/custom_nodes``), skipped with one reason for all. ``pytest -m "not integration"`` runs the
unit tests alone.

Tests marked ``slow`` train models in the world through the pack's Train nodes (tens of minutes on two
CPU cores): they run only with ``PERSONALIZE_SLOW=1`` and are skipped, saying so, otherwise."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from pack_paths import NO_COMFYUI, comfyui_root

HERE = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)           # before ``-m`` selects by marker
def pytest_collection_modifyitems(config, items):
    # a conftest's collection hook sees the whole session's items: mark only the ones below this folder
    skip = pytest.mark.skip(reason=NO_COMFYUI) if comfyui_root() is None else None
    slow = None if os.environ.get("PERSONALIZE_SLOW") == "1" else pytest.mark.skip(
        reason="trains models in the world for tens of minutes: set PERSONALIZE_SLOW=1 to run it")
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.integration)
            if skip is not None:
                item.add_marker(skip)
            elif slow is not None and item.get_closest_marker("slow") is not None:
                item.add_marker(slow)


@pytest.fixture(scope="session")
def world(tiny_dir):
    """The world model (world/README.md) inside ComfyUI: the checkpoint built from the world's weights
    (``pack_paths.world_weights``) into the session's models folder, loaded with ComfyUI's loader, with
    the world's scorer. Skipped, saying why, when the weights are missing."""
    from pack_paths import no_world_weights, world_weights
    reason = no_world_weights()
    if reason:
        pytest.skip(reason)
    from comfy_host import init_nodes_with_pack
    init_nodes_with_pack()
    from personalize_pack.world import checkpoint
    from personalize_pack.world.runtime import World
    folder = world_weights()
    path = checkpoint.build(tiny_dir / "checkpoints" / checkpoint.CHECKPOINT_NAME, folder)
    return World.load(path, folder)


# ---------------------------------------------------------------------------- the tiny FLUX
# (tests/integration/test_flux.py; the reference cache's tests use them too)

@pytest.fixture(scope="session")
def flux(tiny_dir):
    from comfy_sampling import tiny_diffusion_model
    return tiny_diffusion_model(tiny_dir, "build_flux", "tiny_flux.safetensors", heads=2, depth=2, single=2)


@pytest.fixture(scope="session")
def flux_vae(tiny_dir):
    from comfy_host import import_comfy
    import_comfy()
    import comfy.sd
    import comfy.utils
    from tiny_flux import build_flux_vae
    path = build_flux_vae(tiny_dir / "vae" / "tiny_flux_ae.safetensors")
    return comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(path)))


@pytest.fixture(scope="session")
def flux_refs(flux_vae, sd15, data_dir):
    """A cat and a dog encoded by the tiny FLUX VAE, captioned by the tiny checkpoint's CLIP."""
    from comfy_sampling import encode, load_image, load_mask, ref_node
    clip, enc = sd15[1], ref_node()
    r = enc.execute(load_image(data_dir / "personalize_cat_04.jpg"), flux_vae,
                    load_mask(data_dir / "personalize_cat_04_mask.jpg"), encode(clip, "a cat"), None, 3.0, 0.5, False,
                    64).result[0]
    return enc.execute(load_image(data_dir / "personalize_dog6_02.jpg"), flux_vae,
                       load_mask(data_dir / "personalize_dog6_02_mask.jpg"), encode(clip, "a dog"), r, 3.0, 0.5,
                       False, 64).result[0]
