"""The one atomic writer of the pack (pure Python + torch; no ComfyUI).

Every file the pack writes in place of another (training checkpoints and outputs, job folders,
Infusion files, the evaluation's CSV, summary and report) goes through :func:`atomic_write_chunks`:
a temporary file next to the target (``.<name>.<pid>.tmp``: the process id keeps concurrent writers
apart, and :func:`remove_stale_temp_files` finds what a killed one left), ``fsync``, then
``os.replace`` and an ``fsync`` of the folder. Readers see the old file or the new one, never a part.

* The new file keeps the permissions of the file it replaces; a new file gets the ordinary
  ``0o666`` less the umask (never ``mkstemp``'s private ``0o600``).
* A failed write (disk full, permission, an exception while the data is produced) removes the
  temporary file and leaves the previous file untouched; a full disk gives a message that says so.
"""
from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as _st_save

__all__ = ["temp_path", "longest_temp_name", "current_umask", "fsync_dir", "atomic_write_chunks", "atomic_write_bytes", "atomic_write_text",
           "safetensors_chunks", "atomic_save_safetensors", "remove_stale_temp_files", "finish_atomic",
           "remove_quietly"]


def temp_path(path: Path) -> Path:
    """The temporary file this process writes ``path`` through: ``.<name>.<pid>.tmp`` beside it."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def longest_temp_name(name: str) -> str:
    """The longest temporary name :func:`temp_path` can give a file called ``name`` (a process id of
    ten digits), so a caller can check that it fits the file system before any work is done."""
    return f".{name}.{'9' * 10}.tmp"


def _write_file(fh, chunks) -> None:
    """The one place bytes reach the disk (tests replace it to simulate a full disk): every chunk
    (bytes or a buffer), then flush and fsync."""
    for chunk in chunks:
        fh.write(chunk)
    fh.flush()
    os.fsync(fh.fileno())


def fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (a no-op where folders cannot be opened: Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _disk_error(exc: OSError, path: Path) -> OSError:
    if exc.errno == errno.ENOSPC:
        return OSError(errno.ENOSPC, f"no space left on the device while writing {path}; the previous "
                                     f"file there (if any) is intact. Free some space and run again")
    return exc


def current_umask() -> int:
    """The process's umask (read from ``/proc`` where it is shown, else set and restored at once)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _keep_mode(tmp: Path, path: Path, new_file_mode: bool = False) -> None:
    """Give ``tmp`` the permissions of the file it is about to replace. A new file keeps the mode
    ``open`` gave it (0o666 less the umask), or, with ``new_file_mode`` (a file someone else created,
    e.g. safetensors' writer, which makes it 0o600), gets that mode. A file system without
    permissions is no error."""
    try:
        mode = path.stat().st_mode & 0o777
    except OSError:
        if not new_file_mode:
            return
        mode = 0o666 & ~current_umask()
    try:
        os.chmod(tmp, mode)
    except OSError:
        pass


def atomic_write_chunks(path, chunks) -> Path:
    """Write the concatenation of ``chunks`` (bytes or buffers) to ``path`` atomically (module
    docstring); the folder is created when missing. Returns ``path`` as a ``Path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as fh:
            _write_file(fh, chunks)
        _keep_mode(tmp, path)
        os.replace(tmp, path)
    except OSError as exc:
        remove_quietly(tmp)
        raise _disk_error(exc, path) from exc
    except BaseException:
        remove_quietly(tmp)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path, data: bytes) -> Path:
    return atomic_write_chunks(path, [data])


def atomic_write_text(path, text: str) -> Path:
    """``text`` as UTF-8, its line ends as they are (no translation on any system)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"), ("U32", "uint32"),
                     ("U64", "uint64")):
    if hasattr(torch, _attr):
        _ST_DTYPES[getattr(torch, _attr)] = _name


def safetensors_chunks(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> list:
    """The safetensors file of ``tensors`` (CPU) as a header and one buffer per tensor, without
    copying the data into one big bytes object (the write streams it, releasing the GIL)."""
    if sys.byteorder != "little":
        data = _st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
        return [data]
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    bufs, offset = [], 0
    for name, t in tensors.items():
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if t.dtype not in _ST_DTYPES:
            raise TypeError(f"cannot store {t.dtype} ({name}) in safetensors")
        flat = t.contiguous().reshape(-1)
        buf = memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else b""
        n = flat.numel() * flat.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        bufs.append(buf)
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)
    return [len(head).to_bytes(8, "little"), head] + bufs


def atomic_save_safetensors(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """``safetensors.torch.save_file`` made atomic (tensors are moved to the CPU and made contiguous)."""
    return atomic_write_chunks(path, safetensors_chunks(tensors, metadata))


def remove_stale_temp_files(folder, prefix: str = ".") -> None:
    """Delete ``<prefix>*.tmp`` files in ``folder`` that a killed writer left behind (call while
    holding the folder's lock, so no live writer owns them)."""
    folder = Path(folder)
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name.startswith(prefix) and p.name.endswith(".tmp") and p.is_file():
                remove_quietly(p)


def finish_atomic(tmp, path) -> Path:
    """Move a finished temporary file (written by someone else, e.g. a job's ``save_final``) into
    place: ``fsync`` it, the replaced file's mode (a new file: 0o666 less the umask, as an ordinary
    write gives, whatever mode its writer chose), ``os.replace``, ``fsync`` the folder. Removes
    ``tmp`` on failure."""
    tmp, path = Path(tmp), Path(path)
    try:
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        _keep_mode(tmp, path, new_file_mode=True)
        os.replace(tmp, path)
    except OSError as exc:
        remove_quietly(tmp)
        raise _disk_error(exc, path) from exc
    fsync_dir(path.parent)
    return path


def remove_quietly(path) -> None:
    """Delete a file if it is there (no error when it is not, or cannot be)."""
    try:
        os.unlink(path)
    except OSError:
        pass
