"""The state folder of one output name (``state_dir`` of job.json), as the training loop holds it:
an exclusive lock for the run, and the background writer of its checkpoints
(``training/checkpoint.py`` is the checkpoint format)."""
from __future__ import annotations

import threading
from pathlib import Path

from ..files.locks import lock_exclusive, unlock
from .checkpoint import CheckpointError, write_checkpoint


class StateLock:
    """An exclusive lock on ``state_dir/.lock`` for the life of the run: two runs with the same
    output name at once would overwrite each other's checkpoints. Released by the OS when the
    process dies (flock / msvcrt), so a killed run leaves no stale lock."""

    def __init__(self, state_dir: Path):
        state_dir.mkdir(parents=True, exist_ok=True)
        self.path = state_dir / ".lock"
        try:
            self.fh = lock_exclusive(self.path)
        except OSError:
            raise CheckpointError(f"another training run is using the state folder {state_dir} (the same "
                                  f"output name); wait for it to finish or choose another name") from None

    def release(self) -> None:
        unlock(self.fh)


class CheckpointWriter:
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
        except BaseException as exc:
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
