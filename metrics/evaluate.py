"""Scoring a folder of generated images against a benchmark description: CLIP-T, CLIP-I, DINO and
MuDI's Detect-and-Compare per image, written to a CSV, with a per-case summary table
(docs/metrics.md §3.1-3.2). Pure torch / PIL / stdlib; no ComfyUI import. The command line is
``tools/evaluate.py`` (``main`` below).

Benchmark description: a JSON file in the format of the project's ``cases.json`` (its keys
``dreambench_subjects``, ``multi_reference_cases`` with ``masked_references``,
``detect_and_compare_demo``, ``mip_adapter_combinations``, ``mudi_pairs_using_dreambench``) and/or a
``cases`` list written by the user::

    {"cases": [{"name": "cat_and_dog", "prompt": "a cat and a dog on a sofa", "threshold": 0.4,
                "subjects": [{"name": "cat", "query": "cat", "images": ["refs/cat"]},
                             {"name": "dog", "images": ["refs/dog/00.jpg", "refs/dog/01.jpg"]}]}]}

Paths are relative to the JSON file's folder (or ``data_root``); a folder stands for its
.png/.jpg/.jpeg/.webp files whose names do not contain "mask", sorted. ``prompt`` and ``threshold`` are
optional; a subject's ``query`` (the detector's text query) defaults to its ``name``. Cases come in
the order of the file's keys.

Generated images of a case named ``N``: the images in ``<images>/N/`` and the files ``<images>/N.png``
and ``<images>/N_*.png`` (also .jpg, .jpeg, .webp); a file whose name fits several cases (``cat_1.png``
and ``cat_and_dog_1.png`` with cases ``cat`` and ``cat_and_dog``) belongs to the longest case name.

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

import argparse
import csv
import io
import json
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import models as em
from .detect_compare import score_image
from .owl import OWL_FOLDER, load_owlv2, owl_hint
from .scores import clip_t, pairwise_mean_cosine

METRICS = ("clip_t", "clip_i", "dino", "dnc")
CSV_COLUMNS = ("case", "image", "subjects", "clip_t", "clip_i", "dino", "dnc", "boxes")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
DEFAULT_THRESHOLD = 0.4
DEFAULT_CSV_NAME = "personalize_eval.csv"
CASE_KEYS = ("multi_reference_cases", "mip_adapter_combinations", "mudi_pairs_using_dreambench",
             "detect_and_compare_demo", "dreambench_subjects", "cases")
class EvaluationError(Exception):
    """An evaluation that cannot run or finish (a bad benchmark file, a missing model, no images);
    the message says why. Exit status 1."""


class UsageError(EvaluationError):
    """A bad command-line argument (exit status 2)."""


# ------------------------------------------------------------------------------------------------
# benchmark description
# ------------------------------------------------------------------------------------------------

@dataclass
class Subject:
    name: str
    query: str
    reference_paths: list


@dataclass
class Case:
    name: str
    prompt: str | None
    subjects: list
    threshold: float | None = None


_ARTICLE = re.compile(r"^(a|an|the)\s+", re.IGNORECASE)


def strip_article(text: str) -> str:
    """"a cat" -> "cat" (a leading a / an / the removed)."""
    return _ARTICLE.sub("", text.strip()).strip()


def _is_image_file(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()


def folder_references(folder: Path) -> list:
    """The reference images of a folder: .png/.jpg/.jpeg/.webp whose name has no "mask", sorted."""
    return sorted(p for p in folder.iterdir() if _is_image_file(p) and "mask" not in p.name.lower())


def _expect(value, typ, where: str, what: str):
    if typ is str and not (isinstance(value, str) and value.strip()):
        raise EvaluationError(f"{where}: {what} must be a non-empty string, got {value!r}")
    if typ is list and not isinstance(value, list):
        raise EvaluationError(f"{where}: {what} must be a list, got {type(value).__name__}")
    if typ is dict and not isinstance(value, dict):
        raise EvaluationError(f"{where}: {what} must be an object, got {type(value).__name__}")
    return value


def _threshold(value, where: str):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise EvaluationError(f"{where}: threshold must be a number from 0 to 1, got {value!r}")
    return float(value)


def _ref_paths(entries, root: Path, where: str) -> list:
    """Files and folders (expanded) relative to ``root``."""
    if isinstance(entries, str):
        entries = [entries]
    _expect(entries, list, where, "images")
    out = []
    for e in entries:
        _expect(e, str, where, "each image path")
        p = root / e
        if p.is_dir():
            found = folder_references(p)
            if not found:
                raise EvaluationError(f"{where}: folder {p} has no .png/.jpg/.jpeg/.webp reference images")
            out += found
        else:
            out.append(p)
    return out


def _multi_reference_cases(obj, root):
    masked = _expect(obj.get("masked_references"), list, "multi_reference_cases",
                     "the masked_references list they index")
    cases = []
    for i, entry in enumerate(_expect(obj["multi_reference_cases"], list, "multi_reference_cases", "the value")):
        where = f"multi_reference_cases[{i}]"
        _expect(entry, dict, where, "each entry")
        name = _expect(entry.get("name"), str, where, "name")
        subjects = []
        for r in _expect(entry.get("refs"), list, f"case {name}", "refs"):
            if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < len(masked):
                raise EvaluationError(f"case {name}: ref {r!r} is not an index into masked_references "
                                      f"(0..{len(masked) - 1})")
            ref = _expect(masked[r], dict, f"masked_references[{r}]", "each entry")
            concept = strip_article(_expect(ref.get("concept"), str, f"masked_references[{r}]", "concept"))
            image = _expect(ref.get("image"), str, f"masked_references[{r}]", "image")
            subjects.append(Subject(concept, concept, [root / image]))
        prompt = entry.get("target_prompt")
        cases.append(Case(name, _expect(prompt, str, f"case {name}", "target_prompt") if prompt is not None else None,
                          subjects))
    return cases


def _mip_cases(obj, root):
    cases = []
    for i, entry in enumerate(_expect(obj["mip_adapter_combinations"], list, "mip_adapter_combinations", "the value")):
        name = f"mip_combination_{i + 1}"
        _expect(entry, dict, name, "each entry")
        images = _expect(entry.get("images"), list, f"case {name}", "images")
        entities = _expect(entry.get("entities"), list, f"case {name}", "entities")
        if len(images) != len(entities):
            raise EvaluationError(f"case {name}: {len(images)} images for {len(entities)} entities")
        prompt = entry.get("prompt")
        subjects = [Subject(_expect(q, str, f"case {name}", "each entity"), q,
                            _ref_paths(img, root, f"case {name}")) for img, q in zip(images, entities)]
        cases.append(Case(name, _expect(prompt, str, f"case {name}", "prompt") if prompt is not None else None,
                          subjects))
    return cases


def _dreambench(obj) -> dict:
    return _expect(obj.get("dreambench_subjects"), dict, "dreambench_subjects", "the value")


def _dreambench_subject(obj, root, sid: str, where: str) -> Subject:
    bench = _dreambench(obj)
    if sid not in bench:
        raise EvaluationError(f"{where}: {sid!r} is not in dreambench_subjects ({', '.join(bench)})")
    entry = _expect(bench[sid], dict, f"dreambench_subjects.{sid}", "the value")
    query = _expect(entry.get("class"), str, f"dreambench_subjects.{sid}", "class")
    return Subject(sid, query, _ref_paths(entry.get("images"), root, f"dreambench_subjects.{sid}"))


def _mudi_cases(obj, root):
    section = obj["mudi_pairs_using_dreambench"]
    pairs = section.get("pairs") if isinstance(section, dict) else section
    cases = []
    for i, pair in enumerate(_expect(pairs, list, "mudi_pairs_using_dreambench", "pairs")):
        where = f"mudi_pairs_using_dreambench.pairs[{i}]"
        if not isinstance(pair, list) or len(pair) < 1 or not all(isinstance(s, str) for s in pair):
            raise EvaluationError(f"{where}: expected a list of dreambench_subjects ids, got {pair!r}")
        name = "mudi_" + "_".join(pair)
        cases.append(Case(name, None, [_dreambench_subject(obj, root, s, f"case {name}") for s in pair]))
    return cases


def _demo_case(obj, root):
    demo = _expect(obj["detect_and_compare_demo"], dict, "detect_and_compare_demo", "the value")
    name = "detect_and_compare_demo"
    queries = _expect(demo.get("query_name"), list, name, "query_name")
    folders = _expect(demo.get("query_path"), list, name, "query_path")
    if len(queries) != len(folders):
        raise EvaluationError(f"{name}: {len(queries)} query names for {len(folders)} query paths")
    subjects = []
    for q, f in zip(queries, folders):
        _expect(q, str, name, "each query name")
        folder = root / _expect(f, str, name, "each query path")
        if not folder.is_dir():
            raise EvaluationError(f"case {name}: reference folder {folder} does not exist")
        refs = folder_references(folder)
        if not refs:
            raise EvaluationError(f"case {name}: reference folder {folder} has no .png/.jpg reference images")
        subjects.append(Subject(folder.name, q, refs))
    return [Case(name, None, subjects, _threshold(demo.get("owl_threshold"), name))]


def _dreambench_cases(obj, root):
    return [Case(f"dreambench_{sid}", None, [_dreambench_subject(obj, root, sid, f"case dreambench_{sid}")])
            for sid in _dreambench(obj)]


def _generic_cases(obj, root):
    cases = []
    for i, entry in enumerate(_expect(obj["cases"], list, "cases", "the value")):
        _expect(entry, dict, f"cases[{i}]", "each case")
        name = _expect(entry.get("name"), str, f"cases[{i}]", "name")
        where = f"case {name}"
        prompt = entry.get("prompt")
        if prompt is not None:
            _expect(prompt, str, where, "prompt")
        subjects = []
        for j, s in enumerate(_expect(entry.get("subjects"), list, where, "subjects")):
            _expect(s, dict, f"{where}, subject {j + 1}", "each subject")
            sname = _expect(s.get("name"), str, f"{where}, subject {j + 1}", "name")
            query = s.get("query", sname)
            _expect(query, str, f"{where}, subject {sname}", "query")
            if "images" not in s:
                raise EvaluationError(f"{where}, subject {sname}: no images (a list of reference files or folders)")
            subjects.append(Subject(sname, query, _ref_paths(s["images"], root, f"{where}, subject {sname}")))
        cases.append(Case(name, prompt, subjects, _threshold(entry.get("threshold"), where)))
    return cases


_PARSERS = {"multi_reference_cases": _multi_reference_cases, "mip_adapter_combinations": _mip_cases,
            "mudi_pairs_using_dreambench": _mudi_cases, "detect_and_compare_demo": _demo_case,
            "dreambench_subjects": _dreambench_cases, "cases": _generic_cases}


def validate_cases(cases: list) -> None:
    """Case names usable as file names and unique, at least one subject each, every reference file
    present."""
    seen = set()
    for case in cases:
        if not case.name or re.search(r"[/\\]", case.name) or case.name.startswith("."):
            raise EvaluationError(f"case {case.name!r}: a case name is used as a folder name and may not be empty, "
                                  f"contain / or \\, or start with a dot")
        if case.name in seen:
            raise EvaluationError(f"case {case.name}: the name appears twice (case names must be unique)")
        seen.add(case.name)
        if not case.subjects:
            raise EvaluationError(f"case {case.name}: the subject list is empty")
        for s in case.subjects:
            if not s.reference_paths:
                raise EvaluationError(f"case {case.name}, subject {s.name}: no reference images")
            for p in s.reference_paths:
                if not Path(p).is_file():
                    raise EvaluationError(f"case {case.name}, subject {s.name}: reference image {p} does not exist")


def parse_cases(obj, root, source: str = "benchmark") -> list:
    """The cases of a benchmark description (a parsed JSON object); paths relative to ``root``."""
    root = Path(root)
    if not isinstance(obj, dict):
        raise EvaluationError(f"{source}: expected a JSON object with one of the keys {', '.join(CASE_KEYS)}, "
                              f"got a {type(obj).__name__}")
    present = [k for k in obj if k in _PARSERS]
    if not present:
        keys = ", ".join(map(str, obj)) or "none"
        raise EvaluationError(f"{source} has none of the keys this tool reads ({', '.join(CASE_KEYS)}); "
                              f"its keys: {keys}")
    cases = []
    for key in present:
        cases += _PARSERS[key](obj, root)
    if not cases:
        raise EvaluationError(f"{source}: {', '.join(present)} hold no cases")
    validate_cases(cases)
    return cases


def load_cases(path, data_root=None) -> list:
    """The cases of a benchmark JSON file (paths relative to its folder, or to ``data_root``)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"benchmark file {path} does not exist")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EvaluationError(f"{path} is not a JSON file: {exc}") from None
    if data_root is not None and not Path(data_root).is_dir():
        raise UsageError(f"--data-root {data_root} is not a folder")
    return parse_cases(obj, Path(data_root) if data_root is not None else path.parent, path.name)


