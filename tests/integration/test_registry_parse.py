"""The pack's pyproject.toml read by ComfyUI's own registry-metadata parser (comfy_config, the code
ComfyUI and the Manager use for a node pack's registry data): the operating systems and accelerators come
through (one unknown Environment classifier would empty the accelerators), the dependencies are
requirements.txt's, the web folder and the ComfyUI version range are there."""
from __future__ import annotations

import re
import sys

import pytest

from pack_paths import PACK_ROOT, comfyui_root


def _requirements():
    lines = (PACK_ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines()
    return [s for s in (re.sub(r"(^|\s+)#.*$", "", line).strip() for line in lines) if s]


def test_comfyuis_parser_reads_the_registry_metadata():
    root = comfyui_root()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        from comfy_config import config_parser
    except ImportError as exc:               # an older ComfyUI, or pydantic-settings missing
        pytest.skip(f"ComfyUI's comfy_config cannot be imported: {exc}")
    config = config_parser.extract_node_configuration(str(PACK_ROOT))
    project, comfy = config.project, config.tool_comfy
    assert project.name == "personalize"
    assert project.supported_os == ["OS Independent"]
    assert project.supported_accelerators == ["GPU :: NVIDIA CUDA"]
    assert project.dependencies == _requirements()
    assert "CPU" in project.description
    assert project.supported_comfyui_version.startswith(">=")
    assert comfy.publisher_id and comfy.display_name == "Personalize" and comfy.web == "web"
    assert project.license.file == "LICENSE"
