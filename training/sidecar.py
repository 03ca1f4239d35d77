"""The training child process: ``python training/sidecar.py JOB_DIR``.

Started by the training nodes through ``training/runner.py`` (alone, or under ``accelerate launch``
/ ``torchrun`` with several processes). Reads ``JOB_DIR/job.json``, builds the job of its ``kind``
(``training/jobs.py``: the :class:`~.jobs.Job` interface and the ``JOB_KINDS`` registry) and runs
the one generic training loop, which owns the optimizer step, gradient averaging across ranks,
checkpoints, resume, events and Cancel.

job.json keys the loop reads (the rest belong to the kind): ``kind``, ``output`` (the final file),
``state_dir`` (checkpoints of this output name), ``steps``, ``seed`` (required); ``checkpoint_every``
(100; 0 = only at the end), ``validate_every`` (0 = no previews), ``device`` ("cpu" | "cuda"),
``resume`` (true; false deletes the old checkpoint and starts over), ``max_grad_norm`` (1.0; 0 = no
clipping), ``threads`` (torch CPU threads; unset = torch's default), ``comfyui_path`` (for kinds
that load ComfyUI). The config hash that guards resume covers every key except ``steps``, the
intervals, the paths, ``device``, ``threads``, ``resume`` and the kind's ``VOLATILE_KEYS``, plus the
kind's data fingerprint. A checkpoint is always written after the last step, so a finished run
continues when started again with more steps.

Protocol: one JSON object per line on the process's original stdout, flushed once per event
(``start``, ``step``, ``checkpoint``, ``preview``, ``done``, ``error``; see the training spec).
Everything else the process prints (libraries, ComfyUI) is moved to stderr, so the protocol
stream carries events only. Exit codes: 0 done, 1 error (after an ``error`` event), 143 cancelled
(SIGTERM, honoured at the next step boundary; nothing more is written).

Run as a script, the file imports the pack by its location (``tools/pack_import.py``) under the
name ``personalize_pack`` and calls :func:`main` from there, from any working directory.
"""
from __future__ import annotations

import errno
import json
import math
import os
import random
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

if __name__ == "__main__":                                      # bootstrap: the pack by file location
    _here = Path(__file__).resolve().parent
    if sys.path and sys.path[0] and Path(sys.path[0]).resolve() == _here:
        sys.path.pop(0)                                         # training/ must not shadow top-level names
    import importlib.util as _ilu
    _spec = _ilu.spec_from_file_location("_personalize_pack_import", _here.parent / "tools" / "pack_import.py")
    _pi = _ilu.module_from_spec(_spec)
    _spec.loader.exec_module(_pi)
    _pi.import_pack()
    from personalize_pack.training.sidecar import main as _main
    sys.exit(_main())

import torch

from ..files.atomic import finish_atomic, remove_stale_temp_files
from .checkpoint import (VOLATILE_KEYS, CheckpointError, checkpoint_payload, config_hash, load_checkpoint,
                         remove_checkpoint, rng_state, set_rng_state, write_checkpoint)
from .jobs import JOB_KINDS, Job, JobContext, resolve_kind

__all__ = ["JOB_KINDS", "Job", "JobContext", "train", "main", "load_config", "ConfigError"]

REQUIRED_KEYS = ("kind", "output", "state_dir", "steps", "seed")
DEFAULTS = {"checkpoint_every": 100, "validate_every": 0, "device": "cpu", "comfyui_path": None, "resume": True,
            "max_grad_norm": 1.0}
EXIT_ERROR = 1
EXIT_CANCELLED = 143


class ConfigError(ValueError):
    """A job.json the loop cannot run."""


class Cancelled(Exception):
    """SIGTERM arrived; stop at the step boundary."""


# =========================================================================== config

