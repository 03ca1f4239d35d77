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
