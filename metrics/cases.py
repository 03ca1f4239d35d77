"""The benchmark description and the generated images the evaluation scores (``metrics/evaluate.py``,
``tools/evaluate.py``). Pure Python / PIL; no ComfyUI.

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
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import EvaluationError, UsageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
CASE_KEYS = ("multi_reference_cases", "mip_adapter_combinations", "mudi_pairs_using_dreambench",
             "detect_and_compare_demo", "dreambench_subjects", "cases")


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


def no_images_error(cases: list, images_dir: Path) -> EvaluationError:
    """The error for selected cases none of which has a generated image in ``images_dir`` (what was
    looked for, and the first case names)."""
    shown = ", ".join(c.name for c in cases[:8]) + (", ..." if len(cases) > 8 else "")
    return EvaluationError(f"no generated images for any of the {len(cases)} selected cases in {images_dir}: "
                           f"expected {images_dir}/<case>/*.png, {images_dir}/<case>.png or {images_dir}/<case>_*.png "
                           f"(.jpg, .jpeg, .webp too) for the cases {shown}")


__all__ = ["Case", "Subject", "IMAGE_SUFFIXES", "CASE_KEYS", "strip_article", "folder_references", "validate_cases",
           "parse_cases", "load_cases", "select_cases", "discover_images", "unmatched_entries", "load_image",
           "no_images_error"]
