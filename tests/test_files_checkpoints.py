"""files/checkpoints.py, the one safe reader of model files: real files in tmp_path of each format it
reads, and of each kind it refuses, with the message that says which."""
import os
import pickle
import warnings

import pytest
import torch
from safetensors.torch import save_file

from personalize_pack.files.checkpoints import (flat_state_dict, pickled_globals, read_checkpoint,
                                               safetensors_metadata)


class FileError(Exception):
    pass


def read(path, **kw):
    return read_checkpoint(path, FileError, **kw)


class ShellPayload:
    """Unpickling this would run a shell command that creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def tensors():
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(3, 4, generator=g), "a.bias": torch.randn(3, generator=g),
            "steps": torch.tensor([7])}


def assert_same(got, want):
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k])


def test_safetensors_file(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(tensors(), str(path))
    assert_same(read(path), tensors())
    assert_same(read(str(path)), tensors())


@pytest.mark.parametrize("zip_format", [True, False])
def test_weights_only_pickle(tmp_path, zip_format):
    path = tmp_path / "model.pth"
    obj = {"state_dict": tensors(), "epoch": 3, "names": ["a", "b"]}
    torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
    got = read(path)
    assert got["epoch"] == 3 and got["names"] == ["a", "b"]
    assert_same(got["state_dict"], tensors())
    assert_same(flat_state_dict(got), tensors())


@pytest.mark.parametrize("writer", ["zip", "legacy", "pickle5"])
def test_pickle_asking_for_os_system_is_refused_by_name(tmp_path, writer):
    marker = tmp_path / "ran"
    obj = dict(tensors(), extra=ShellPayload(marker))
    path = tmp_path / "payload.pth"
    if writer == "pickle5":              # a plain pickle: torch's unpickler stops at an opcode first
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=5)
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=writer == "zip")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(FileError, match=r"payload\.pth holds pickled Python objects \(it asks to import "
                                            r"(posix|os|nt)\.system\), not just tensors; it was refused and is "
                                            r"not unpickled for safety.*\.safetensors.*Get it again\.$"):
            read(path, redo="Get it again.")
    assert not marker.exists()
    assert any(g.endswith(".system") for g in pickled_globals(path))


def test_tensor_only_pickles_name_no_foreign_globals(tmp_path):
    for fmt in (True, False):
        path = tmp_path / f"ok_{fmt}.pth"
        torch.save(tensors(), path, _use_new_zipfile_serialization=fmt)
        assert all(g.startswith(("torch.", "collections.")) for g in pickled_globals(path))


@pytest.mark.parametrize(("content", "says"), [
    (b"just some text, not a model at all", r"notes\.bin is not a PyTorch \(\.pth\) or safetensors file: it starts "
                                            r"with 'just some text"),
    (b"<!DOCTYPE html><html><body>Sign in</body></html>", r"notes\.bin is not a PyTorch .*web page"),
    (b"\x89PNG\r\n\x1a\n" + bytes(64), r"notes\.bin is not a PyTorch .*an image"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 12\n", r"notes\.bin .*Git LFS pointer"),
])
def test_file_that_is_not_a_checkpoint(tmp_path, content, says):
    path = tmp_path / "notes.bin"
    path.write_bytes(content)
    with pytest.raises(FileError, match=says):
        read(path)
    with pytest.raises(FileError, match=r"notes\.bin is not a PyTorch \(\.pth\) or safetensors file, so not an "
                                        r"IP-Adapter checkpoint: "):
        read(path, kind="an IP-Adapter checkpoint")


def test_truncated_safetensors_is_told_from_its_header(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_file(tensors(), str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-10])                      # the tensor data is short
    with pytest.raises(FileError, match=rf"cut\.safetensors is a damaged or incomplete safetensors file \(a "
                                        rf"truncated download\?\): it has {len(data) - 10} bytes of the {len(data)}"):
        read(path)
    path.write_bytes(data[:20])                       # inside the JSON header
    with pytest.raises(FileError, match=r"cut\.safetensors is a damaged or incomplete safetensors file.*header "
                                        r"announces \d+ bytes of header but the file has 20 bytes"):
        read(path)
    n = int.from_bytes(data[:8], "little")
    path.write_bytes(data[:8] + b"{" + b"x" * (n - 1) + data[8 + n:])     # a header that is not JSON
    with pytest.raises(FileError, match=r"cut\.safetensors .*its header cannot be read"):
        read(path)


@pytest.mark.parametrize("zip_format", [True, False])
def test_truncated_pickle(tmp_path, zip_format):
    path = tmp_path / "cut.pth"
    torch.save(tensors(), path, _use_new_zipfile_serialization=zip_format)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(FileError, match=r"cut\.pth is damaged or incomplete \(a truncated download\?\)"):
        read(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(FileError, match=r"^absent: .*nothing\.pth does not exist; fetch it from x\.$"):
        read(tmp_path / "nothing.pth", missing_prefix="absent: ", redo="Download it again.", get="fetch it from x.")
    with pytest.raises(FileError, match=r"nothing\.pth does not exist$"):
        read(tmp_path / "nothing.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(FileError, match=r"empty\.pth is empty \(0 bytes\)"):
        read(tmp_path / "empty.pth")


def test_the_error_class_is_the_callers():
    with pytest.raises(ValueError, match="does not exist"):
        read_checkpoint("/nonexistent/model.safetensors")
    with pytest.raises(KeyError):
        read_checkpoint("/nonexistent/model.safetensors", error=KeyError)


def test_flat_state_dict():
    sd = tensors()
    assert flat_state_dict(sd) == sd
    assert flat_state_dict({"model": {"state_dict": sd}, "epoch": 1}) == sd
    assert flat_state_dict({"module." + k: v for k, v in sd.items()}) == sd
    assert flat_state_dict({"target_output": sd}, nested_keys=("target_output",)) == sd
    assert flat_state_dict({"epoch": 1}) == {}
    assert flat_state_dict([sd]) is None and flat_state_dict({}) is None


def test_safetensors_metadata_from_the_header_alone(tmp_path):
    path = tmp_path / "meta.safetensors"
    save_file(tensors(), str(path), metadata={"personalize_kind": "infusion", "widths": '{"a": 3}'})
    assert safetensors_metadata(path) == {"personalize_kind": "infusion", "widths": '{"a": 3}'}
    save_file(tensors(), str(tmp_path / "plain.safetensors"))
    assert safetensors_metadata(tmp_path / "plain.safetensors") == {}
    torch.save(tensors(), tmp_path / "model.pth")
    (tmp_path / "notes.txt").write_bytes(b"just some text")
    for other in ("model.pth", "notes.txt", "absent.safetensors"):
        assert safetensors_metadata(tmp_path / other) == {}
