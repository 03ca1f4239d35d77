"""The node help pages in a running ComfyUI: every node id of the pack has its ``web/docs/<id>.md``
page served where the frontend asks for it, and, where Chromium, its driver and selenium are installed,
the frontend's node help panel shows the page (``tools/check_node_help.py`` does both)."""
from __future__ import annotations

import importlib.util
import shutil
import socket
import sys

import pytest

from pack_paths import PACK_ROOT, comfyui_root


def _tool():
    name = "personalize_check_node_help"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, PACK_ROOT / "tools" / "check_node_help.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _browser_missing() -> str | None:
    if shutil.which("chromium") is None and shutil.which("chromium-browser") is None:
        return "chromium is not installed (apt-get install chromium chromium-driver)"
    if shutil.which("chromedriver") is None:
        return "chromedriver is not installed (apt-get install chromium-driver)"
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed (pip install selenium)"
    return None


def test_every_node_has_its_help_page_served(capsys):
    rc = _tool().main(["--comfyui", str(comfyui_root()), "--port", str(_free_port()), "--no-browser"])
    out = capsys.readouterr()
    assert rc == 0, out.out + out.err
    served = [line for line in out.out.splitlines() if "pages served as written" in line]
    assert served and served[0].split()[0] == served[0].split()[3]     # "25 node ids, 25 pages served ..."


def test_the_help_panel_shows_the_page(tmp_path, capsys):
    missing = _browser_missing()
    if missing:
        pytest.skip(missing)
    rc = _tool().main(["--comfyui", str(comfyui_root()), "--port", str(_free_port()),
                       "--panel", "PersonalizeMultiReferenceAttention,PersonalizeDisentangleMixingAttention",
                       "--screenshots", str(tmp_path)])
    out = capsys.readouterr()
    assert rc == 0, out.out + out.err
    assert "help panel: 2 of 2 nodes show their page" in out.out
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        "node_help_PersonalizeDisentangleMixingAttention.png", "node_help_PersonalizeMultiReferenceAttention.png"]
