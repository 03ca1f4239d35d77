"""Scoring a folder of generated images against a benchmark description: CLIP-T, CLIP-I, DINO and
MuDI's Detect-and-Compare per image, written to a CSV, with a per-case summary table
(docs/metrics.md §3.1-3.2). Pure torch / PIL / stdlib; no ComfyUI import. The command line is
``tools/evaluate.py`` (``metrics/cli.py``).

The cases and their generated images: ``metrics/cases.py``.

Per generated image ``g`` of a case with subjects ``s = 1..S`` (``R_s``: subject s's reference images):

* CLIP-T (cases with a prompt): ``2.5 * max(0, cos(E_img(g), E_txt(prompt)))``.
* CLIP-I: ``(1/S) * sum_s mean_{r in R_s} cos(E_img(g), E_img(r))`` with CLIP image embeddings: each
  subject's mean cosine against its own references, averaged over the subjects with equal weight
  (whatever the number of references of each). For one subject this is the papers' CLIP-I; for two it
  is MIP-Adapter's average of the per-concept scores. A case's mean over its images equals the mean
  over subjects of the paper's pairwise CLIP-I over all (generated, reference) pairs of that subject.
* DINO: the same with DINO ViT-S/16 CLS embeddings.
* D&C: ``metrics.detect_compare.score_image`` with the subjects' queries, each subject's references
  embedded once per case, the case's threshold (else the global one, 0.4 by default as in MuDI's demo);
  ``boxes`` is the number of detections (D&C is 0 unless it equals the number of subjects).

A case's number is the mean over its images; the overall row is the mean over all images (so it
weights cases by their image counts, like the CSV's column means).
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..files.atomic import atomic_write_text
from . import models as em
from .cases import Subject, discover_images, load_image, no_images_error, unmatched_entries
from .detect_compare import score_image
from .embedders import load_embedder
from .errors import EvaluationError, UsageError
from .owl import OWL_FOLDER, load_owlv2, owl_hint
from .scores import clip_t, pairwise_mean_cosine

METRICS = ("clip_t", "clip_i", "dino", "dnc")
CSV_COLUMNS = ("case", "image", "subjects", "clip_t", "clip_i", "dino", "dnc", "boxes")
DEFAULT_THRESHOLD = 0.4
DEFAULT_CSV_NAME = "personalize_eval.csv"


# ------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------

@dataclass
class Scorers:
    """The loaded evaluation models (any may be None) and the metrics wanted. A metric is computed
    when it is in ``metrics`` and its models are here; ``reasons`` says why a model is absent."""
    clip: object = None          # metrics.models.ClipModel
    dino: object = None          # metrics.models.DinoViT
    detector: object = None      # .detect(image [H,W,3], queries, threshold) -> list[Detection]
    embedder: object = None      # .embed(list of [h,w,3] | [N,H,W,3]) -> [N, d]
    device: str = "cpu"
    metrics: tuple = METRICS
    reasons: dict = field(default_factory=dict)

    def _present(self, metric: str) -> bool:
        if metric in ("clip_t", "clip_i"):
            return self.clip is not None
        if metric == "dino":
            return self.dino is not None
        return self.detector is not None and self.embedder is not None

    def active(self) -> list:
        return [m for m in self.metrics if self._present(m)]

    def skipped(self) -> dict:
        """``{metric: reason}`` for the wanted metrics without their models."""
        default = {"clip_t": "no CLIP model", "clip_i": "no CLIP model", "dino": "no DINO model",
                   "dnc": "no detector and embedder"}
        return {m: self.reasons.get(m, default[m]) for m in self.metrics if not self._present(m)}


def parse_metrics(text) -> list | None:
    """``"clip_t,dino"`` -> ``["clip_t", "dino"]`` (None stays None: every metric with a model)."""
    if text is None:
        return None
    items = text.split(",") if isinstance(text, str) else list(text)
    out = []
    for m in (s.strip().lower() for s in items):
        if not m:
            continue
        if m not in METRICS:
            raise UsageError(f"--metrics: unknown metric {m!r} (choose from {', '.join(METRICS)})")
        if m not in out:
            out.append(m)
    if not out:
        raise UsageError(f"--metrics: no metric given (choose from {', '.join(METRICS)})")
    return out


def _moved(model, device):
    moved = model.to(device)
    return model if moved is None else moved


def load_scorers(models_dir, metrics=None, clip_arch: str = em.CLIP_ARCH, device: str = "cpu",
                 embedder: str = em.DREAMSIM_FOLDER) -> Scorers:
    """The models of ``metrics`` (None: every metric whose files are in ``models_dir``) loaded from
    ``models_dir``. A metric asked for explicitly whose file or code is missing is an
    ``EvaluationError`` saying what to put where; a metric left out by default gets a reason."""
    models_dir = Path(models_dir)
    explicit = metrics is not None
    wanted = tuple(parse_metrics(metrics) if explicit else METRICS)
    scorers = Scorers(device=device, metrics=wanted)
    hints = {}

    def unavailable(group, reason, hint, download=True):
        names = [m for m in wanted if m in group]
        if explicit:
            raise EvaluationError(f"--metrics {','.join(names)}: {reason}; {hint}")
        for m in names:
            scorers.reasons[m] = reason
            if download:
                hints[m] = hint

    if {"clip_t", "clip_i"} & set(wanted):
        path = next((models_dir / f for f in (em.CLIP_FILE, em.CLIP_SAFETENSORS_FILE)
                     if (models_dir / f).is_file()), None)
        if path is None:
            unavailable(("clip_t", "clip_i"), f"{em.CLIP_FILE} (or {em.CLIP_SAFETENSORS_FILE}) not in {models_dir}",
                        em.download_hint("clip"))
        else:
            try:
                em.import_open_clip()
            except ImportError as exc:
                unavailable(("clip_t", "clip_i"), str(exc), "or leave out clip_t and clip_i", download=False)
            else:
                clip = em.load_clip(path, clip_arch)
                clip.model = _moved(clip.model, device)
                scorers.clip = clip
    if "dino" in wanted:
        path = models_dir / em.DINO_FILE
        if not path.is_file():
            unavailable(("dino",), f"{em.DINO_FILE} not in {models_dir}", em.download_hint("dino"))
        else:
            scorers.dino = _moved(em.load_dino(path), device)
    if "dnc" in wanted:
        owl = models_dir / OWL_FOLDER
        sim = models_dir / embedder
        missing = [(p, hint) for p, hint in ((owl, owl_hint()),
                                             (sim, em.download_hint("dreamsim"))) if not p.is_dir()]
        if missing:
            what = " and ".join(p.name + "/" for p, _ in missing)
            unavailable(("dnc",), f"{what} not in {models_dir}", "; ".join(h for _, h in missing))
        else:
            try:
                detector = load_owlv2(str(owl))
                embedding_model = load_embedder(str(sim))
            except ImportError as exc:           # the code, or transformers, is not installed
                unavailable(("dnc",), f"the detector or embedder cannot be imported ({exc})",
                            "or leave out dnc", download=False)
            else:
                scorers.detector = _moved(detector, device)
                scorers.embedder = _moved(embedding_model, device)
    if not scorers.active():
        where = "; ".join(dict.fromkeys(hints.values()))
        raise EvaluationError(f"no metric can be computed: {_grouped(scorers.skipped())}"
                              + (f". Where to get them: {where}" if where else ""))
    return scorers


def _grouped(reasons: dict) -> str:
    """``clip_t, clip_i: reason; dino: reason`` (metrics with the same reason together)."""
    by_reason: dict = {}
    for m, r in reasons.items():
        by_reason.setdefault(r, []).append(m)
    return "; ".join(f"{', '.join(ms)}: {r}" for r, ms in by_reason.items())


class _CpuEmbedder:
    """Embeddings back on the CPU in float32, whatever device the embedder runs on (the D&C matrices
    are built on the CPU)."""

    def __init__(self, inner):
        self.inner = inner

    def embed(self, images) -> torch.Tensor:
        return torch.as_tensor(self.inner.embed(images)).detach().float().cpu()


# ------------------------------------------------------------------------------------------------
# evaluation
# ------------------------------------------------------------------------------------------------

@dataclass
class ImageResult:
    case: str
    image: str                   # relative to the images folder, with /
    subjects: str                # subject names joined with +
    clip_t: float | None = None
    clip_i: float | None = None
    dino: float | None = None
    dnc: float | None = None
    boxes: int | None = None


@dataclass
class CaseSummary:
    case: str
    images: int
    means: dict                  # metric -> mean over the case's images (None where none has it)


@dataclass
class Evaluation:
    rows: list                   # ImageResult per image
    cases: list                  # CaseSummary per evaluated case
    overall: CaseSummary         # mean over every image
    metrics: list                # the metrics computed
    skipped: dict                # metric -> reason
    no_images: list              # selected cases without generated images
    unmatched: list              # entries of the images folder that belong to no case


class _Quiet:
    """The progress of an evaluation nobody watches."""
    total = 0

    def show(self, case: str) -> None:
        pass

    def advance(self, case: str, n: int = 1) -> None:
        pass

    def case_done(self, case: str, images: int) -> None:
        pass

    def close(self) -> None:
        pass


def _embed_each(fn, images: list) -> torch.Tensor:
    """``fn([N,H,W,3]) -> [N, d]`` over images of any sizes (consecutive equal sizes batched)."""
    out, i = [], 0
    while i < len(images):
        j = i + 1
        while j < len(images) and images[j].shape == images[i].shape:
            j += 1
        out.append(fn(torch.stack(images[i:j])))
        i = j
    return torch.cat(out)


class _Cache:
    """Reference embeddings, shared by every case that uses the same files; the decoded images are
    kept only while a case's embeddings are computed (``release``)."""

    def __init__(self, scorers: Scorers, embedder):
        self.scorers, self.embedder = scorers, embedder
        self.images, self.clip, self.dino, self.sim = {}, {}, {}, {}

    def image(self, path) -> torch.Tensor:
        key = str(path)
        if key not in self.images:
            self.images[key] = load_image(path)
        return self.images[key]

    def _per_file(self, store: dict, fn, paths) -> torch.Tensor:
        todo = [str(p) for p in paths if str(p) not in store]
        if todo:
            for key, e in zip(todo, _embed_each(fn, [self.image(p) for p in todo])):
                store[key] = e
        return torch.stack([store[str(p)] for p in paths])

    def clip_refs(self, subject: Subject) -> torch.Tensor:
        s = self.scorers
        return self._per_file(self.clip, lambda x: em.clip_image_embeds(s.clip, x, s.device), subject.reference_paths)

    def dino_refs(self, subject: Subject) -> torch.Tensor:
        s = self.scorers
        return self._per_file(self.dino, lambda x: em.dino_embeds(s.dino, x, s.device), subject.reference_paths)

    def sim_refs(self, subject: Subject) -> torch.Tensor:
        key = tuple(str(p) for p in subject.reference_paths)
        if key not in self.sim:
            self.sim[key] = self.embedder.embed([self.image(p) for p in subject.reference_paths])
        return self.sim[key]

    def release(self) -> None:
        self.images.clear()


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _summarize(name: str, rows: list, metrics) -> CaseSummary:
    return CaseSummary(name, len(rows), {m: _mean(getattr(r, m) for r in rows) for m in metrics})


