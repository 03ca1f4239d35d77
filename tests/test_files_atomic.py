"""files/atomic.py, the pack's one atomic writer: round trips, the streamed safetensors file against the
library's, file modes, a full disk and an exception part way (the previous file intact, no temporary file
left), moving a finished file into place, stale temporary files."""
from __future__ import annotations

import errno
import os
import stat

import pytest
import torch
from safetensors.torch import load_file

from personalize_pack.files import atomic


def _no_temp_files(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")] == []


def test_atomic_writes_round_trip(tmp_path):
    p = atomic.atomic_write_text(tmp_path / "sub" / "a.txt", "hello")
    assert p.read_text() == "hello"
    atomic.atomic_write_text(p, "again")
    assert p.read_text() == "again"
    t = {"w": torch.randn(3, 4), "b": torch.arange(5)}
    q = atomic.atomic_save_safetensors(tmp_path / "t.safetensors", {"w": t["w"].t(), "b": t["b"]}, {"k": "v"})
    back = load_file(q)
    torch.testing.assert_close(back["w"], t["w"].t().contiguous())
    assert torch.equal(back["b"], t["b"])
    assert _no_temp_files(tmp_path) and _no_temp_files(tmp_path / "sub")


def test_text_is_utf8_with_its_line_ends_kept(tmp_path):
    p = atomic.atomic_write_text(tmp_path / "r.csv", "a,b\r\nc,é\n")
    assert p.read_bytes() == "a,b\r\nc,é\n".encode("utf-8")


def test_streamed_safetensors_match_the_library(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save as st_save
    t = {"f32": torch.randn(3, 5).t(), "bf16": torch.randn(4, dtype=torch.bfloat16), "f16": torch.randn(2, 2).half(),
         "i64": torch.arange(7), "u8": torch.randint(0, 255, (9,), dtype=torch.uint8), "bool": torch.rand(5) > 0.5,
         "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3), "f64": torch.randn(2, dtype=torch.float64)}
    path = atomic.atomic_save_safetensors(tmp_path / "s.safetensors", t, {"a": "1", "b": "x y"})
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"a": "1", "b": "x y"}
        for k, v in t.items():
            got = f.get_tensor(k)
            assert got.dtype == v.dtype and got.shape == v.shape and torch.equal(got, v), k
    ours = b"".join(bytes(c) for c in atomic.safetensors_chunks({"w": t["f32"].contiguous()}))
    assert load_file_bytes(ours)["w"].equal(load_file_bytes(st_save({"w": t["f32"].contiguous()}))["w"])


def load_file_bytes(data):
    from safetensors.torch import load
    return load(data)


@pytest.mark.skipif(os.name == "nt", reason="POSIX permissions")
def test_the_replaced_files_mode_is_kept_and_a_new_file_gets_the_umask_mode(tmp_path):
    out = tmp_path / "r.csv"
    out.write_text("old")
    out.chmod(0o640)
    atomic.atomic_write_text(out, "new")
    assert out.read_text() == "new" and stat.S_IMODE(out.stat().st_mode) == 0o640
    mask = os.umask(0o022)
    try:
        fresh = atomic.atomic_write_text(tmp_path / "fresh.txt", "x")
    finally:
        os.umask(mask)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o644                # not mkstemp's 0o600
    done = tmp_path / ".done.tmp"
    done.write_bytes(b"abc")
    out.chmod(0o600)
    atomic.finish_atomic(done, out)
    assert out.read_bytes() == b"abc" and stat.S_IMODE(out.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh.txt", "r.csv"]


def test_disk_full_keeps_previous_file(tmp_path, monkeypatch):
    p = atomic.atomic_write_text(tmp_path / "a.txt", "old")

    def full_disk(fh, chunks):                          # writes part of the data, as a real full disk would
        fh.write(chunks[0][:2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic, "_write_file", full_disk)
    with pytest.raises(OSError) as info:
        atomic.atomic_write_text(p, "new contents")
    assert info.value.errno == errno.ENOSPC
    assert "no space left" in str(info.value).lower() and "intact" in str(info.value)
    assert p.read_text() == "old"
    assert _no_temp_files(tmp_path)


def test_an_exception_while_producing_the_data_leaves_the_previous_file(tmp_path):
    p = atomic.atomic_write_text(tmp_path / "a.bin", "old")

    def chunks():
        yield b"new"
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic.atomic_write_chunks(p, chunks())
    assert p.read_text() == "old" and _no_temp_files(tmp_path)


def test_finish_atomic_moves_file(tmp_path):
    tmp = tmp_path / ".x.tmp"
    tmp.write_bytes(b"abc")
    out = atomic.finish_atomic(tmp, tmp_path / "x.bin")
    assert out.read_bytes() == b"abc" and not tmp.exists()


def test_finish_atomic_of_a_missing_file_fails_and_leaves_the_target(tmp_path):
    out = atomic.atomic_write_text(tmp_path / "x.bin", "old")
    with pytest.raises(OSError):
        atomic.finish_atomic(tmp_path / ".x.bin.1.tmp", out)
    assert out.read_text() == "old"


def test_stale_temp_files_are_removed_by_prefix(tmp_path):
    for name in [".a.safetensors.12.tmp", ".b.json.9.tmp", "keep.tmp", ".a.safetensors"]:
        (tmp_path / name).write_bytes(b"x")
    atomic.remove_stale_temp_files(tmp_path, prefix=".a.safetensors.")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".a.safetensors", ".b.json.9.tmp", "keep.tmp"]
    atomic.remove_stale_temp_files(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".a.safetensors", "keep.tmp"]
    atomic.remove_stale_temp_files(tmp_path / "missing")                 # no folder: nothing to do


def test_temp_path_is_beside_the_target_and_names_the_process(tmp_path):
    assert atomic.temp_path(tmp_path / "out.safetensors") == tmp_path / f".out.safetensors.{os.getpid()}.tmp"
