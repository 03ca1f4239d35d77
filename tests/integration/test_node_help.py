"""The node help pages in a running ComfyUI: every node id of the pack has its ``web/docs/<id>.md``
page served where the frontend asks for it, and, where Chromium, its driver and selenium are installed,
the frontend's node help panel shows the page (``tools/check_node_help.py`` does both)."""
from __future__ import annotations

import pytest

from browser_host import browser_missing, free_port, server_tool
from pack_paths import comfyui_root


def test_every_node_has_its_help_page_served(capsys):
    rc = server_tool().main(["--comfyui", str(comfyui_root()), "--port", str(free_port()), "--no-browser"])
    out = capsys.readouterr()
    assert rc == 0, out.out + out.err
    served = [line for line in out.out.splitlines() if "pages served as written" in line]
    assert served and served[0].split()[0] == served[0].split()[3]     # "25 node ids, 25 pages served ..."


def test_the_help_panel_shows_the_page(tmp_path, capsys):
    missing = browser_missing()
    if missing:
        pytest.skip(missing)
    rc = server_tool().main(["--comfyui", str(comfyui_root()), "--port", str(free_port()),
                       "--panel", "PersonalizeMultiReferenceAttention,PersonalizeDisentangleMixingAttention",
                       "--screenshots", str(tmp_path)])
    out = capsys.readouterr()
    assert rc == 0, out.out + out.err
    assert "help panel: 2 of 2 nodes show their page" in out.out
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        "node_help_PersonalizeDisentangleMixingAttention.png", "node_help_PersonalizeMultiReferenceAttention.png"]
