"""The one safe reader of the pack's model files: safetensors (its header checked against the file's size
before reading), or torch.load with weights_only, a pickle that asks for more refused by the name of what
it would import; and the flattening of nested checkpoint dictionaries. Pure torch + safetensors."""
from __future__ import annotations

import json
import os
import pickle
import pickletools
import re
import zipfile

import torch

# safetensors refuses a header over 100 MB; eight bytes of text read as a length are far larger
SAFETENSORS_MAX_HEADER = 100_000_000
# globals a weights-only torch file may name (its own rebuild functions and OrderedDict)
_TENSOR_GLOBALS = ("torch.", "collections.OrderedDict", "_codecs.encode")


def flat_state_dict(obj, nested_keys=("state_dict", "model", "net", "module")) -> dict | None:
    """The ``{key: tensor}`` of a loaded checkpoint: a state dict, one nested (up to two levels)
    under one of ``nested_keys``, a ``module.`` prefix (DataParallel) removed; None when there is
    no (non-empty) dictionary, ``{}`` when a dictionary holds no tensors."""
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


def read_checkpoint(path, error=ValueError, redo: str = "", missing_prefix: str = "", get: str | None = None,
                    kind: str = ""):
    """The object stored in a ``.safetensors`` file, or in a PyTorch ``.pth``/``.bin``/``.pt`` file
    read with ``torch.load(weights_only=True)`` (memory-mapped when it is a zip archive): nothing in
    a pickle but tensors and plain containers is ever built. The format is sniffed from the bytes.
    Every failure raises ``error(message)`` naming the file and saying whether it is missing, empty,
    truncated, of another kind (a web page, an image, a Git LFS pointer) or holds pickled Python
    objects (and which ones it would import); ``redo`` (download it again, from where) ends the
    message, ``get`` (what to download, where; default ``redo``) that of a missing file, and ``kind``
    (``"an IP-Adapter checkpoint"``) says what a file of neither format is not."""
    path = os.fspath(path)
    name = os.path.basename(path)
    tail = f" {redo}" if redo else ""
    if not os.path.isfile(path):
        raise error(f"{missing_prefix}{path} does not exist; {redo if get is None else get}".rstrip("; "))
    size = os.path.getsize(path)
    if size == 0:
        raise error(f"{name} is empty (0 bytes), an interrupted download?{tail}")
    with open(path, "rb") as f:
        head = f.read(64)
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= SAFETENSORS_MAX_HEADER:
        _check_safetensors_size(path, name, size, error, tail)
        try:
            from safetensors.torch import load_file
            loaded = load_file(path)
        except Exception as exc:
            raise error(f"{name} is a damaged or incomplete safetensors file (a truncated download?): {exc}.{tail}") \
                from None
        return _check_finite(loaded, name, error, tail)
    is_zip = head.startswith(b"PK\x03\x04")
    if not (is_zip or head[:1] == b"\x80"):
        so_not = f", so not {kind}" if kind else ""
        raise error(f"{name} is not a PyTorch (.pth) or safetensors file{so_not}: {describe_start(head)}.{tail}")
    if name.lower().endswith(".safetensors"):
        # torch.load would hand a .safetensors name to safetensors (a bare "header too large"); a file that
        # promises tensors only but is a pickle is refused unread
        what = "a zip archive of torch.save" if is_zip else "a Python pickle (torch.save or pickle.dump)"
        raise error(f"{name} is named .safetensors but is not a safetensors file: it is {what}, so it was refused "
                    f"unread. Get the real .safetensors file, or the original .pth/.bin file.{tail}")
    if is_zip and not zipfile.is_zipfile(path):
        raise error(f"{name} is damaged or incomplete (a truncated download?): its zip archive has no end record "
                    f"({size} bytes).{tail}")
    return _check_finite(_torch_load(path, name, error, tail, is_zip), name, error, tail)


