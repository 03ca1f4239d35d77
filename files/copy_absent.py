"""Copying a file to a name that must not be taken (pure Python; no ComfyUI).

:func:`copy_if_absent` never replaces a file that is already there, even one another process creates
while the copy runs: the bytes go to a temporary file beside the target (``files/atomic.py``'s
``temp_path``), which is then *linked* to the target name. ``os.link`` fails when the name exists, so
the check and the creation are one step. A reader sees no file or the whole file, never a part.

Where the file system has no hard links (FAT, some network shares), Windows' ``os.rename`` gives the
same guarantee (it refuses an existing target); elsewhere the name is claimed with an exclusive create
and the bytes written into it.
"""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from .atomic import fsync_dir, remove_quietly, temp_path

__all__ = ["copy_if_absent"]


def _claim_and_write(src: Path, dst: Path) -> bool:
    """Create ``dst`` exclusively and copy into it; False when the name is taken."""
    try:
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except FileExistsError:
        return False
    try:
        with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
            shutil.copyfileobj(inp, out)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        remove_quietly(dst)
        raise
    return True


def copy_if_absent(src, dst) -> bool:
    """Copy ``src`` to ``dst`` unless ``dst`` exists (file, folder or link, broken or not); True when
    it copied. The folder of ``dst`` must exist. Errors other than "the name is taken" are raised."""
    src, dst = Path(src), Path(dst)
    if os.path.lexists(dst):
        return False
    tmp = temp_path(dst)
    try:
        shutil.copyfile(src, tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        try:
            os.link(tmp, dst)
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK,
                                 errno.ENOSYS, errno.EACCES) and os.name != "nt":
                raise
            if os.name == "nt":          # rename refuses an existing target there
                try:
                    os.rename(tmp, dst)
                except FileExistsError:
                    return False
            else:
                return _claim_and_write(src, dst)
    finally:
        remove_quietly(tmp)
    fsync_dir(dst.parent)
    return True
