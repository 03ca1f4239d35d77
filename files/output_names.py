"""Output file names the user types (a node's ``output_name``): one check that the name is a plain,
visible file name that lands inside the folder it is meant for, and that it fits the file system
together with the temporary name it is written through (``files/atomic.py``). Pure Python."""
from __future__ import annotations

import os
from pathlib import Path

from .atomic import longest_temp_name

__all__ = ["output_path", "name_limits"]

_BAD_CHARS = set('/\\:*?"<>|\0')


def name_limits(folder) -> tuple[int, int]:
    """``(longest file name, longest path)`` in bytes on the file system of ``folder`` (its nearest
    existing parent when it does not exist yet); 255 and 4096 where the system does not say."""
    probe = Path(os.path.abspath(folder))
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    limits = []
    for key, default in (("PC_NAME_MAX", 255), ("PC_PATH_MAX", 4096)):
        try:
            value = os.pathconf(probe, key)
        except (AttributeError, OSError, ValueError):
            value = None
        limits.append(int(value) if value and value > 0 else default)
    return limits[0], limits[1]


def output_path(models_dir, name: str, ext: str) -> Path:
    """The file ``<models_dir>/<name><ext>`` for a user-given output name, or a ``ValueError`` that
    says why the name is refused: empty, a path (``/``, ``\\``, a drive ``:``), ``..``, a hidden
    name (leading ``.``), characters Windows forbids, anything that would land outside
    ``models_dir``, or a name too long for the file system once the extension and the temporary
    name used while writing (``.<name><ext>.<pid>.tmp``) are added. ``ext`` (``".safetensors"``) is
    added unless the name already ends with it."""
    if not isinstance(name, str):
        raise ValueError(f"output name must be a string, not {type(name).__name__}")
    clean = name.strip()
    if not clean:
        raise ValueError("output name is empty: give the file a name (letters, digits, '-', '_')")
    bad = sorted({c for c in clean if c in _BAD_CHARS or ord(c) < 32})
    if bad:
        shown = ", ".join(repr(c) for c in bad)
        raise ValueError(f"output name {name!r} contains {shown}: give a plain file name, not a path "
                         f"(the file is always written to {models_dir})")
    if ".." in clean:
        raise ValueError(f"output name {name!r} contains '..': give a plain file name")
    if clean.startswith("."):
        raise ValueError(f"output name {name!r} starts with '.': give a plain, visible file name")
    ext = ext if not ext or ext.startswith(".") else "." + ext
    fname = clean if ext and clean.lower().endswith(ext.lower()) else clean + ext
    root = Path(os.path.abspath(models_dir))
    target = Path(os.path.abspath(root / fname))
    if target.parent != root or os.path.isabs(clean):
        raise ValueError(f"output name {name!r} would be written outside {root}")
    name_max, path_max = name_limits(root)
    longest = os.fsencode(longest_temp_name(fname))
    if len(longest) > name_max:
        extra = len(longest) - len(os.fsencode(clean))
        raise ValueError(f"output name is too long ({len(os.fsencode(clean))} bytes): with {ext or 'its extension'} "
                         f"and the temporary name the file is written through, a file name in {root} may have "
                         f"at most {name_max} bytes; use at most {name_max - extra} characters (plain ASCII)")
    if len(os.fsencode(str(root / longest_temp_name(fname)))) >= path_max:
        raise ValueError(f"output name {name!r}: the path {target} is too long for the file system "
                         f"(at most {path_max} bytes); use a shorter name")
    return target
