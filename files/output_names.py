"""Output file names the user types (a node's ``output_name``): one check that the name is a plain,
visible file name that lands inside the folder it is meant for. Pure Python."""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["output_path"]

_BAD_CHARS = set('/\\:*?"<>|\0')


def output_path(models_dir, name: str, ext: str) -> Path:
    """The file ``<models_dir>/<name><ext>`` for a user-given output name, or a ``ValueError`` that
    says why the name is refused: empty, a path (``/``, ``\\``, a drive ``:``), ``..``, a hidden
    name (leading ``.``), characters Windows forbids, or anything that would land outside
    ``models_dir``. ``ext`` (``".safetensors"``) is added unless the name already ends with it."""
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
    return target