@torch.no_grad()
def evaluate(cases: list, images_dir, scorers: Scorers, threshold: float = DEFAULT_THRESHOLD,
             progress=None, known_names=None) -> Evaluation:
    """Scores every generated image of ``cases`` found in ``images_dir`` (``discover_images``; a
    file fitting a case of ``known_names`` that is not selected is not taken) with the models of
    ``scorers``. ``progress``: a printer with ``show``/``advance``/``case_done``/``close`` (the command
    line's ``common_cli.Progress``; None shows nothing). Raises ``EvaluationError`` when no case has an
    image or no metric can run."""
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise UsageError(f"--images {images_dir} is not a folder")
    names = [c.name for c in cases] + list(known_names or ())
    found = discover_images(images_dir, cases, names)
    todo = [c for c in cases if found[c.name]]
    no_images = [c.name for c in cases if not found[c.name]]
    if not todo:
        raise no_images_error(cases, images_dir)
    metrics = scorers.active()
    skipped = scorers.skipped()
    if not metrics:
        raise EvaluationError(f"no metric can be computed: {_grouped(skipped)}")
    total = sum(len(found[c.name]) for c in todo)
    progress = progress or _Quiet()
    progress.total = total
    embedder = _CpuEmbedder(scorers.embedder) if "dnc" in metrics else None
    cache = _Cache(scorers, embedder)
    dev = scorers.device
    rows = []
    for case in todo:
        progress.show(case.name)
        subjects = "+".join(s.name for s in case.subjects)
        case_threshold = case.threshold if case.threshold is not None else threshold
        text = None
        if "clip_t" in metrics and case.prompt is not None:
            text = em.clip_text_embeds(scorers.clip, [case.prompt], dev)
        refs = {}
        try:
            if "clip_i" in metrics:
                refs["clip_i"] = [cache.clip_refs(s) for s in case.subjects]
            if "dino" in metrics:
                refs["dino"] = [cache.dino_refs(s) for s in case.subjects]
            if "dnc" in metrics:
                refs["dnc"] = [cache.sim_refs(s) for s in case.subjects]
        except EvaluationError:
            raise
        except Exception as exc:
            raise EvaluationError(f"case {case.name}: embedding the references failed: "
                                  f"{type(exc).__name__}: {exc}") from exc
        finally:
            cache.release()
        queries = [s.query for s in case.subjects]
        for path in found[case.name]:
            rel = path.relative_to(images_dir).as_posix()
            image = load_image(path)
            row = ImageResult(case.name, rel, subjects)
            try:
                if "clip_t" in metrics or "clip_i" in metrics:
                    g = em.clip_image_embeds(scorers.clip, image[None], dev)
                    if text is not None:
                        row.clip_t = float(clip_t(g, text)[0])
                    if "clip_i" in metrics:
                        row.clip_i = _mean(float(pairwise_mean_cosine(g, r)) for r in refs["clip_i"])
                if "dino" in metrics:
                    g = em.dino_embeds(scorers.dino, image[None], dev)
                    row.dino = _mean(float(pairwise_mean_cosine(g, r)) for r in refs["dino"])
                if "dnc" in metrics:
                    result, detections = score_image(image, queries, refs["dnc"], scorers.detector, embedder,
                                                     case_threshold)
                    row.dnc, row.boxes = float(result.score), len(detections)
            except Exception as exc:
                raise EvaluationError(f"{rel} (case {case.name}): {type(exc).__name__}: {exc}") from exc
            rows.append(row)
            progress.advance(case.name)
        progress.case_done(case.name, len(found[case.name]))
    progress.close()
    summaries = [_summarize(c.name, [r for r in rows if r.case == c.name], metrics) for c in todo]
    return Evaluation(rows, summaries, _summarize("all images", rows, metrics), metrics, skipped, no_images,
                      unmatched_entries(images_dir, names))