def _torch_load(path: str, name: str, error, tail: str, is_zip: bool):
    """``torch.load(weights_only=True)``; torch's own failure text (which suggests turning that safety off)
    is never passed on: the error says what the file is and which import or opcode stopped the reader."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as exc:
        msg = str(exc)
        found = re.search(r"GLOBAL ([\w.]+)", msg) or re.search(r"Unsupported class ([\w.]+)", msg)
        # torch's safe unpickler also stops at opcodes it does not know (a plain pickle.dump of
        # protocol 4+) before it meets a global; the opcodes themselves say what the file imports
        imports = [found.group(1)] if found else \
            [g for g in pickled_globals(path) if not g.startswith(_TENSOR_GLOBALS)]
        if imports or "Unsupported global" in msg or "Unsupported class" in msg:
            what = f" (it asks to import {', '.join(imports[:3])})" if imports else ""
            raise error(f"{name} holds pickled Python objects{what}, not just tensors; it was refused and is not "
                        f"unpickled for safety, since unpickling them could run code from the file. A .safetensors "
                        f"version of the model, where there is one, holds only tensors.{tail}") from None
        if "weights only" in msg.lower() or "WeightsUnpickler" in msg:
            raise error(f"{name} is not a plain weights file: PyTorch's tensors-only reader stopped at "
                        f"{_unpickler_reason(msg)} (a pickle of Python objects, or a newer pickle protocol than "
                        f"torch.save writes). It was not unpickled, for safety; a .safetensors version of the "
                        f"model, where there is one, holds only tensors.{tail}") from None
        raise error(f"{name} is damaged or incomplete (a truncated download?): {_first_line(msg)}.{tail}") from None
    except Exception as exc:        # torch's readers raise many kinds on a cut or damaged file
        raise error(f"{name} is damaged or incomplete (a truncated download?): could not read it as a PyTorch file "
                    f"({type(exc).__name__}: {_first_line(str(exc))}).{tail}") from None


def _first_line(msg: str) -> str:
    """The first line of an exception's text, without any advice to load the file unsafely."""
    first = (msg.strip().splitlines() or [""])[0][:160]
    return "the reader refused it" if "weights_only" in first or "weights only" in first.lower() else first


def _unpickler_reason(msg: str) -> str:
    """What stopped torch's weights-only unpickler ("Unsupported operand 149"), from its message, without
    the message's advice (allow-listing globals, ``weights_only=False``)."""
    found = re.search(r"WeightsUnpickler error:\s*(.*)", msg, re.S)
    text = " ".join((found.group(1) if found else "").split())
    text = re.split(r"\s*(?:Please use|Check the documentation|was not an allowed)", text)[0].strip(" .")
    if not text or "weights_only" in text:
        return "an object it does not allow"
    return f"'{text[:120]}'"


def _check_finite(obj, name: str, error, tail: str):
    """``obj`` (tensors in nested dicts, lists, tuples), or ``error`` naming the file and the first floating
    tensor that holds NaN or infinite values: weights of a diverged training run or a damaged file would
    otherwise give black or noise images with no message."""
    stack = [("", obj)]
    while stack:
        key, item = stack.pop()
        if isinstance(item, torch.Tensor):
            if item.is_floating_point() and item.numel() and not bool(torch.isfinite(item).all()):
                nan = int(torch.isnan(item).sum())
                bad = nan or int((~torch.isfinite(item)).sum())
                what = "NaN" if nan else "infinite"
                raise error(f"{name} is refused: its tensor {key or '(the file)'!r} holds {bad} {what} values of "
                            f"{item.numel()} (weights saved from a diverged training run, or a damaged file).{tail}")
        elif isinstance(item, dict):
            stack.extend((f"{key}.{k}" if key else str(k), v) for k, v in reversed(list(item.items())))
        elif isinstance(item, (list, tuple)):
            stack.extend((f"{key}[{i}]", v) for i, v in reversed(list(enumerate(item))))
    return obj


def _check_safetensors_size(path: str, name: str, size: int, error, tail: str) -> None:
    """A safetensors file is an 8-byte header length, a JSON header and the tensor data it places:
    a file shorter than the header says is a truncated download, told before any tensor is read."""
    broken = f"{name} is a damaged or incomplete safetensors file (a truncated download?)"
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if 8 + n > size:
            raise error(f"{broken}: its header announces {n} bytes of header but the file has {size} bytes.{tail}")
        raw = f.read(n)
    try:
        header = json.loads(raw)
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        raise error(f"{broken}: its header cannot be read.{tail}") from None
    if 8 + n + end > size:
        raise error(f"{broken}: it has {size} bytes of the {8 + n + end} its header announces.{tail}")


def safetensors_metadata(path) -> dict:
    """The ``__metadata__`` strings of a safetensors file's header, read from the header alone (no
    tensor is loaded); ``{}`` for a file without metadata, of another format or unreadable."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n > SAFETENSORS_MAX_HEADER:
                return {}
            header = json.loads(f.read(n))
    except (OSError, ValueError):
        return {}
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def pickled_globals(path) -> list:
    """``module.name`` of every global the pickles of a PyTorch file import, read from the opcodes
    without executing anything: those at the start of a legacy file or a plain pickle (several pickles,
    then raw bytes), or the ``data.pkl`` of a zip archive."""
    found: list = []
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                pkl = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
                if pkl is not None:
                    with z.open(pkl) as f:
                        _scan_pickles(f, found)
        else:
            with open(path, "rb") as f:
                _scan_pickles(f, found)
    except (OSError, zipfile.BadZipFile):
        pass
    return found


def _scan_pickles(f, found: list) -> None:
    strings: list = []
    while True:
        try:
            for op, arg, _ in pickletools.genops(f):
                if op.name == "GLOBAL":
                    found.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
        except Exception:
            return
