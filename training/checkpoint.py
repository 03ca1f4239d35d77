"""Training checkpoints (pure torch + safetensors; no ComfyUI), written through the pack's one atomic
writer (``files/atomic.py``: a failed write, a full disk included, leaves the previous checkpoint as it was).

A checkpoint is ``state_dir/checkpoint.safetensors`` plus ``state_dir/checkpoint.json``. The
safetensors file is self-contained: the job's tensors (``job.*``), the optimizer state flattened into
tensors (``optim.*``), the RNG states (``rng.*``) and the loss history (``losses``), with the step, the
config hash and a JSON index (optimizer hyper-parameters, non-tensor state, RNG extras) in its
metadata. The JSON file is written after it and repeats the step, hash and tensor index for people
and for the parent; a crash between the two writes leaves a newer safetensors file next to an older
JSON file, so the loader trusts the safetensors metadata only.
"""
from __future__ import annotations

import hashlib
import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..files.atomic import atomic_save_safetensors, atomic_write_text, remove_quietly

CHECKPOINT_NAME = "checkpoint.safetensors"
INDEX_NAME = "checkpoint.json"
FORMAT = "personalize-training-checkpoint/1"

# job.json keys that may change between a run and its resume without changing what is trained
# (``model_file`` records where the model is read from; ``model_fingerprint`` stands for its weights).
VOLATILE_KEYS = frozenset({"steps", "checkpoint_every", "validate_every", "device", "comfyui_path", "resume",
                           "output", "state_dir", "threads", "model_file"})


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (another run's settings, unreadable, beyond the step count)."""


# =========================================================================== config hash

def config_hash(config: dict, ignore=VOLATILE_KEYS, extra: str | None = None) -> str:
    """A stable hash of what a run trains: ``config`` without the keys in ``ignore`` (step count,
    intervals, paths, device), plus ``extra`` (a job's fingerprint of its data). Key order does not
    matter; tuples hash as lists."""
    kept = {k: v for k, v in config.items() if k not in ignore}
    text = json.dumps(kept, sort_keys=True, separators=(",", ":"), default=str)
    h = hashlib.sha256(text.encode("utf-8"))
    if extra:
        h.update(b"\0" + extra.encode("utf-8"))
    return h.hexdigest()[:16]


def hashed_settings(config: dict, ignore=VOLATILE_KEYS, extra: str | None = None) -> dict:
    """What :func:`config_hash` hashes, as a dict (kept in a checkpoint's info, so a refused resume
    can say which setting changed); ``extra`` under ``"data"``."""
    kept = {k: v for k, v in config.items() if k not in ignore}
    return json.loads(json.dumps({**kept, "data": extra}, default=str))


# job.json keys whose node input has another name
_INPUT_NAMES = {"kv": "offsets", "model_fingerprint": "model", "data": "the training data (images, masks, captions)",
                "training_dtype": "the training precision (device)"}


def changed_settings(old: dict, new: dict) -> list[str]:
    """``"name old -> new"`` for every setting that differs (node input names; long values shortened)."""
    out = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            name = _INPUT_NAMES.get(key, key)
            a, b = (json.dumps(x, default=str) for x in (old.get(key), new.get(key)))
            out.append(name if key in ("data", "model_fingerprint") or len(a) + len(b) > 60 else f"{name} {a} -> {b}")
    return out


def file_digest(path, chunk: int = 1 << 20) -> str | None:
    """sha256 of a file's bytes (``None`` when it does not exist)."""
    path = Path(path)
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


# =========================================================================== optimizer state

def _jsonable(value):
    if isinstance(value, tuple):
        return {"__tuple__": [_jsonable(v) for v in value]}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint index")


def _unjson(value):
    if isinstance(value, dict):
        if set(value) == {"__tuple__"}:
            return tuple(_unjson(v) for v in value["__tuple__"])
        return {k: _unjson(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unjson(v) for v in value]
    return value


def optimizer_to_tensors(state_dict: dict, prefix: str = "optim.") -> tuple[dict[str, torch.Tensor], dict]:
    """Flatten ``optimizer.state_dict()``: every tensor becomes ``<prefix>state.<param>.<key>`` (or
    ``<prefix>group.<i>.<key>`` for a tensor hyper-parameter), everything else goes into the returned
    JSON-able index."""
    tensors: dict[str, torch.Tensor] = {}
    state_index: dict[str, dict] = {}
    for pid, entry in state_dict["state"].items():
        plain = {}
        for key, val in entry.items():
            if torch.is_tensor(val):
                tensors[f"{prefix}state.{pid}.{key}"] = val
            else:
                plain[key] = _jsonable(val)
        state_index[str(pid)] = {"tensors": sorted(k for k, v in entry.items() if torch.is_tensor(v)),
                                 "values": plain}
    groups = []
    for i, group in enumerate(state_dict["param_groups"]):
        g = {}
        tensor_keys = []
        for key, val in group.items():
            if torch.is_tensor(val):
                tensors[f"{prefix}group.{i}.{key}"] = val
                tensor_keys.append(key)
            else:
                g[key] = _jsonable(val)
        groups.append({"values": g, "tensors": tensor_keys})
    return tensors, {"state": state_index, "param_groups": groups}


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], index: dict, prefix: str = "optim.") -> dict:
    """The inverse of :func:`optimizer_to_tensors`: a dict ``optimizer.load_state_dict`` accepts."""
    state = {}
    for pid, entry in index["state"].items():
        vals = {k: _unjson(v) for k, v in entry["values"].items()}
        for key in entry["tensors"]:
            vals[key] = tensors[f"{prefix}state.{pid}.{key}"]
        state[int(pid)] = vals
    groups = []
    for i, entry in enumerate(index["param_groups"]):
        g = {k: _unjson(v) for k, v in entry["values"].items()}
        for key in entry["tensors"]:
            g[key] = tensors[f"{prefix}group.{i}.{key}"]
        groups.append(g)
    return {"state": state, "param_groups": groups}


