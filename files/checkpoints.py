"""The one safe reader of the pack's model files: safetensors, or torch.load with weights_only, a pickle
that asks for more refused by name; and the flattening of nested checkpoint dictionaries. Pure torch."""
from __future__ import annotations

import torch


def flat_state_dict(obj, nested_keys=("state_dict", "model", "net", "module")) -> dict | None:
    """The ``{key: tensor}`` of a loaded checkpoint: a state dict, one nested (up to two levels)
    under one of ``nested_keys``, a ``module.`` prefix (DataParallel) removed; None when there is
    no dictionary of tensors."""
    for _ in range(2):
        if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            for key in nested_keys:
                if isinstance(obj.get(key), dict):
                    obj = obj[key]
                    break
    if not isinstance(obj, dict) or not obj:
        return None
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def describe_start(head: bytes) -> str:
    """What a file that is not a model seems to be, from its first bytes."""
    if head.lstrip().lower().startswith((b"<!doctype html", b"<html")):
        return ("it is a web page (HTML), not a model: the download saved a page (an error, login or "
                "'can't scan for viruses' page?) instead of the file")
    if head.startswith(b"\xff\xd8\xff") or head.startswith(b"\x89PNG"):
        return "it is an image, not a model"
    if head.startswith(b"version https://git-lfs"):
        return "it is a Git LFS pointer, not the model itself"
    text = "".join(c if 32 <= ord(c) < 127 else "." for c in head[:40].decode("latin-1"))
    return f"it starts with {text!r}"


def read_checkpoint(path, error=ValueError, redo: str = "", missing_prefix: str = "", get: str | None = None):
    """The object stored in a ``.safetensors`` file, or in a PyTorch ``.pth``/``.bin``/``.pt`` file
    read with ``torch.load(weights_only=True)`` (memory-mapped when it is a zip archive): nothing in
    a pickle but tensors and plain containers is ever built. The format is sniffed from the bytes.
    Every failure raises ``error(message)`` naming the file and saying whether it is missing, empty,
    truncated, of another kind (a web page, an image, a Git LFS pointer) or holds pickled Python
    objects; ``redo`` (download it again, from where) ends the message, ``get`` (what to download,
    where; default ``redo``) that of a missing file."""
    import os
    import pickle
    import re
    import zipfile

    path = os.fspath(path)
    name = os.path.basename(path)
    tail = f" {redo}" if redo else ""
    if not os.path.isfile(path):
        raise error(f"{missing_prefix}{path} does not exist; {redo if get is None else get}".rstrip())
    size = os.path.getsize(path)
    if size == 0:
        raise error(f"{name} is empty (0 bytes), an interrupted download?{tail}")
    with open(path, "rb") as f:
        head = f.read(64)
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < size:
        try:
            from safetensors.torch import load_file
            return load_file(path)
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise error(f"{name} is a damaged or incomplete safetensors file (a truncated download?): {exc}.{tail}") \
                from None
    is_zip = head.startswith(b"PK\x03\x04")
    if not (is_zip or head[:1] == b"\x80"):
        raise error(f"{name} is not a PyTorch (.pth) or safetensors file: {describe_start(head)}.{tail}")
    if is_zip and not zipfile.is_zipfile(path):
        raise error(f"{name} is damaged or incomplete (a truncated download?): its zip archive has no end record "
                    f"({size} bytes).{tail}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as exc:
        msg = str(exc)
        if any(s in msg for s in ("Unsupported global", "Unsupported class", "GLOBAL", "weights_only",
                                  "Weights only load failed")):
            found = re.search(r"GLOBAL ([\w.]+)", msg) or re.search(r"Unsupported class ([\w.]+)", msg)
            what = f" (it asks to import {found.group(1)})" if found else ""
            raise error(f"{name} holds pickled Python objects{what}, not just tensors; it is not unpickled for "
                        f"safety.{tail}") from None
        raise error(f"{name} is damaged or incomplete (a truncated download?): {msg.splitlines()[0][:160]}.{tail}") \
            from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        first = (str(exc).splitlines() or [""])[0][:160]
        raise error(f"{name} is damaged or incomplete (a truncated download?): could not read it as a PyTorch file "
                    f"({type(exc).__name__}: {first}).{tail}") from None