def select_cases(cases: list, names) -> list:
    """The cases named in ``names`` ("a,b" or a list), in the benchmark's order."""
    if names is None:
        return list(cases)
    if isinstance(names, str):
        names = names.split(",")
    wanted = [n.strip() for n in names if n.strip()]
    if not wanted:
        raise UsageError("--cases: no case names given")
    known = {c.name for c in cases}
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise UsageError(f"--cases: {', '.join(unknown)} not in the benchmark (its cases: "
                         f"{', '.join(c.name for c in cases)})")
    return [c for c in cases if c.name in set(wanted)]


# ------------------------------------------------------------------------------------------------
# generated images
# ------------------------------------------------------------------------------------------------

def _owner(stem: str, names) -> str | None:
    best = None
    for n in names:
        if (stem == n or stem.startswith(n + "_")) and (best is None or len(n) > len(best)):
            best = n
    return best


def discover_images(images_dir, cases: list, known_names=None) -> dict:
    """``{case name: [image paths]}``: ``images_dir/<name>/*`` (sorted), then ``images_dir/<name>.*``
    and ``images_dir/<name>_*`` (sorted; a file goes to the longest case name it fits among the cases
    and ``known_names``)."""
    images_dir = Path(images_dir)
    names = {c.name for c in cases} | set(known_names or ())
    found = {c.name: [] for c in cases}
    for c in cases:
        sub = images_dir / c.name
        if sub.is_dir():
            found[c.name] += sorted(p for p in sub.iterdir() if _is_image_file(p))
    for p in sorted(images_dir.iterdir()):
        if _is_image_file(p):
            owner = _owner(p.stem, names)
            if owner in found:
                found[owner].append(p)
    return found