# =========================================================================== RNG state

def rng_state(prefix: str = "rng.") -> tuple[dict[str, torch.Tensor], dict]:
    """The global RNG states: torch's CPU generator, every CUDA device's (only when CUDA is already
    initialised, so a CPU run never starts it), Python's ``random`` and NumPy's legacy global
    generator. Returns (tensors, JSON-able extras)."""
    tensors = {f"{prefix}torch_cpu": torch.get_rng_state()}
    extras: dict[str, Any] = {}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"{prefix}cuda.{i}"] = s
        extras["cuda_devices"] = torch.cuda.device_count()
    version, internal, gauss = random.getstate()
    tensors[f"{prefix}python"] = torch.tensor(internal, dtype=torch.int64)
    extras["python"] = {"version": version, "gauss_next": gauss}
    if "numpy" in sys.modules:
        import numpy as np
        name, keys, pos, has_gauss, cached = np.random.get_state()
        tensors[f"{prefix}numpy"] = torch.from_numpy(keys.astype(np.int64))
        extras["numpy"] = {"name": name, "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)}
    return tensors, extras


def set_rng_state(tensors: dict[str, torch.Tensor], extras: dict, prefix: str = "rng.") -> None:
    """Restore what :func:`rng_state` saved (CUDA states only for devices that exist here)."""
    if f"{prefix}torch_cpu" in tensors:
        torch.set_rng_state(tensors[f"{prefix}torch_cpu"].to(torch.uint8))
    cuda = [tensors[f"{prefix}cuda.{i}"] for i in range(extras.get("cuda_devices", 0)) if f"{prefix}cuda.{i}" in tensors]
    if cuda and torch.cuda.is_available():
        for i, s in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s.to(torch.uint8), i)
    if f"{prefix}python" in tensors and "python" in extras:
        py = extras["python"]
        random.setstate((py["version"], tuple(int(x) for x in tensors[f"{prefix}python"].tolist()), py["gauss_next"]))
    if f"{prefix}numpy" in tensors and "numpy" in extras:
        import numpy as np
        npx = extras["numpy"]
        np.random.set_state((npx["name"], tensors[f"{prefix}numpy"].numpy().astype(np.uint32), npx["pos"],
                             npx["has_gauss"], npx["cached"]))


# =========================================================================== checkpoints

@dataclass
class Checkpoint:
    step: int
    config_hash: str
    job_tensors: dict[str, torch.Tensor]
    optimizer_state: dict | None
    rng_tensors: dict[str, torch.Tensor]
    rng_extras: dict
    losses: list[float]
    path: Path
    info: dict = field(default_factory=dict)

    def restore_rng(self) -> None:
        set_rng_state(self.rng_tensors, self.rng_extras)


def checkpoint_paths(state_dir) -> tuple[Path, Path]:
    state_dir = Path(state_dir)
    return state_dir / CHECKPOINT_NAME, state_dir / INDEX_NAME


def snapshot_tensors(tensors: dict[str, torch.Tensor], pinned: dict | None = None):
    """Copies of ``tensors`` on the CPU that later in-place updates do not reach: CPU tensors are
    cloned; CUDA tensors are copied without waiting into page-locked buffers (kept in ``pinned``
    between calls, reused when the shape and dtype match) when ``pinned`` is given, else copied
    synchronously. Returns (copies, a CUDA event to ``synchronize()`` before reading them, or None)."""
    out, cuda = {}, False
    for name, t in tensors.items():
        t = t.detach()
        if t.is_cuda and pinned is not None:
            buf = pinned.get(name)
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                pinned[name] = buf
            buf.copy_(t, non_blocking=True)
            out[name], cuda = buf, True
        elif t.is_cuda:
            out[name] = t.to("cpu")
        else:
            out[name] = t.clone(memory_format=torch.contiguous_format)
    event = None
    if cuda:
        event = torch.cuda.Event()
        event.record()
    return out, event


@dataclass
class CheckpointPayload:
    """A checkpoint captured in memory (:func:`checkpoint_payload`), ready for :func:`write_checkpoint`
    (which may run in another thread while training goes on)."""
    step: int
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    summary: dict
    ready: Any = None                 # a CUDA event: the device-to-host copies are done

    def wait_ready(self) -> None:
        if self.ready is not None:
            self.ready.synchronize()


