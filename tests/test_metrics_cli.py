"""The evaluation command lines' shared plumbing (metrics/common_cli.py): the progress printer in its
three modes and as a (done, total, stage) callback, the time format, the exit statuses of run_cli. The
commands themselves run in test_evaluate.py and the overfitting integration test."""
from __future__ import annotations

import argparse
import io

import pytest

from personalize_pack.metrics.common_cli import Progress, fmt_time, run_cli
from personalize_pack.metrics.errors import EvaluationError, UsageError


def test_progress_bar_lines_and_off():
    t = [100.0]
    out = io.StringIO()
    p = Progress(40, out, "bar", width=10, clock=lambda: t[0])
    p.show("case_name")
    assert out.getvalue() == "\r[..........] 0/40 images  case_name  ETA ?\x1b[K"
    t[0] += 12.0
    for _ in range(12):
        p.advance("case_name")
    # 12 done in 12 s: 28 left at 1 s each
    assert out.getvalue().endswith("\r[###.......] 12/40 images  case_name  ETA 0:28\x1b[K")
    t[0] += 3600.0
    p.advance("a_very_long_case_name_that_does_not_fit_the_line", 28)
    assert out.getvalue().endswith("\r[##########] 40/40 images  a_very_long_case_name_that_do...  ETA 0:00\x1b[K")
    p.close()
    assert out.getvalue().endswith("\n")
    out = io.StringIO()
    p = Progress(3, out, "lines", clock=lambda: t[0])
    p.show("a")
    p.advance("a", 2)
    p.case_done("a", 2)
    p.advance("b")
    p.case_done("b", 1)
    p.close()
    assert out.getvalue() == "a: 2 images (2/3, 0:00 elapsed)\nb: 1 image (3/3, 0:00 elapsed)\n"
    out = io.StringIO()
    p = Progress(3, out, "off")
    p.advance("a", 3)
    p.case_done("a", 3)
    p.close()
    assert out.getvalue() == ""


def test_progress_as_a_stage_callback():
    t = [0.0]
    out = io.StringIO()
    p = Progress(0, out, "bar", width=10, clock=lambda: t[0], label_width=12)
    p(0, 40, "latents")
    assert out.getvalue() == "\r[..........]   0%  latents  ETA ?\x1b[K"
    t[0] += 10.0
    p(10, 40, "a stage with a long name")
    assert out.getvalue().endswith("\r[##........]  25%  a stage w...  ETA 0:30\x1b[K")
    p.close()
    assert out.getvalue().endswith("\n")
    out = io.StringIO()
    p = Progress(0, out, "lines", clock=lambda: t[0])
    p(0, 4, "one")
    p(1, 4, "one")                                  # same stage: no new line
    t[0] += 75.0
    p(4, 4, "done")
    p.close()
    assert out.getvalue() == "  0%  one  (0:00 elapsed)\n100%  done  (1:15 elapsed)\n"
    out = io.StringIO()
    p = Progress(0, out, "off")
    p(1, 2, "x")
    p.close()
    assert out.getvalue() == ""


def test_fmt_time():
    assert [fmt_time(s) for s in (-3, 0, 59.6, 61, 3599, 3600, 3725)] == ["0:00", "0:00", "1:00", "1:01", "59:59",
                                                                          "1:00:00", "1:02:05"]


def _parser():
    p = argparse.ArgumentParser(prog="x")
    p.add_argument("what")
    p.add_argument("--debug", action="store_true")
    return p


@pytest.mark.parametrize("what, status, message", [
    ("ok", 0, ""), ("usage", 2, "error: bad flag"), ("evaluation", 1, "error: no images"),
    ("other", 1, "error: ValueError: first line (--debug shows the traceback)"), ("ctrl-c", 130, "error: interrupted")])
def test_run_cli_exit_statuses(capsys, what, status, message):
    def run(a):
        if a.what == "usage":
            raise UsageError("bad flag")
        if a.what == "evaluation":
            raise EvaluationError("no images")
        if a.what == "other":
            raise ValueError("first line\nsecond line")
        if a.what == "ctrl-c":
            raise KeyboardInterrupt

    assert run_cli(_parser(), run, [what], (UsageError,), (EvaluationError,)) == status
    assert capsys.readouterr().err.strip() == message


def test_run_cli_argparse_help_and_debug(capsys):
    assert run_cli(_parser(), lambda a: None, [], (UsageError,), ()) == 2          # argparse: missing argument
    assert run_cli(_parser(), lambda a: None, ["--help"], (UsageError,), ()) == 0
    capsys.readouterr()

    def boom(a):
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        run_cli(_parser(), boom, ["x", "--debug"], (UsageError,), ())
