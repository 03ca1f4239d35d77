"""Parent side of the training sidecar: start the child, stream its events, forward Cancel.

No ComfyUI (and no torch) import: the training nodes call :func:`run_with_progress` (or
:func:`run_job`) with callbacks that turn steps and previews into ComfyUI progress and that read
ComfyUI's interrupt flag.

The child is ``[python, training/sidecar.py, JOB_DIR]`` (or the same under ``accelerate launch`` /
``torchrun`` for several GPUs) in a new process group / session, so Cancel and clean-up reach every
process it starts. Events (JSON lines on its stdout) are read by a thread and handed to
``on_event`` in the calling thread; stderr is kept (its last lines go into error messages).
"""
from __future__ import annotations

import collections
import importlib.util
import json
import os
import queue
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

SIDECAR = Path(__file__).resolve().parent / "sidecar.py"
EXIT_CANCELLED = 143
STDERR_TAIL = 20
_EOF = object()


class TrainingError(RuntimeError):
    """The child failed: its ``error`` event's message (or its exit code), then its last stderr lines."""

    def __init__(self, message: str, stderr_tail: list[str] | None = None, returncode: int | None = None):
        self.reason = message
        self.stderr_tail = list(stderr_tail or [])
        self.returncode = returncode
        text = message
        if self.stderr_tail:
            text += "\n--- last lines of the training process's stderr ---\n" + "\n".join(self.stderr_tail)
        super().__init__(text)