def checkpoint_payload(step: int, config_hash_: str, job_tensors: dict[str, torch.Tensor],
                       optimizer: torch.optim.Optimizer | dict | None = None, losses=(), rng: bool = True,
                       info: dict | None = None, pinned: dict | None = None) -> CheckpointPayload:
    """Capture the checkpoint of ``step`` (steps done): ``job_tensors`` (the job's own state:
    trainable weights, its generators), the optimizer (or its ``state_dict()``) flattened, the
    global RNG states, ``losses`` (every step's loss so far) and ``info`` (JSON-able facts). Every
    tensor is copied (:func:`snapshot_tensors`), so training may go on at once."""
    tensors = {f"job.{k}": v for k, v in job_tensors.items()}
    index: dict[str, Any] = {"format": FORMAT, "step": int(step), "config_hash": config_hash_,
                             "info": _jsonable(dict(info or {}))}
    if optimizer is not None:
        sd = optimizer.state_dict() if hasattr(optimizer, "state_dict") else optimizer
        opt_tensors, index["optimizer"] = optimizer_to_tensors(sd)
        tensors.update(opt_tensors)
    if rng:
        rng_t, index["rng"] = rng_state()
        tensors.update(rng_t)
    tensors["losses"] = torch.tensor([float(x) for x in losses], dtype=torch.float64)
    tensors, ready = snapshot_tensors(tensors, pinned)
    meta = {"format": FORMAT, "step": str(int(step)), "config_hash": config_hash_,
            "index": json.dumps(index, sort_keys=True)}
    summary = dict(index)
    summary["tensors"] = {k: {"dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape)}
                          for k, v in sorted(tensors.items())}
    return CheckpointPayload(int(step), tensors, meta, summary, ready)


def write_checkpoint(state_dir, payload: CheckpointPayload) -> Path:
    """Write a captured checkpoint atomically: the safetensors file, then the JSON file. On a failed
    write (``OSError``; a full disk gives a message that says so) the previous checkpoint stays as
    it was and no temporary file is left."""
    st_path, json_path = checkpoint_paths(state_dir)
    payload.wait_ready()
    atomic_save_safetensors(st_path, payload.tensors, payload.metadata)
    atomic_write_text(json_path, json.dumps(payload.summary, indent=1, sort_keys=True))
    return st_path


def save_checkpoint(state_dir, step: int, config_hash_: str, job_tensors: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer | dict | None = None, losses=(), rng: bool = True,
                    info: dict | None = None) -> Path:
    """:func:`checkpoint_payload` + :func:`write_checkpoint`, in the calling thread."""
    return write_checkpoint(state_dir, checkpoint_payload(step, config_hash_, job_tensors, optimizer, losses, rng,
                                                          info))


def load_checkpoint(state_dir, device: str | torch.device = "cpu") -> Checkpoint | None:
    """The checkpoint in ``state_dir`` (``None`` when there is none). Trusts the safetensors file's
    own metadata (the JSON file may be one checkpoint older after a crash). Job tensors are put on
    ``device``; optimizer and RNG tensors stay on the CPU (``optimizer.load_state_dict`` moves them)."""
    st_path, _ = checkpoint_paths(state_dir)
    if not st_path.is_file():
        return None
    try:
        with safe_open(str(st_path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise CheckpointError(f"cannot read the checkpoint {st_path}: {exc}. Delete the folder {st_path.parent} "
                              f"to start over, or choose another output name") from exc
    if meta.get("format") != FORMAT or "index" not in meta:
        raise CheckpointError(f"{st_path} is not a training checkpoint of this pack (format "
                              f"{meta.get('format')!r}); delete the folder {st_path.parent} to start over, or "
                              f"choose another output name")
    index = json.loads(meta["index"])
    step = int(meta["step"])
    bad = [k[4:] for k, v in tensors.items() if k.startswith("job.") and v.is_floating_point()
           and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"the checkpoint {st_path} (step {step}) holds NaN or infinite trained weights "
                              f"({', '.join(bad[:3])}): that run had diverged. It is not resumed; delete the folder "
                              f"{st_path.parent} to start over, or choose another output name")
    job = {k[4:]: v.to(device) for k, v in tensors.items() if k.startswith("job.")}
    opt = optimizer_from_tensors(tensors, index["optimizer"]) if "optimizer" in index else None
    rng_t = {k: v for k, v in tensors.items() if k.startswith("rng.")}
    losses = tensors["losses"].tolist() if "losses" in tensors else []
    return Checkpoint(step=step, config_hash=meta.get("config_hash", ""), job_tensors=job, optimizer_state=opt,
                      rng_tensors=rng_t, rng_extras=index.get("rng", {}), losses=losses, path=st_path,
                      info=_unjson(index.get("info", {})))


def remove_checkpoint(state_dir) -> None:
    """Delete the checkpoint pair (a fresh start with ``resume: false``)."""
    for p in checkpoint_paths(state_dir):
        remove_quietly(p)