# ------------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------------

def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6f}"
    return str(value)


def csv_text(rows: list) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in rows:
        w.writerow([_cell(getattr(r, c)) for c in CSV_COLUMNS])
    return buf.getvalue()


def write_csv(path, rows: list) -> None:
    """The CSV of ``rows`` written atomically (the replaced file's permissions kept)."""
    atomic_write_text(path, csv_text(rows))


def format_summary(ev: Evaluation) -> str:
    """The summary as a markdown table (readable as plain text): per case the image count and the
    mean of each computed metric, then the overall row; the skipped metrics and cases below."""
    header = ["case", "images"] + list(ev.metrics)

    def cells(s: CaseSummary, bold=False):
        vals = ["-" if s.means[m] is None else f"{s.means[m]:.4f}" for m in ev.metrics]
        name = f"**{s.case}**" if bold else s.case
        return [name, str(s.images)] + vals

    body = [cells(s) for s in ev.cases] + [cells(ev.overall, bold=True)]
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]

    def line(r):
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |"

    out = [line(header), "|" + "|".join(("-" * (w + 1) + ":" if i else ":" + "-" * (w + 1))
                                        for i, w in enumerate(widths)) + "|"]
    out += [line(r) for r in body]
    notes = [f"- {m}: skipped: {r}" for m, r in ev.skipped.items()]
    if ev.no_images:
        notes.append(f"- no images ({len(ev.no_images)} case{'s' if len(ev.no_images) != 1 else ''}): "
                     + ", ".join(ev.no_images))
    if ev.unmatched:
        shown = ", ".join(ev.unmatched[:5]) + (", ..." if len(ev.unmatched) > 5 else "")
        many = len(ev.unmatched) != 1
        notes.append(f"- {len(ev.unmatched)} entr{'ies' if many else 'y'} of the images folder "
                     f"match{'' if many else 'es'} no case name (ignored): {shown}")
    if notes:
        out += ["", "Not evaluated:" if ev.skipped or ev.no_images else "Notes:"] + notes
    return "\n".join(out) + "\n"


__all__ = ["METRICS", "CSV_COLUMNS", "DEFAULT_THRESHOLD", "DEFAULT_CSV_NAME", "Scorers", "Evaluation", "ImageResult",
           "CaseSummary", "parse_metrics", "load_scorers", "evaluate", "csv_text", "write_csv", "format_summary"]
