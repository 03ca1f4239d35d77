"""Where the pack and ComfyUI are, for the tests: the pack's root folder, the ComfyUI tree the
integration tests run in (``COMFYUI_PATH``, or the pack sitting in ``ComfyUI/custom_nodes``), and the
one reason every integration test gives when there is none."""
from __future__ import annotations

import os
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]

NO_COMFYUI = ("ComfyUI not found: set COMFYUI_PATH to a ComfyUI tree (or place the pack in ComfyUI/custom_nodes) "
              "to run the integration tests")


def comfyui_root() -> Path | None:
    env = os.environ.get("COMFYUI_PATH")
    if env:
        p = Path(env).expanduser().resolve()
        return p if (p / "comfy").is_dir() else None
    guess = PACK_ROOT.parents[1]
    if PACK_ROOT.parent.name == "custom_nodes" and (guess / "comfy").is_dir():
        return guess
    return None


WORLD_WEIGHTS_ENV = "PERSONALIZE_WORLD_WEIGHTS"


def world_weights() -> Path:
    """The folder of the world's trained parts: ``$PERSONALIZE_WORLD_WEIGHTS``, else the committed
    ``world/weights``."""
    env = os.environ.get(WORLD_WEIGHTS_ENV)
    return Path(env).expanduser().resolve() if env else PACK_ROOT / "world" / "weights"


def no_world_weights() -> str | None:
    """Why the tests that sample the world model cannot run (None when its weights are there)."""
    from personalize_pack.world.checkpoint import SCORER_FILE, UNET_FILE, VAE_FILE
    folder = world_weights()
    missing = [name for name in (UNET_FILE, VAE_FILE, SCORER_FILE) if not (folder / name).is_file()]
    if not missing:
        return None
    return (f"the world's weights are missing ({', '.join(missing)} not in {folder}): train them with "
            f"'python tools/world.py train', or set {WORLD_WEIGHTS_ENV} to the folder that holds them")