def unmatched_entries(images_dir, known_names) -> list:
    """Top-level image files and folders of ``images_dir`` that belong to no case name."""
    images_dir = Path(images_dir)
    names = set(known_names)
    out = []
    for p in sorted(images_dir.iterdir()):
        if p.is_dir() and p.name not in names and any(_is_image_file(q) for q in p.iterdir()):
            out.append(p.name + "/")
        elif _is_image_file(p) and _owner(p.stem, names) is None:
            out.append(p.name)
    return out


def load_image(path) -> torch.Tensor:
    """An image file as ``[H, W, 3]`` float32 in 0..1 (RGB; alpha dropped)."""
    import numpy as np
    from PIL import Image
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    except (OSError, ValueError) as exc:
        raise EvaluationError(f"{path} cannot be read as an image: {exc}") from None
    return torch.from_numpy(arr.copy())


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
                from .embedders import load_embedder
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


def _fmt_time(seconds: float) -> str:
    s = max(0, int(round(seconds)))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """``[#####.....] 12/40 images  case_name  ETA 0:31`` redrawn on one line (``mode="bar"``), one
    line per finished case (``"lines"``) or nothing (``"off"``)."""

    def __init__(self, total: int, stream=None, mode: str = "bar", width: int = 20, clock=time.monotonic):
        self.total, self.stream, self.mode, self.width, self.clock = total, stream, mode, width, clock
        self.done = 0
        self.start = clock()
        self._drawn = False

    def line(self, case: str) -> str:
        filled = self.width * self.done // self.total if self.total else self.width
        elapsed = self.clock() - self.start
        eta = _fmt_time(elapsed / self.done * (self.total - self.done)) if self.done else "?"
        name = case if len(case) <= 32 else case[:29] + "..."
        return (f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} images  {name}  "
                f"ETA {eta}")

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def show(self, case: str) -> None:
        if self.mode == "bar":
            self._write("\r" + self.line(case) + "\x1b[K")
            self._drawn = True

    def advance(self, case: str, n: int = 1) -> None:
        self.done += n
        self.show(case)

    def case_done(self, case: str, images: int) -> None:
        if self.mode == "lines":
            self._write(f"{case}: {images} image{'s' if images != 1 else ''} ({self.done}/{self.total}, "
                        f"{_fmt_time(self.clock() - self.start)} elapsed)\n")

    def close(self) -> None:
        if self.mode == "bar" and self._drawn:
            self._write("\n")
            self._drawn = False


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


