"""What the pack's evaluation command lines share (``metrics/cli.py`` for ``tools/evaluate.py``,
``metrics/overfitting_cli.py`` for ``tools/evaluate.py overfitting``): the exit statuses, the progress
printer and its time format."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from .errors import UsageError

__all__ = ["Progress", "fmt_time", "check_output", "check_outputs_apart", "run_cli"]


def fmt_time(seconds: float) -> str:
    """``m:ss``, or ``h:mm:ss`` from an hour on (negative times show as 0:00)."""
    s = max(0, int(round(seconds)))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Progress on ``stream`` (stderr): a bar redrawn on one line (``mode="bar"``), one line per
    finished case or new stage (``"lines"``), or nothing (``"off"``). Two ways to feed it:

    * counting items (the evaluation): ``show``, ``advance``, ``case_done``:
      ``[#####.....] 12/40 images  case_name  ETA 0:31``, in lines mode
      ``case_name: 2 images (12/40, 0:10 elapsed)``;
    * as a ``progress(done, total, stage)`` callback (the overfitting metrics):
      ``[#######.............]  35%  stage  ETA 1:02``, in lines mode ``35%  stage  (0:12 elapsed)``
      when the stage changes.

    Labels longer than ``label_width`` are cut with "..."."""

    def __init__(self, total: int = 0, stream=None, mode: str = "bar", width: int = 20, clock=time.monotonic,
                 label_width: int = 32):
        self.total, self.stream, self.mode, self.width, self.clock = total, stream, mode, width, clock
        self.label_width = label_width
        self.done = 0
        self.start = clock()
        self.stage = None
        self._drawn = False

    def _bar(self, count: str, label: str) -> str:
        filled = self.width * self.done // self.total if self.total else self.width
        elapsed = self.clock() - self.start
        eta = fmt_time(elapsed / self.done * (self.total - self.done)) if self.done else "?"
        name = label if len(label) <= self.label_width else label[:self.label_width - 3] + "..."
        return f"[{'#' * filled}{'.' * (self.width - filled)}] {count}  {name}  ETA {eta}"

    def line(self, case: str) -> str:
        return self._bar(f"{self.done}/{self.total} images", case)

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def _redraw(self, text: str) -> None:
        self._write("\r" + text + "\x1b[K")
        self._drawn = True

    def _elapsed(self) -> str:
        return fmt_time(self.clock() - self.start)

    def show(self, case: str) -> None:
        if self.mode == "bar":
            self._redraw(self.line(case))

    def advance(self, case: str, n: int = 1) -> None:
        self.done += n
        self.show(case)

    def case_done(self, case: str, images: int) -> None:
        if self.mode == "lines":
            self._write(f"{case}: {images} image{'s' if images != 1 else ''} ({self.done}/{self.total}, "
                        f"{self._elapsed()} elapsed)\n")

    def __call__(self, done: int, total: int, stage: str) -> None:
        self.done, self.total = done, total
        percent = f"{100 * done / total if total else 100.0:3.0f}%"
        if self.mode == "bar":
            self._redraw(self._bar(percent, stage))
        elif self.mode == "lines" and stage != self.stage:
            self._write(f"{percent}  {stage}  ({self._elapsed()} elapsed)\n")
            self.stage = stage

    def close(self) -> None:
        if self.mode == "bar" and self._drawn:
            self._write("\n")
            self._drawn = False


def check_output(path: Path, flag: str) -> None:
    """An output file the command may write: not a folder, in a folder that exists."""
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a folder, not a file")
    if not path.parent.is_dir():
        raise UsageError(f"{flag} {path}: the folder {path.parent} does not exist")


def _file_key(path) -> tuple:
    """What makes two paths the same file: the device and inode of an existing file (hard links, another
    spelling, a symbolic link), else the resolved absolute path."""
    try:
        st = os.stat(path)
        return ("inode", st.st_dev, st.st_ino)
    except OSError:
        return ("path", os.path.normcase(os.path.realpath(path)))


def check_outputs_apart(outputs: dict, inputs: dict) -> None:
    """Refuses, before any work, outputs that would overwrite an input or each other: ``outputs`` maps a
    flag (``--out``) to its path, ``inputs`` an input file to what it is ("a generated image of case 3").
    A UsageError names both."""
    seen: dict = {}
    for flag, path in outputs.items():
        key = _file_key(path)
        if key in seen:
            raise UsageError(f"{flag} {path} is the same file as {seen[key]}: the one would overwrite the other; "
                             f"give them different files")
        seen[key] = f"{flag} {path}"
    if not seen:
        return
    for path, what in inputs.items():
        key = _file_key(path)
        if key in seen:
            raise UsageError(f"{seen[key]} is {what} ({path}), an input of this run: writing it would destroy it; "
                             f"choose another file")


def run_cli(parser, run_fn, argv, usage_errors: tuple, errors: tuple) -> int:
    """Parse ``argv`` and call ``run_fn(args)``: exit status 0 done, 2 for a bad argument (argparse's,
    or ``usage_errors``), 1 for ``errors`` and anything else (one ``error:`` line on stderr; ``--debug``
    shows the traceback), 130 on Ctrl-C. Shared by the evaluation and the overfitting commands."""
    try:
        a = parser.parse_args(argv)
    except SystemExit as exc:       # argparse: 2 on a bad argument (message printed), 0 for --help
        return exc.code if isinstance(exc.code, int) else 2
    try:
        run_fn(a)
    except usage_errors as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except errors as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if getattr(a, "debug", False):
            raise
        msg = str(exc).strip().splitlines()
        print(f"error: {type(exc).__name__}: {msg[0] if msg else ''} (--debug shows the traceback)", file=sys.stderr)
        return 1
    return 0
