"""The one exclusive, non-blocking file lock the pack takes (a training run's job folder, its state
folder): flock on POSIX, msvcrt on Windows. The OS releases it when the process dies, so a killed run
leaves no stale lock; two opens of the same file conflict even inside one process."""
from __future__ import annotations

import os
from pathlib import Path


def lock_exclusive(path: Path):
    """The open handle holding an exclusive lock on ``path`` (created if missing); ``OSError`` at once
    when another holder has it. Close the handle (``unlock``) to release it."""
    fh = open(path, "a+b")
    try:
        if os.name == "nt":                             # each module exists on its own platform only
            import msvcrt
            fh.seek(0)
            msvcrt.locking(fh.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        raise
    return fh


def unlock(fh) -> None:
    try:
        fh.close()
    except OSError:
        pass
