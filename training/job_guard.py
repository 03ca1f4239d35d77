"""The node side's guards around a training run (pure Python; no ComfyUI, no torch): what keeps a run
from losing a user's work or from mixing with another run.

* :class:`JobLock`: one run per job folder at a time, taken before anything is written; a second run
  of the same output name (another Train node in the same graph on another thread, a second ComfyUI
  sharing the folders) is refused at once, before it writes or trains anything.
* :func:`check_replaceable`: an existing file of the output name is replaced only when the pack wrote
  it (its safetensors metadata says so): a LoRA or model patch the user put there is never
  overwritten.
* :func:`check_room`: the output folder and the job folder can be written and hold what the run will
  write, checked before training (a read-only or full disk fails in a second, not after the last step).
* :func:`remove_own_temp_files`: the temporary files of this output name a killed child left in the
  output folder (``files/atomic.py``'s ``.<name>.<pid>.tmp``).
* :func:`request_key`, :func:`finished_run`, :func:`record_finished`: a run whose inputs are all the
  same as the finished run of this job folder, with its output file still the one it wrote, is not
  trained again; the node returns the finished file.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from ..files.atomic import atomic_write_text, remove_quietly
from ..files.checkpoints import safetensors_metadata
from ..files.locks import lock_exclusive, unlock

__all__ = ["JobBusy", "JobLock", "check_replaceable", "check_room", "remove_own_temp_files", "request_key",
           "finished_run", "record_finished", "file_identity", "DONE_FILE", "LOCK_FILE"]

DONE_FILE = "done.json"
LOCK_FILE = ".run.lock"
_MARGIN = 16 << 20                     # bytes kept free beyond the estimate


class JobBusy(ValueError):
    """Another run holds the job folder of this output name."""


class JobLock:
    """An exclusive, non-blocking lock on ``job_dir/.run.lock`` for the whole run (node side: from the
    first file written to the last result read). The OS releases it when the process dies."""

    def __init__(self, job_dir, output_name: str, input_name: str = "output_name"):
        self.job_dir = Path(job_dir)
        self.job_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.fh = lock_exclusive(self.job_dir / LOCK_FILE)
        except OSError:
            raise JobBusy(f"{input_name}: another training run with the output name {output_name!r} is running "
                          f"now (job folder {self.job_dir}); nothing was started. Wait for it to finish, or give "
                          f"this node another {input_name}") from None

    def release(self) -> None:
        unlock(self.fh)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def check_replaceable(path, kinds: tuple[str, ...], input_name: str = "output_name") -> None:
    """Refuse (``ValueError`` naming the input and the file) when ``path`` exists and is not a file the
    pack wrote as one of ``kinds`` (its safetensors metadata ``personalize_kind``)."""
    path = Path(path)
    if not path.exists():
        return
    if not path.is_file():
        raise ValueError(f"{input_name}: {path} exists and is not a file; choose another {input_name}")
    kind = safetensors_metadata(path).get("personalize_kind")
    if kind not in kinds:
        what = f"a {kind!r} file" if kind else "a file this node did not make"
        raise ValueError(f"{input_name}: {path.name} already exists in {path.parent} and is {what}; it is left as "
                         f"it is. Choose another {input_name}, or move that file away")


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _probe_write(folder: Path, input_name: str, what: str) -> None:
    probe = folder / f".personalize_write_check.{os.getpid()}.tmp"
    try:
        with open(probe, "wb") as fh:
            fh.write(b"\0" * 4096)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise ValueError(f"{input_name}: cannot write into {what} {folder} ({exc.strerror or exc}); nothing was "
                         f"trained. Make the folder writable or free space there") from None
    finally:
        remove_quietly(probe)


def check_room(needs: list[tuple[Path, int, str]], input_name: str = "output_name") -> None:
    """Every ``(folder, bytes, what)`` can be written (a real write of a small file) and has room for
    ``bytes`` more (folders on one file system add up); a ``ValueError`` naming the folder otherwise."""
    per_device: dict = {}
    for folder, need, what in needs:
        folder = Path(folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"{input_name}: cannot create {what} {folder} ({exc.strerror or exc}); nothing was "
                             f"trained") from None
        _probe_write(folder, input_name, what)
        dev = folder.stat().st_dev
        entry = per_device.setdefault(dev, [0, []])
        entry[0] += int(need)
        entry[1].append((folder, what))
    for total, folders in per_device.values():
        free = _free_bytes(folders[0][0])
        if free is not None and free < total + _MARGIN:
            where = " and ".join(f"{what} {folder}" for folder, what in folders)
            raise ValueError(f"{input_name}: not enough free space for this run in {where}: it will write about "
                             f"{_mib(total)} and {_mib(free)} are free; nothing was trained. Free some space")


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def remove_own_temp_files(output) -> list[str]:
    """Delete ``.<output name>.<pid>.tmp`` files beside ``output`` (``files/atomic.py``'s temporary
    names) that a killed writer of this output name left; call while holding its :class:`JobLock`.
    Returns the names removed."""
    output = Path(output)
    prefix, removed = f".{output.name}.", []
    if output.parent.is_dir():
        for p in output.parent.iterdir():
            middle = p.name[len(prefix):-len(".tmp")] if p.name.startswith(prefix) and p.name.endswith(".tmp") else ""
            if middle.isdigit() and p.is_file():
                remove_quietly(p)
                removed.append(p.name)
    return removed


# ====================================================================================== finished runs

def file_identity(path) -> dict | None:
    """A cheap identity of a file: its size and modification time (nanoseconds); None when missing."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _digest(path: Path) -> str | None:
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def request_key(config: dict, job_dir, files: tuple[str, ...]) -> str:
    """A digest of everything a run is asked to do: ``config`` (job.json) and the bytes of the job
    folder's data ``files`` (the images, masks, caption encodings, VAE)."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode("utf-8"))
    for name in files:
        h.update(f"\0{name}:{_digest(Path(job_dir) / name)}".encode())
    return h.hexdigest()


def finished_run(job_dir, key: str, output) -> dict | None:
    """The result recorded by :func:`record_finished` when it was for the same ``key`` and ``output``
    is still the file that run wrote (same size and modification time); else None."""
    try:
        done = json.loads((Path(job_dir) / DONE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(done, dict) or done.get("key") != key or done.get("output") != str(output):
        return None
    if done.get("identity") is None or file_identity(output) != done["identity"]:
        return None
    return done


def record_finished(job_dir, key: str, output, result: dict) -> None:
    """Remember a finished run: its key, its output file's identity and what the node reports."""
    keep = {k: result.get(k) for k in ("steps", "losses", "resumed_from", "preview_paths")}
    atomic_write_text(Path(job_dir) / DONE_FILE, json.dumps(
        {"key": key, "output": str(output), "identity": file_identity(output), **keep}, indent=1))


def forget_finished(job_dir) -> None:
    """Drop the record before a run starts (an interrupted run leaves no stale one behind)."""
    remove_quietly(Path(job_dir) / DONE_FILE)
