"""Test set-up: import the pack under a valid module name (its folder may contain '-', and ComfyUI
has a top-level ``nodes`` module, so the pack root is never put on ``sys.path``), and find ComfyUI
for the integration tests (``COMFYUI_PATH``, or the pack sitting in ``custom_nodes/``)."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = "personalize_pack"


def import_pack():
    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    spec = importlib.util.spec_from_file_location(PACK_NAME, PACK_ROOT / "__init__.py",
                                                  submodule_search_locations=[str(PACK_ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    spec.loader.exec_module(module)
    return module


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