def load_config(job_dir: Path) -> dict:
    path = job_dir / "job.json"
    if not path.is_file():
        raise ConfigError(f"no job.json in {job_dir}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    if not isinstance(config, dict):
        raise ConfigError(f"{path} must hold a JSON object, not {type(config).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in config]
    if missing:
        raise ConfigError(f"job.json is missing required keys: {', '.join(missing)}")
    for k, v in DEFAULTS.items():
        config.setdefault(k, v)
    for key, low in (("steps", 1), ("seed", 0), ("checkpoint_every", 0), ("validate_every", 0)):
        v = config[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ConfigError(f"job.json: {key} must be an integer >= {low}, not {v!r}")
    if not isinstance(config["resume"], bool):
        raise ConfigError(f"job.json: resume must be true or false, not {config['resume']!r}")
    for key in ("output", "state_dir"):
        if not isinstance(config[key], str) or not config[key]:
            raise ConfigError(f"job.json: {key} must be a non-empty path")
    if config["device"] not in ("cpu", "cuda") and not str(config["device"]).startswith("cuda:"):
        raise ConfigError(f"job.json: device must be 'cpu' or 'cuda', not {config['device']!r}")
    return config


# =========================================================================== processes

class Distributed:
    """The process group when started by ``torchrun`` / ``accelerate launch`` (``WORLD_SIZE > 1``)."""

    def __init__(self):
        env = os.environ
        self.world_size = int(env.get("WORLD_SIZE", "1") or 1)
        self.rank = int(env.get("RANK", "0") or 0)
        self.local_rank = int(env.get("LOCAL_RANK", "0") or 0)
        self.active = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def device(self, wanted: str) -> torch.device:
        if wanted.startswith("cuda"):
            if not torch.cuda.is_available():
                raise ConfigError("job.json asks for device 'cuda' but this process sees no CUDA device")
            if self.enabled:
                torch.cuda.set_device(self.local_rank)
                return torch.device("cuda", self.local_rank)
            return torch.device(wanted)
        return torch.device("cpu")

    def init(self, device: torch.device) -> None:
        if self.enabled:
            import torch.distributed as dist
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            self.active = True

    def close(self) -> None:
        if self.active:
            import torch.distributed as dist
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass
            self.active = False


class _SignalFlag:
    """SIGTERM / SIGINT (and SIGBREAK on Windows) set a flag the loop reads between steps."""

    def __init__(self):
        self.raised = False
        self._old = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for name in ("SIGTERM", "SIGINT", "SIGBREAK"):
            sig = getattr(signal, name, None)
            if sig is not None:
                self._old[sig] = signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.raised = True

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()


class _StateLock:
    """An exclusive lock on ``state_dir/.lock`` for the life of the run: two runs with the same
    output name at once would overwrite each other's checkpoints. Released by the OS when the
    process dies (flock / msvcrt), so a killed run leaves no stale lock."""

    def __init__(self, state_dir: Path):
        state_dir.mkdir(parents=True, exist_ok=True)
        self.path = state_dir / ".lock"
        self.fh = open(self.path, "a+b")
        try:
            if os.name == "nt":
                import msvcrt
                self.fh.seek(0)
                msvcrt.locking(self.fh.fileno(), msvcrt.LK_NBLCK, 1)
            else:
                import fcntl
                fcntl.flock(self.fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.fh.close()
            raise CheckpointError(f"another training run is using the state folder {state_dir} (the same "
                                  f"output name); wait for it to finish or choose another name") from None

    def release(self) -> None:
        try:
            self.fh.close()
        except OSError:
            pass


class _CheckpointWriter:
    """Writes checkpoints in a background thread, one at a time: the loop captures a checkpoint
    (copies of every tensor, :func:`~.checkpoint.checkpoint_payload`) and goes on training while the
    file is written and fsynced. ``completed()``, called at every step boundary, returns the
    checkpoints written since (their events are sent then, so an event always names a complete
    file); ``check()`` raises a failed write's error there."""

    def __init__(self, state_dir: Path):
        self.state_dir = state_dir
        self.pinned: dict = {}
        self._thread: threading.Thread | None = None
        self._done: list = []
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self.last_written = 0

    def _write(self, payload) -> None:
        try:
            path = write_checkpoint(self.state_dir, payload)
            with self._lock:
                self._done.append((payload.step, path))
        except BaseException as exc:  # noqa: BLE001  (handed to the loop)
            self._error = exc

    def submit(self, payload) -> None:
        self.wait()
        self.check()
        self._thread = threading.Thread(target=self._write, args=(payload,), name="checkpoint-writer")
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def check(self) -> None:
        """Raise a failed write's error (call after sending the events of ``completed()``)."""
        if self._error is not None:
            exc, self._error = self._error, None
            raise exc

    def completed(self) -> list:
        """The (step, path) of the checkpoints written since the last call."""
        with self._lock:
            done, self._done = self._done, []
        if done:
            self.last_written = done[-1][0]
        return done


# =========================================================================== the loop

def _seed_everything(seed: int) -> None:
    random.seed(seed)
    try:
        import numpy as np
        np.random.seed(seed % 2 ** 32)
    except ImportError:
        pass
    torch.manual_seed(seed)


def _average_gradients(params, loss, cancel: bool, world: int) -> torch.Tensor:
    """One all_reduce per step: every gradient, the loss and the cancel flag in one flat buffer
    (built without a host sync). Averages the gradients in place and returns the reduced
    [loss sum, cancelled ranks] pair, still on the device: the caller reads it with the step's one
    ``tolist()``."""
    import torch.distributed as dist
    parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params]
    extra = torch.zeros(2, device=loss.device)
    extra[0] = loss.detach().float()
    if cancel:
        extra[1].fill_(1.0)
    flat = torch.cat(parts + [extra])
    dist.all_reduce(flat)
    off = 0
    for p in params:
        n = p.numel()
        g = flat[off:off + n].view_as(p).div_(world).to(p.dtype)
        if p.grad is None:
            p.grad = g
        else:
            p.grad.copy_(g)
        off += n
    return flat[off:off + 2]


def _ranks_identical(params) -> bool:
    import torch.distributed as dist
    flat = torch.cat([p.detach().reshape(-1).float() for p in params])
    ref = flat.clone()
    dist.broadcast(ref, 0)
    same = torch.tensor([1.0 if torch.equal(flat, ref) else 0.0], device=flat.device)
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    return bool(same.item() == 1.0)


def train(job_dir, emit=None, handle_signals: bool = True) -> int:
    """Run the job in ``job_dir``; events go to ``emit(dict)`` (rank 0 only). Returns the exit code
    (0 done, 1 error, 143 cancelled). Usable in-process (tests) as well as from :func:`main`."""
    job_dir = Path(job_dir).resolve()
    procs = Distributed()
    is_main = procs.rank == 0
    emit = emit if (emit is not None and is_main) else (lambda evt: None)
    flag = _SignalFlag()
    job: Job | None = None
    lock: _StateLock | None = None
    writer: _CheckpointWriter | None = None
    try:
        config = load_config(job_dir)
        kind = resolve_kind(config["kind"])
        missing = [k for k in kind.REQUIRED_KEYS if k not in config]
        if missing:
            raise ConfigError(f"job.json is missing required keys for kind {config['kind']!r}: {', '.join(missing)}")
        device = procs.device(str(config["device"]))
        procs.init(device)
        total, seed = int(config["steps"]), int(config["seed"])
        output, state_dir = Path(config["output"]), Path(config["state_dir"])
        if is_main:
            lock = _StateLock(state_dir)
            remove_stale_temp_files(state_dir)                  # left by a killed run of this output name
            remove_stale_temp_files(output.parent, prefix=f".{output.name}.")
        writer = _CheckpointWriter(state_dir)

        if config.get("threads"):
            torch.set_num_threads(int(config["threads"]))
        _seed_everything(seed)
        ctx = JobContext(job_dir=job_dir, config=config, device=device, seed=seed, total_steps=total,
                         rank=procs.rank, world_size=procs.world_size, is_main=is_main)
        job = kind(job_dir, config)
        job.setup(ctx)
        params = [p for p in job.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError(f"job kind {config['kind']!r} has no trainable tensors")
        if procs.enabled:                                       # identical start on every rank
            import torch.distributed as dist
            with torch.no_grad():
                for p in params:
                    dist.broadcast(p.data, 0)
        optimizer = job.make_optimizer(params)
        chash = config_hash(config, ignore=VOLATILE_KEYS | set(kind.VOLATILE_KEYS), extra=job.fingerprint())

        start, losses = 0, []
        if not config["resume"]:
            if is_main:
                remove_checkpoint(state_dir)
        else:
            ckpt = load_checkpoint(state_dir, device)
            if ckpt is not None:
                if ckpt.config_hash != chash:
                    raise CheckpointError(
                        f"the checkpoint in {state_dir} (step {ckpt.step}) was made with other settings or "
                        f"data (hash {ckpt.config_hash} vs {chash}); choose another output name, or set "
                        f"resume to false to start over")
                if ckpt.step > total:
                    raise CheckpointError(f"the checkpoint in {state_dir} is at step {ckpt.step}, beyond steps="
                                          f"{total}; ask for at least {ckpt.step} steps, or set resume to false")
                job.load_state_tensors(ckpt.job_tensors)
                if ckpt.optimizer_state is not None:
                    optimizer.load_state_dict(ckpt.optimizer_state)
                ckpt.restore_rng()
                start, losses = ckpt.step, list(ckpt.losses[: ckpt.step])

        emit({"event": "start", "total": total, "resumed_from": start, "world_size": procs.world_size,
              "pid": os.getpid()})
        if handle_signals:
            flag.install()
        max_norm = float(config.get("max_grad_norm") or 0)
        every, preview_every = int(config["checkpoint_every"]), int(config["validate_every"])
        last_ckpt = start if start else -1
        info = {"total": total, "world_size": procs.world_size, "kind": config["kind"]}
        t0 = time.perf_counter()
        for i in range(start, total):
            if flag.raised and not procs.enabled:
                raise Cancelled
            optimizer.zero_grad(set_to_none=True)
            loss = job.loss(i)
            loss.backward()
            stats = _average_gradients(params, loss, flag.raised, procs.world_size) if procs.enabled else None
            if max_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, max_norm)
            optimizer.step()
            if stats is None:
                value = float(loss.item())                      # the step's one host sync
            else:
                loss_sum, cancels = stats.tolist()              # likewise, for every rank
                if cancels > 0:                                 # every rank stops at the same step
                    raise Cancelled
                value = loss_sum / procs.world_size
            k = i + 1
            if not math.isfinite(value):
                raise RuntimeError(f"the loss became {value} at step {k}: training diverged (lower the learning "
                                   f"rate); the last checkpoint (step {writer.last_written or start}) is intact")
            losses.append(value)
            elapsed = time.perf_counter() - t0
            emit({"event": "step", "step": k, "total": total, "loss": value, "elapsed": round(elapsed, 6),
                  "eta": round(elapsed / (k - start) * (total - k), 3)})
            if is_main:
                for done_step, path in writer.completed():
                    emit({"event": "checkpoint", "step": done_step, "path": str(path)})
                writer.check()
                if (every and k % every == 0) or k == total:
                    writer.submit(checkpoint_payload(k, chash, job.state_tensors(), optimizer, losses, info=info,
                                                     pinned=writer.pinned))
                    last_ckpt = k
            if is_main and preview_every and k % preview_every == 0:
                rng = rng_state()                               # a preview never changes the training
                with torch.no_grad():
                    shown = job.preview(k)
                set_rng_state(*rng)
                if shown:
                    emit({"event": "preview", "step": k, "path": str(shown[0]), "caption": str(shown[1])})

        if flag.raised and not procs.enabled:
            raise Cancelled
        identical = _ranks_identical(params) if procs.enabled else None
        if is_main:
            if last_ckpt != total:                              # e.g. resumed at the end: keep it resumable
                writer.submit(checkpoint_payload(total, chash, job.state_tensors(), optimizer, losses, info=info,
                                                 pinned=writer.pinned))
            output.parent.mkdir(parents=True, exist_ok=True)
            tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
            try:
                job.save_final(tmp)                             # while the last checkpoint is written
                writer.wait()
                for done_step, path in writer.completed():
                    emit({"event": "checkpoint", "step": done_step, "path": str(path)})
                writer.check()
                if flag.raised:
                    raise Cancelled
                finish_atomic(tmp, output)
            finally:
                if tmp.exists():
                    tmp.unlink()
            done = {"event": "done", "output": str(output), "steps": total, "losses": losses}
            if identical is not None:
                done["ranks_identical"] = identical
            emit(done)
        if procs.active:
            import torch.distributed as dist
            dist.barrier()
        return 0
    except Cancelled:
        return EXIT_CANCELLED
    except Exception as exc:  # noqa: BLE001  (every failure becomes an error event)
        traceback.print_exc(file=sys.stderr)
        emit({"event": "error", "message": _message(exc)})
        return EXIT_ERROR
    finally:
        if writer is not None:
            writer.wait()                                       # a checkpoint being written is finished
        flag.restore()
        if job is not None:
            try:
                job.close()
            except Exception:  # noqa: BLE001
                traceback.print_exc(file=sys.stderr)
        if lock is not None:
            lock.release()
        procs.close()


def _message(exc: BaseException) -> str:
    if isinstance(exc, (ConfigError, CheckpointError)):
        return str(exc)
    if isinstance(exc, KeyError) and exc.args and isinstance(exc.args[0], str) and exc.args[0].startswith("unknown job kind"):
        return exc.args[0]
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC and exc.strerror:
        return exc.strerror
    return f"{type(exc).__name__}: {exc}"


# =========================================================================== entry point

class _EventStream:
    """JSON lines on a private copy of the original stdout; one write + flush per event."""

    def __init__(self, fh):
        self.fh = fh

    def __call__(self, evt: dict) -> None:
        self.fh.write(json.dumps(evt) + "\n")
        self.fh.flush()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) != 1:
        print("usage: python training/sidecar.py JOB_DIR", file=sys.stderr)
        return 2
    sys.stdout.flush()
    proto = os.fdopen(os.dup(1), "w", encoding="utf-8", newline="\n")
    os.dup2(2, 1)                                               # stray prints go to stderr from now on
    try:
        return train(argv[0], emit=_EventStream(proto))
    finally:
        try:
            proto.close()
        except OSError:
            pass
