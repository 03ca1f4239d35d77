"""files/copy_absent.py and files/example_inputs.py: the example workflows' images copied into ComfyUI's
input folder when the pack loads, never over a file that is there (also when one appears during the copy,
and where the file system has no hard links); a folder that cannot be written is a logged warning."""
from __future__ import annotations

import errno
import json
import logging
import os
import sys

import pytest
from workflow_helpers import SHIPPED_INPUTS, WORKFLOWS

from personalize_pack.files import copy_absent
from personalize_pack.files.copy_absent import copy_if_absent
from personalize_pack.files.example_inputs import example_images, install_example_inputs


def _loaded_images():
    """Every image a Load Image node of a shipped workflow names."""
    names = set()
    for path in WORKFLOWS.glob("*.json"):
        for node in json.loads(path.read_text(encoding="utf-8"))["nodes"]:
            if node["type"] == "LoadImage":
                names.add(node["widgets_values"][0])
    return names


def test_every_template_image_is_installed(tmp_path):
    """Into an empty input folder: every image the templates load, byte for byte; the licences stay."""
    shipped = {p.name for p in example_images()}
    assert _loaded_images() <= shipped and len(shipped) >= 20
    copied = install_example_inputs(tmp_path / "input")
    assert sorted(copied) == sorted(shipped)
    for name in shipped:
        assert (tmp_path / "input" / name).read_bytes() == (SHIPPED_INPUTS / name).read_bytes()
    assert sorted(p.name for p in (tmp_path / "input").iterdir()) == sorted(shipped)     # no temporary files
    assert install_example_inputs(tmp_path / "input") == []                               # the next start


def test_a_users_file_of_the_same_name_is_kept(tmp_path):
    """A user's own image under a shipped name, and a broken link under another, stay as they are."""
    folder = tmp_path / "input"
    folder.mkdir()
    mine = folder / "personalize_cat_04.jpg"
    mine.write_bytes(b"my own cat")
    os.utime(mine, (1_000_000, 1_000_000))
    link = folder / "personalize_dog6_02.jpg"
    link.symlink_to(tmp_path / "nowhere.jpg")
    copied = install_example_inputs(folder)
    assert "personalize_cat_04.jpg" not in copied and "personalize_dog6_02.jpg" not in copied
    assert len(copied) == len(example_images()) - 2
    assert mine.read_bytes() == b"my own cat" and mine.stat().st_mtime == 1_000_000
    assert link.is_symlink() and os.readlink(link) == str(tmp_path / "nowhere.jpg")


def test_a_file_that_appears_during_the_copy_is_kept(tmp_path, monkeypatch):
    """The name is free when looked at, taken when the copy lands: the link fails, the file stays."""
    src, dst = tmp_path / "src.png", tmp_path / "dst.png"
    src.write_bytes(b"shipped")
    real_link = os.link

    def late_writer(a, b):
        dst.write_bytes(b"written meanwhile")
        return real_link(a, b)
    monkeypatch.setattr(copy_absent.os, "link", late_writer)
    assert copy_if_absent(src, dst) is False
    assert dst.read_bytes() == b"written meanwhile"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst.png", "src.png"]


@pytest.mark.skipif(os.name == "nt", reason="the exclusive-create fallback is the POSIX one")
def test_without_hard_links(tmp_path, monkeypatch):
    """A file system without hard links: the name is claimed by an exclusive create, never replaced."""
    def no_links(a, b):
        raise OSError(errno.EPERM, "hard links not supported")
    monkeypatch.setattr(copy_absent.os, "link", no_links)
    src = tmp_path / "src.png"
    src.write_bytes(b"shipped bytes")
    assert copy_if_absent(src, tmp_path / "new.png") is True
    assert (tmp_path / "new.png").read_bytes() == b"shipped bytes"
    (tmp_path / "kept.png").write_bytes(b"mine")
    assert copy_if_absent(src, tmp_path / "kept.png") is False
    assert (tmp_path / "kept.png").read_bytes() == b"mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.png", "new.png", "src.png"]


def test_a_read_only_input_folder_is_a_warning(tmp_path, monkeypatch, caplog):
    """The input folder cannot be written (here: the first copy fails as on a read-only file system):
    a warning that names the folder and where the images are, no exception, nothing written."""
    from personalize_pack.files import example_inputs

    def read_only(src, dst):
        raise OSError(errno.EROFS, "Read-only file system", str(dst))
    monkeypatch.setattr(example_inputs, "copy_if_absent", read_only)
    folder = tmp_path / "input"
    with caplog.at_level(logging.WARNING):
        assert install_example_inputs(folder) == []
    assert list(folder.iterdir()) == []
    assert str(folder) in caplog.text and str(SHIPPED_INPUTS) in caplog.text and "by hand" in caplog.text


def test_the_pack_installs_them_when_comfyui_loads_it(tmp_path, monkeypatch):
    """comfy_entrypoint (what ComfyUI calls) copies into folder_paths' input folder before it returns
    the extension; a stand-in folder_paths and node package keep ComfyUI out of this unit test."""
    import asyncio
    import types

    import personalize_pack
    fake_fp = types.SimpleNamespace(get_input_directory=lambda: str(tmp_path / "input"))
    monkeypatch.setitem(sys.modules, "folder_paths", fake_fp)
    fake_nodes = types.ModuleType("personalize_pack.nodes")
    fake_nodes.PersonalizeExtension = type("PersonalizeExtension", (), {})
    monkeypatch.setitem(sys.modules, "personalize_pack.nodes", fake_nodes)
    monkeypatch.setattr(personalize_pack, "nodes", fake_nodes, raising=False)
    ext = asyncio.run(personalize_pack.comfy_entrypoint())
    assert isinstance(ext, fake_nodes.PersonalizeExtension)
    assert sorted(p.name for p in (tmp_path / "input").iterdir()) == sorted(p.name for p in example_images())