def _no_images_error(cases: list, images_dir: Path) -> EvaluationError:
    shown = ", ".join(c.name for c in cases[:8]) + (", ..." if len(cases) > 8 else "")
    return EvaluationError(f"no generated images for any of the {len(cases)} selected cases in {images_dir}: "
                           f"expected {images_dir}/<case>/*.png, {images_dir}/<case>.png or {images_dir}/<case>_*.png "
                           f"(.jpg, .jpeg, .webp too) for the cases {shown}")


@torch.no_grad()
def evaluate(cases: list, images_dir, scorers: Scorers, threshold: float = DEFAULT_THRESHOLD,
             progress: Progress | None = None, known_names=None) -> Evaluation:
    """Scores every generated image of ``cases`` found in ``images_dir`` (``discover_images``; a
    file fitting a case of ``known_names`` that is not selected is not taken) with the models of
    ``scorers``. Raises ``EvaluationError`` when no case has an image or no metric can run."""
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise UsageError(f"--images {images_dir} is not a folder")
    names = [c.name for c in cases] + list(known_names or ())
    found = discover_images(images_dir, cases, names)
    todo = [c for c in cases if found[c.name]]
    no_images = [c.name for c in cases if not found[c.name]]
    if not todo:
        raise _no_images_error(cases, images_dir)
    metrics = scorers.active()
    skipped = scorers.skipped()
    if not metrics:
        raise EvaluationError(f"no metric can be computed: {_grouped(skipped)}")
    total = sum(len(found[c.name]) for c in todo)
    progress = progress or Progress(total, mode="off")
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
        except Exception as exc:  # noqa: BLE001 - give the case; the message is the model's
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
            except Exception as exc:  # noqa: BLE001 - name the image; the message is the model's
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


