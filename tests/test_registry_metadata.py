"""pyproject.toml as the Comfy registry and ComfyUI-Manager read it: the dependencies written once (the
registry reads pyproject's list, the Manager installs requirements.txt; the two must be the same lines), the
classifiers the registry understands, and the CPU said where the registry has no word for it."""
from __future__ import annotations

import re

import pytest
from pack_paths import PACK_ROOT

try:
    import tomllib
except ImportError:                     # Python 3.10
    tomllib = pytest.importorskip("tomli")

# what comfy_config/config_parser.py (ComfyUI) and comfy-cli's registry parser accept; any other
# "Environment ::" classifier makes them drop the accelerators altogether
REGISTRY_ACCELERATORS = {"GPU :: NVIDIA CUDA", "GPU :: AMD ROCm", "GPU :: Intel Arc", "NPU :: Huawei Ascend",
                         "GPU :: Apple Metal"}


def _project():
    return tomllib.loads((PACK_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def _requirements():
    """requirements.txt's requirements as pip reads them: comments (a ``#`` at a line start or after a
    space) and blank lines dropped."""
    lines = []
    for line in (PACK_ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines():
        line = re.sub(r"(^|\s+)#.*$", "", line).strip()
        if line:
            lines.append(line)
    return lines


def test_dependencies_are_written_once():
    deps = _project()["dependencies"]
    assert deps == _requirements()
    assert all("#" not in d and d == d.strip() for d in deps)
    assert not any(re.match(r"torch\b", d) for d in deps)        # ComfyUI brings torch; never reinstall it


def test_classifiers_the_registry_reads():
    classifiers = _project()["classifiers"]
    oses = [c.removeprefix("Operating System :: ") for c in classifiers if c.startswith("Operating System :: ")]
    accelerators = [c.removeprefix("Environment :: ") for c in classifiers if c.startswith("Environment ::")]
    assert oses == ["OS Independent"]
    assert accelerators and set(accelerators) <= REGISTRY_ACCELERATORS
    assert "GPU :: NVIDIA CUDA" in accelerators
    assert "CPU" in _project()["description"]


def test_registry_fields():
    project = _project()
    assert re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,98}", project["name"]) and "comfyui" not in project["name"]
    assert project["license"] == {"file": "LICENSE"} and (PACK_ROOT / "LICENSE").is_file()
    comfy = tomllib.loads((PACK_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"] == "Personalize"
    assert comfy["requires-comfyui"].startswith(">=")
