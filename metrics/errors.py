"""The two errors of the evaluation commands and the libraries they drive (``metrics/cases.py``,
``metrics/evaluate.py``, ``metrics/cli.py``, ``metrics/overfitting_cli.py``): the command lines turn them
into exit statuses (``metrics/common_cli.run_cli``)."""
from __future__ import annotations


class EvaluationError(Exception):
    """An evaluation that cannot run or finish (a bad benchmark file, a missing model, no images);
    the message says why. Exit status 1."""


class UsageError(EvaluationError):
    """A bad command-line argument (exit status 2)."""
