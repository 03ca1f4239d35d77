"""The training child process: ``python training/sidecar.py JOB_DIR``.

Started by the training nodes through ``training/runner.py`` (alone, or under ``accelerate launch``
/ ``torchrun`` with several processes; ``training/distributed.py``). Reads ``JOB_DIR/job.json``
(``training/job_folder.py``: the keys and their defaults), builds the job of its ``kind`` (the
:class:`~.jobs.Job` interface of ``training/jobs.py``; the kinds are :data:`JOB_KINDS`) and runs the
one generic training loop, which owns the optimizer step, gradient averaging across ranks,
checkpoints, resume, events and Cancel. The loop runs in three phases: set-up (config, job,
optimizer, resume), the steps (each possibly followed by a checkpoint and a preview) and the finish
(the last checkpoint, the final file).

The config hash that guards resume covers every key except ``steps``, the intervals, the paths,
``device``, ``threads``, ``resume`` and the kind's ``VOLATILE_KEYS``, plus the kind's data
fingerprint. A checkpoint is always written after the last step, so a finished run continues when
started again with more steps.

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
import importlib
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
from typing import Any

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

import numpy as np
import torch

from ..files.atomic import finish_atomic, remove_stale_temp_files, temp_path
from .checkpoint import (VOLATILE_KEYS, CheckpointError, changed_settings, checkpoint_payload, config_hash,
                         hashed_settings, load_checkpoint, remove_checkpoint, rng_state, set_rng_state)
from .comfy_model import InfusionJob, LoRAJob
from .distributed import Distributed, average_gradients, ranks_identical
from .job_folder import ConfigError, load_config
from .jobs import Job, JobContext, ToyJob
from .state_folder import CheckpointWriter, StateLock

__all__ = ["JOB_KINDS", "resolve_kind", "train", "main"]

EXIT_ERROR = 1
EXIT_CANCELLED = 143


class Cancelled(Exception):
    """SIGTERM arrived; stop at the step boundary."""


# =========================================================================== job kinds

# ``kind`` of job.json -> its Job class. An entry may also be a ``"module:Class"`` string, imported on
# first use (a module name starting with ``.`` is relative to this package): a kind from outside the
# pack does not have to be imported by every child.
JOB_KINDS: dict[str, Any] = {"toy": ToyJob, "lora": LoRAJob, "infusion": InfusionJob}


def resolve_kind(kind: str) -> type[Job]:
    """The Job class for a ``kind`` name; ``KeyError`` with the known kinds when there is none."""
    if not isinstance(kind, str) or kind not in JOB_KINDS:
        known = ", ".join(sorted(JOB_KINDS))
        raise KeyError(f"unknown job kind {kind!r} in job.json (known kinds: {known})")
    entry = JOB_KINDS[kind]
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        mod = importlib.import_module(module, package=__package__) if module.startswith(".") else \
            importlib.import_module(module)
        entry = getattr(mod, attr)
        JOB_KINDS[kind] = entry
    return entry


# =========================================================================== signals

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


# =========================================================================== the loop

def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


class _Run:
    """One run of the loop, in phases: :meth:`set_up`, :meth:`resume`, :meth:`steps`, :meth:`finish`;
    :meth:`close` frees what was taken, whatever phase was reached."""

    def __init__(self, job_dir: Path, procs: Distributed, emit):
        self.job_dir, self.procs, self.emit = job_dir, procs, emit
        self.is_main = procs.is_main
        self.flag = _SignalFlag()
        self.job: Job | None = None
        self.lock: StateLock | None = None
        self.writer: CheckpointWriter | None = None

    # ------------------------------------------------------------------ set-up
    def set_up(self) -> None:
        """job.json, the device and process group, the state folder, the job, the optimizer."""
        procs = self.procs
        config = self.config = load_config(self.job_dir)
        kind = resolve_kind(config["kind"])
        missing = [k for k in kind.REQUIRED_KEYS if k not in config]
        if missing:
            raise ConfigError(f"job.json is missing required keys for kind {config['kind']!r}: {', '.join(missing)}")
        wanted = str(config["device"])
        if wanted.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError("job.json asks for device 'cuda' but this process sees no CUDA device")
        device = procs.device(wanted)
        procs.init(device)
        self.total, seed = int(config["steps"]), int(config["seed"])
        self.output, self.state_dir = Path(config["output"]), Path(config["state_dir"])
        if self.is_main:
            self.lock = StateLock(self.state_dir)
            remove_stale_temp_files(self.state_dir)             # left by a killed run of this output name
            remove_stale_temp_files(self.output.parent, prefix=f".{self.output.name}.")
        self.writer = CheckpointWriter(self.state_dir)

        if config.get("threads"):
            torch.set_num_threads(int(config["threads"]))
        _seed_everything(seed)
        ctx = JobContext(job_dir=self.job_dir, config=config, device=device, seed=seed, total_steps=self.total,
                         rank=procs.rank, world_size=procs.world_size, is_main=self.is_main)
        self.device = device
        self.job = kind(self.job_dir, config)
        self.job.setup(ctx)
        self.params = [p for p in self.job.parameters() if p.requires_grad]
        if not self.params:
            raise RuntimeError(f"job kind {config['kind']!r} has no trainable tensors")
        procs.broadcast_parameters(self.params)                 # identical start on every rank
        self.optimizer = self.job.make_optimizer(self.params)
        ignore, data = VOLATILE_KEYS | set(kind.VOLATILE_KEYS), self.job.fingerprint()
        self.chash = config_hash(config, ignore=ignore, extra=data)
        self.settings = hashed_settings(config, ignore, data)
        self.info = {"total": self.total, "world_size": procs.world_size, "kind": config["kind"],
                     "settings": self.settings}
        self.max_norm = float(config.get("max_grad_norm") or 0)
        self.accumulation = int(config["gradient_accumulation"])

    def resume(self) -> int:
        """The checkpoint of this output name, if resuming: the job's tensors, the optimizer, the RNGs
        and the losses so far. Returns the step to start from."""
        self.start, self.losses = 0, []
        if not self.config["resume"]:
            if self.is_main:
                remove_checkpoint(self.state_dir)
            return 0
        ckpt = load_checkpoint(self.state_dir, self.device)
        if ckpt is None:
            return 0
        name = self.output.stem
        if ckpt.config_hash != self.chash:
            old = ckpt.info.get("settings")
            changed = changed_settings(old, self.settings) if isinstance(old, dict) else []
            what = ("; changed: " + ", ".join(changed)) if changed else " (settings or data)"
            raise CheckpointError(
                f"output_name {name!r} already holds a run (checkpoint at step {ckpt.step} in {self.state_dir}) made "
                f"with other inputs{what}. Nothing was trained. To continue that run, set those inputs back; to "
                f"train anew, give another output_name, or delete {self.state_dir} to start over under this name")
        if ckpt.step > self.total:
            raise CheckpointError(f"output_name {name!r} already holds a run at step {ckpt.step} ({self.state_dir}), "
                                  f"beyond steps={self.total}: set steps to at least {ckpt.step} to continue it, or "
                                  f"give another output_name (or delete {self.state_dir}) to start over")
        self.job.load_state_tensors(ckpt.job_tensors)
        if ckpt.optimizer_state is not None:
            self.optimizer.load_state_dict(ckpt.optimizer_state)
        ckpt.restore_rng()
        self.start, self.losses = ckpt.step, list(ckpt.losses[: ckpt.step])
        return self.start

    # ------------------------------------------------------------------ steps
    def steps(self) -> None:
        """Steps ``start + 1 .. total``, each followed by its events, checkpoint and preview."""
        self.last_ckpt = self.start if self.start else -1
        t0 = time.perf_counter()
        for i in range(self.start, self.total):
            k = i + 1
            value = self.step(i)
            self.losses.append(value)
            elapsed = time.perf_counter() - t0
            self.emit({"event": "step", "step": k, "total": self.total, "loss": value, "elapsed": round(elapsed, 6),
                       "eta": round(elapsed / (k - self.start) * (self.total - k), 3)})
            if self.is_main:
                self.checkpoint(k)
                self.preview(k)

    def step(self, i: int) -> float:
        """One optimizer step (0-based ``i``): forward and backward of each of its
        ``gradient_accumulation`` micro-batches (their gradients summed, each loss divided by their
        number: the gradient of their mean), gradient averaging across ranks, clipping, update.
        Returns the loss (the mean over ranks and micro-batches); raises :class:`Cancelled` when
        asked to stop, and on a loss that is not finite."""
        procs, params = self.procs, self.params
        if self.flag.raised and not procs.enabled:
            raise Cancelled
        self.optimizer.zero_grad(set_to_none=True)
        accumulation = self.accumulation
        if accumulation == 1:
            loss = self.job.loss(i, 0)
            loss.backward()
        else:                                                   # the mean of the micro-batches' losses
            total = 0.0
            for micro in range(accumulation):
                part = self.job.loss(i, micro)
                (part / accumulation).backward()
                total = total + part.detach()
            loss = total / accumulation
        stats = average_gradients(params, loss, self.flag.raised, procs.world_size) if procs.enabled else None
        if self.max_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, self.max_norm)
        self.optimizer.step()
        if stats is None:
            value = float(loss.item())                          # the step's one host sync
        else:
            loss_sum, cancels = stats.tolist()                  # likewise, for every rank
            if cancels > 0:                                     # every rank stops at the same step
                raise Cancelled
            value = loss_sum / procs.world_size
        if not math.isfinite(value):
            raise RuntimeError(f"the loss became {value} at step {i + 1}: training diverged (lower the learning "
                               f"rate); the last checkpoint (step {self.writer.last_written or self.start}) is intact")
        return value

    # ------------------------------------------------------------------ checkpoints and previews
    def _report_checkpoints(self) -> None:
        for done_step, path in self.writer.completed():
            self.emit({"event": "checkpoint", "step": done_step, "path": str(path)})
        self.writer.check()

    def _submit_checkpoint(self, k: int) -> None:
        self.writer.submit(checkpoint_payload(k, self.chash, self.job.state_tensors(), self.optimizer, self.losses,
                                              info=self.info, pinned=self.writer.pinned))
        self.last_ckpt = k

    def checkpoint(self, k: int) -> None:
        """Rank 0 after step ``k``: the events of the checkpoints written since, and a new one every
        ``checkpoint_every`` steps and after the last."""
        self._report_checkpoints()
        every = int(self.config["checkpoint_every"])
        if (every and k % every == 0) or k == self.total:
            self._submit_checkpoint(k)

    def preview(self, k: int) -> None:
        every = int(self.config["validate_every"])
        if every and k % every == 0:
            rng = rng_state()                                   # a preview never changes the training
            with torch.no_grad():
                shown = self.job.preview(k)
            set_rng_state(*rng)
            if shown:
                self.emit({"event": "preview", "step": k, "path": str(shown[0]), "caption": str(shown[1])})

    # ------------------------------------------------------------------ finish
    def finish(self) -> None:
        """The last checkpoint and the final file (rank 0), written while the others wait."""
        procs = self.procs
        if self.flag.raised and not procs.enabled:
            raise Cancelled
        identical = ranks_identical(self.params) if procs.enabled else None
        if self.is_main:
            if self.last_ckpt != self.total:                    # e.g. resumed at the end: keep it resumable
                self._submit_checkpoint(self.total)
            output = self.output
            output.parent.mkdir(parents=True, exist_ok=True)
            tmp = temp_path(output)
            try:
                self.job.save_final(tmp)                        # while the last checkpoint is written
                self.writer.wait()
                self._report_checkpoints()
                if self.flag.raised:
                    raise Cancelled
                finish_atomic(tmp, output)
            finally:
                if tmp.exists():
                    tmp.unlink()
            done = {"event": "done", "output": str(output), "steps": self.total, "losses": self.losses}
            if identical is not None:
                done["ranks_identical"] = identical
            self.emit(done)
        procs.barrier()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.wait()                                  # a checkpoint being written is finished
        self.flag.restore()
        if self.job is not None:
            try:
                self.job.close()
            except Exception:
                traceback.print_exc(file=sys.stderr)
        if self.lock is not None:
            self.lock.release()
        self.procs.close()


def train(job_dir, emit=None, handle_signals: bool = True) -> int:
    """Run the job in ``job_dir``; events go to ``emit(dict)`` (rank 0 only). Returns the exit code
    (0 done, 1 error, 143 cancelled). Usable in-process (tests) as well as from :func:`main`."""
    procs = Distributed()
    emit = emit if (emit is not None and procs.is_main) else (lambda evt: None)
    run = _Run(Path(job_dir).resolve(), procs, emit)
    try:
        run.set_up()
        start = run.resume()
        emit({"event": "start", "total": run.total, "resumed_from": start, "world_size": procs.world_size,
              "pid": os.getpid()})
        if handle_signals:
            run.flag.install()
        run.steps()
        run.finish()
        return 0
    except Cancelled:
        return EXIT_CANCELLED
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        emit({"event": "error", "message": _message(exc)})
        return EXIT_ERROR
    finally:
        run.close()


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