def _file_mode(path: Path) -> int:
    """The permissions of the file being replaced, else those of a new file (0o666 less the umask);
    mkstemp's own 0o600 would hide the results from other users."""
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask


def write_atomic(path, text: str) -> None:
    """Writes ``text`` to a temporary file beside ``path``, then renames it over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.chmod(tmp, _file_mode(path))
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_csv(path, rows: list) -> None:
    write_atomic(path, csv_text(rows))


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


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------

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


def _check_output(path: Path, flag: str) -> None:
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a folder, not a file")
    if not path.parent.is_dir():
        raise UsageError(f"{flag} {path}: the folder {path.parent} does not exist")


def _check_device(device: str) -> None:
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available here")


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
    _check_output(out, "--out")
    if a.summary:
        _check_output(Path(a.summary), "--summary")
    cases = load_cases(a.benchmark, a.data_root)
    selected = select_cases(cases, a.cases)
    # images first: a wrong folder should not wait for the models to load
    found = discover_images(images_dir, selected, [c.name for c in cases])
    if not any(found.values()):
        raise _no_images_error(selected, images_dir)
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
        write_atomic(a.summary, text)
    stdout.write(text)
    stdout.write(f"\n{len(ev.rows)} images scored; CSV: {out}\n")
    stdout.flush()
    return ev


def main(argv=None) -> int:
    """The command line (see ``build_parser``); returns the exit status. ``overfitting ...`` as the
    first argument runs Infusion's overfitting metrics instead (``metrics/overfitting_comfy.main``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "overfitting":
        from .overfitting_comfy import main as overfitting_main
        return overfitting_main(argv[1:])
    return run_cli(build_parser(), run, argv, (UsageError,), (EvaluationError, em.EvalModelError))


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
    except Exception as exc:  # noqa: BLE001 - one clear line; --debug shows the traceback
        if getattr(a, "debug", False):
            raise
        msg = str(exc).strip().splitlines()
        print(f"error: {type(exc).__name__}: {msg[0] if msg else ''} (--debug shows the traceback)", file=sys.stderr)
        return 1
    return 0

__all__ = ["Case", "Subject", "Scorers", "Evaluation", "ImageResult", "CaseSummary", "Progress", "EvaluationError",
           "UsageError", "load_cases", "parse_cases", "select_cases", "discover_images", "load_scorers", "evaluate",
           "format_summary", "write_csv", "main"]
