"""The command line ``tools/evaluate.py``: score a folder of generated images against a benchmark
description (``metrics/cases.py``, ``metrics/evaluate.py``) into a CSV and a summary table; with
``overfitting`` as its first argument, Infusion's overfitting metrics instead (``metrics/overfitting_cli.py``).
Exit status: 0 done, 1 evaluation error, 2 bad arguments, 130 interrupted."""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from ..files.atomic import atomic_write_text
from . import models as em
from . import overfitting_cli
from .cases import discover_images, load_cases, no_images_error, select_cases
from .common_cli import Progress, check_output, check_outputs_apart, run_cli
from .errors import EvaluationError, UsageError
from .evaluate import (DEFAULT_CSV_NAME, DEFAULT_THRESHOLD, METRICS, Evaluation, evaluate, format_summary,
                       load_scorers, parse_metrics, write_csv)
from .owl import OWL_FOLDER

__all__ = ["build_parser", "run", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="evaluate.py",
        description="Score a folder of generated images against a benchmark description (CLIP-T, CLIP-I, DINO, "
                    "Detect-and-Compare): a CSV with one row per image and a summary table per case.",
        epilog="Generated images of case N: <images>/N/*.png, <images>/N.png or <images>/N_*.png "
               "(.jpg, .jpeg, .webp too). Exit status: 0 done, 1 evaluation error, 2 bad arguments. "
               "'evaluate.py overfitting --help': Infusion's overfitting metrics (LFD, W2) of a customised model.")
    p.add_argument("benchmark", help="benchmark JSON (the format of cases.json, or {\"cases\": [...]})")
    p.add_argument("--images", required=True, metavar="DIR", help="folder of generated images")
    p.add_argument("--models", required=True, metavar="DIR",
                   help="evaluation models folder (ComfyUI/models/personalize_eval): "
                        f"{em.CLIP_FILE}, {em.DINO_FILE}, {OWL_FOLDER}/, {em.DREAMSIM_FOLDER}/ (or --embedder)")
    p.add_argument("--data-root", metavar="DIR", help="folder the benchmark's paths are relative to "
                                                      "(default: the JSON file's folder)")
    p.add_argument("--cases", metavar="A,B", help="evaluate only these cases (comma-separated names)")
    p.add_argument("--metrics", metavar="LIST",
                   help=f"comma-separated, from {','.join(METRICS)} (default: every metric whose models are present)")
    p.add_argument("--embedder", default=em.DREAMSIM_FOLDER,
                   help=f"D&C's embedder folder inside --models: {em.DREAMSIM_FOLDER} (DreamSim's ensemble, the "
                        f"published metric; default) or a facebook/dinov2-base folder (D&C-DINO)")
    p.add_argument("--clip-arch", default=em.CLIP_ARCH, help=f"open_clip architecture of the CLIP file "
                                                             f"(default {em.CLIP_ARCH})")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help=f"detector score threshold for D&C where a case sets none (default {DEFAULT_THRESHOLD})")
    p.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda, cuda:1, ...")
    p.add_argument("--out", metavar="FILE", help=f"CSV file (default <images>/{DEFAULT_CSV_NAME})")
    p.add_argument("--summary", metavar="FILE", help="also write the summary table to this markdown file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (one line per case instead)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an unexpected error")
    return p


def _check_device(device: str) -> None:
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available here")


def _inputs(benchmark, cases, found: dict, models_dir: Path) -> dict:
    """Every file this evaluation reads, with what it is: the outputs must not be one of them."""
    files = {Path(p): f"a generated image of case {name}" for name, paths in found.items() for p in paths}
    for case in cases:
        for s in case.subjects:
            files.update({Path(p): f"a reference image of subject {s.name}" for p in s.reference_paths})
    files.update({p: "a file of the --models folder" for p in models_dir.rglob("*") if p.is_file()})
    files[Path(benchmark)] = "the benchmark description"
    return files


def run(a, stdout=None, stderr=None) -> Evaluation:
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    images_dir = Path(a.images)
    if not images_dir.is_dir():
        raise UsageError(f"--images {images_dir} is not a folder")
    models_dir = Path(a.models)
    if not models_dir.is_dir():
        raise UsageError(f"--models {models_dir} is not a folder")
    if not math.isfinite(a.threshold) or not 0.0 <= a.threshold <= 1.0:
        raise UsageError(f"--threshold must be from 0 to 1, got {a.threshold}")
    _check_device(a.device)
    metrics = parse_metrics(a.metrics)
    out = Path(a.out) if a.out else images_dir / DEFAULT_CSV_NAME
    check_output(out, "--out")
    if a.summary:
        check_output(Path(a.summary), "--summary")
    cases = load_cases(a.benchmark, a.data_root)
    selected = select_cases(cases, a.cases)
    # images first: a wrong folder should not wait for the models to load
    found = discover_images(images_dir, selected, [c.name for c in cases])
    if not any(found.values()):
        raise no_images_error(selected, images_dir)
    outputs = {"--out": out, **({"--summary": Path(a.summary)} if a.summary else {})}
    check_outputs_apart(outputs, _inputs(a.benchmark, selected, found, models_dir))
    scorers = load_scorers(models_dir, metrics, a.clip_arch, a.device, a.embedder)
    total = sum(len(v) for v in found.values())
    mode = "bar" if not a.no_progress and hasattr(stderr, "isatty") and stderr.isatty() else "lines"
    progress = Progress(total, stderr, mode)
    try:
        ev = evaluate(selected, images_dir, scorers, a.threshold, progress, [c.name for c in cases])
    finally:
        progress.close()
    write_csv(out, ev.rows)
    text = format_summary(ev)
    if a.summary:
        atomic_write_text(a.summary, text)
    stdout.write(text)
    stdout.write(f"\n{len(ev.rows)} images scored; CSV: {out}\n")
    stdout.flush()
    return ev


def main(argv=None) -> int:
    """The command line (see ``build_parser``); returns the exit status. ``overfitting ...`` as the
    first argument runs Infusion's overfitting metrics instead (``metrics/overfitting_cli.main``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "overfitting":
        return overfitting_cli.main(argv[1:])
    return run_cli(build_parser(), run, argv, (UsageError,), (EvaluationError, em.EvalModelError))