class TrainingCancelled(RuntimeError):
    """``should_cancel()`` returned True; the child was stopped (its last checkpoint stays)."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_command(job_dir, gpus: int = 1, python: str = sys.executable, launcher: str = "auto") -> list[str]:
    """The command line of the child. ``gpus > 1``: ``accelerate launch --num_processes N`` when
    accelerate is importable (``launcher="auto"``) or asked for, else ``python -m
    torch.distributed.run --nproc_per_node N`` (torchrun, which ships with torch); each on a free
    local port, so runs in parallel do not meet."""
    job_dir = str(Path(job_dir).resolve())
    if gpus <= 1:
        return [python, str(SIDECAR), job_dir]
    if launcher == "auto":
        launcher = "accelerate" if importlib.util.find_spec("accelerate") is not None else "torchrun"
    port = str(_free_port())
    if launcher == "accelerate":
        return [python, "-m", "accelerate.commands.launch", "--num_processes", str(gpus), "--num_machines", "1",
                "--multi_gpu", "--main_process_port", port, str(SIDECAR), job_dir]
    if launcher == "torchrun":
        return [python, "-m", "torch.distributed.run", "--nproc_per_node", str(gpus), "--nnodes", "1",
                "--master_addr", "127.0.0.1", "--master_port", port, str(SIDECAR), job_dir]
    raise ValueError(f"launcher must be 'auto', 'accelerate' or 'torchrun', not {launcher!r}")


def _signal_group(proc: subprocess.Popen, kill: bool) -> None:
    """SIGTERM (``kill=False``) or SIGKILL to the child's whole process group (Windows: Ctrl-Break,
    then ``taskkill /T /F``)."""
    if os.name == "nt":
        if kill:
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(proc.pid)], capture_output=True, check=False)
        elif proc.poll() is None:
            try:
                proc.send_signal(signal.CTRL_BREAK_EVENT)
            except OSError:
                pass
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass


def _read_stdout(stream, q: queue.Queue) -> None:
    try:
        for raw in stream:
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("{"):
                continue                                        # not an event: ignored
            try:
                evt = json.loads(line)
            except ValueError:
                continue
            if isinstance(evt, dict) and isinstance(evt.get("event"), str):
                q.put((time.perf_counter(), evt))
    finally:
        q.put(_EOF)


def _read_stderr(stream, tail: collections.deque, on_log) -> None:
    for raw in stream:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        tail.append(line)
        if on_log is not None:
            try:
                on_log(line)
            except Exception:
                pass


def run_job(job_dir, on_event: Callable[[dict], None] | None = None,
            should_cancel: Callable[[], bool] | None = None, gpus: int = 1, python: str = sys.executable, *,
            launcher: str = "auto", env: dict | None = None, grace_s: float = 10.0, poll_s: float = 0.2,
            on_log: Callable[[str], None] | None = None) -> dict:
    """Run the training job in ``job_dir`` to its end and return the result::

        {"output": path, "steps": N, "losses": [...], "resumed_from": k, "world_size": W,
         "step_times": [s, ...],        # wall time of every step this run made (from the events)
         "median_step_s": s, "wall_s": s, "checkpoints": [k, ...], "previews": [evt, ...],
         "returncode": 0, "command": [...]}

    ``on_event(evt)`` gets every event in order, in this thread. ``should_cancel()`` is polled every
    ``poll_s`` seconds; True → SIGTERM to the child's process group, SIGKILL after ``grace_s``, then
    :class:`TrainingCancelled`. A failed child → :class:`TrainingError` with its message and stderr
    tail. ``on_log(line)`` (from a reader thread) gets every stderr line. No child process outlives
    this call, also when a callback raises."""
    job_dir = Path(job_dir)
    cmd = child_command(job_dir, gpus, python, launcher)
    child_env = dict(os.environ if env is None else env)
    child_env.setdefault("PYTHONUNBUFFERED", "1")
    child_env.setdefault("PYTHONIOENCODING", "utf-8")
    popen_kw = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP} if os.name == "nt" else {"start_new_session": True}
    t_start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=str(job_dir), env=child_env, **popen_kw)
    q: queue.Queue = queue.Queue()
    tail: collections.deque = collections.deque(maxlen=200)
    readers = [threading.Thread(target=_read_stdout, args=(proc.stdout, q), daemon=True, name="training-stdout"),
               threading.Thread(target=_read_stderr, args=(proc.stderr, tail, on_log), daemon=True,
                                name="training-stderr")]
    for t in readers:
        t.start()

    result: dict = {"command": cmd, "step_times": [], "checkpoints": [], "previews": [], "resumed_from": 0,
                    "world_size": gpus}
    done = error = None
    cancelled = False
    kill_at = None
    eof = False
    exited_at = None
    last_elapsed = 0.0
    clean_exit = False
    try:
        while True:
            try:
                item = q.get(timeout=poll_s)
            except queue.Empty:
                item = None
            if item is _EOF:
                eof = True
            elif item is not None:
                _, evt = item
                kind = evt["event"]
                if kind == "start":
                    result["resumed_from"] = int(evt.get("resumed_from", 0))
                    result["world_size"] = int(evt.get("world_size", gpus))
                    result["pid"] = evt.get("pid")
                    last_elapsed = 0.0
                elif kind == "step" and "elapsed" in evt:
                    result["step_times"].append(float(evt["elapsed"]) - last_elapsed)
                    last_elapsed = float(evt["elapsed"])
                elif kind == "checkpoint":
                    result["checkpoints"].append(evt.get("step"))
                elif kind == "preview":
                    result["previews"].append(evt)
                elif kind == "done":
                    done = evt
                elif kind == "error":
                    error = evt
                if on_event is not None:
                    on_event(evt)
            now = time.perf_counter()
            if not cancelled and should_cancel is not None and proc.poll() is None and should_cancel():
                cancelled = True
                _signal_group(proc, kill=False)
                kill_at = now + grace_s
            if kill_at is not None and now >= kill_at and proc.poll() is None:
                _signal_group(proc, kill=True)
                kill_at = None
            if proc.poll() is not None:
                if eof:
                    break
                exited_at = exited_at or now
                if now - exited_at > 5.0:                       # a grandchild still holds stdout open
                    _signal_group(proc, kill=True)
                    exited_at = now
        for t in readers:
            t.join(timeout=5.0)
        rc = proc.returncode
        clean_exit = rc == 0
    finally:
        if not clean_exit:
            _signal_group(proc, kill=True)                      # also any process the child started
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        for stream in (proc.stdout, proc.stderr):
            try:
                stream.close()
            except OSError:
                pass

    result["returncode"] = rc
    result["wall_s"] = time.perf_counter() - t_start
    stderr_tail = [line for line in tail if line.strip()][-STDERR_TAIL:]
    if cancelled and not (done is not None and rc == 0):
        raise TrainingCancelled("training cancelled" + (f" (the last checkpoint is at step {result['checkpoints'][-1]})"
                                                        if result["checkpoints"] else ""))
    if error is not None:
        raise TrainingError(str(error.get("message", "training failed")), stderr_tail, rc)
    if rc != 0:
        what = f"signal {-rc}" if rc < 0 else f"exit code {rc}"
        raise TrainingError(f"the training process ended with {what} without saying why", stderr_tail, rc)
    if done is None:
        raise TrainingError("the training process exited without finishing (no 'done' event)", stderr_tail, rc)
    result.update(output=done["output"], steps=done["steps"], losses=done["losses"])
    if "ranks_identical" in done:
        result["ranks_identical"] = done["ranks_identical"]
    result["median_step_s"] = statistics.median(result["step_times"]) if result["step_times"] else None
    return result


def _duration(s: float) -> str:
    s = max(0.0, float(s))
    return f"{s:.1f} s" if s < 90 else (f"{s / 60:.1f} min" if s < 5400 else f"{s / 3600:.1f} h")


def progress_line(evt: dict, every: int = 1) -> str | None:
    """The console line of one child event (None for a step between two logged ones: the first, every
    ``every``-th and the last step are logged)."""
    kind = evt.get("event")
    if kind == "start":
        resumed = int(evt.get("resumed_from") or 0)
        return f"{evt.get('total')} steps" + (f", resuming from step {resumed}" if resumed else "") + \
            (f", {evt['world_size']} processes" if int(evt.get("world_size") or 1) > 1 else "")
    if kind == "step":
        k, total = int(evt["step"]), int(evt["total"])
        if k != 1 and k != total and k % max(1, every):
            return None
        return (f"step {k}/{total}, loss {float(evt['loss']):.4f}, {_duration(evt.get('elapsed', 0))} so far, "
                f"about {_duration(evt.get('eta', 0))} left")
    if kind == "checkpoint":
        return f"checkpoint at step {evt.get('step')}"
    if kind == "preview":
        return f"validation image at step {evt.get('step')}: {evt.get('path')}"
    if kind == "done":
        return f"finished: {evt.get('output')}"
    if kind == "error":
        return f"failed: {evt.get('message')}"
    return None


def run_with_progress(job_dir, on_progress: Callable[[int, str | None], None],
                      should_cancel: Callable[[], bool] | None = None, gpus: int = 1,
                      log: Callable[[str], None] | None = None) -> dict:
    """:func:`run_job` for a node: ``on_progress(steps done, path of a new preview PNG or None)`` at the
    start (the resumed step), after every step and at every preview. ``log(line)`` gets a console
    line (:func:`progress_line`) for the start, about every 5 % of the steps, every checkpoint and
    preview, and the end. The result also has ``preview_paths``, the previews' files in order."""
    every = [1]

    def on_event(evt):
        kind = evt.get("event")
        if kind == "start":
            every[0] = max(1, int(evt.get("total") or 1) // 20)
        if log is not None:
            line = progress_line(evt, every[0])
            if line is not None:
                log(line)
        if kind == "start":
            on_progress(int(evt.get("resumed_from", 0)), None)
        elif kind == "step":
            on_progress(int(evt["step"]), None)
        elif kind == "preview":
            on_progress(int(evt["step"]), evt["path"])

    result = run_job(job_dir, on_event, should_cancel, gpus=gpus)
    result["preview_paths"] = [evt["path"] for evt in result["previews"]]
    return result
