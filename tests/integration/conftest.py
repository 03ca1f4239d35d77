"""Every test under ``tests/integration/`` runs the pack inside a real ComfyUI: it is marked
``integration`` and, when no ComfyUI tree is found (``COMFYUI_PATH``, or the pack sitting in
``ComfyUI/custom_nodes``), skipped with one reason for all. ``pytest -m "not integration"`` runs the
unit tests alone."""
from __future__ import annotations

from pathlib import Path

import pytest

from pack_paths import NO_COMFYUI, comfyui_root

HERE = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)           # before ``-m`` selects by marker
def pytest_collection_modifyitems(config, items):
    # a conftest's collection hook sees the whole session's items: mark only the ones below this folder
    skip = pytest.mark.skip(reason=NO_COMFYUI) if comfyui_root() is None else None
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.integration)
            if skip is not None:
                item.add_marker(skip)
