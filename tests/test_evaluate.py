"""The evaluation command (metrics/evaluate.py, tools/evaluate.py): reading the project's cases.json and
a user's "cases" list, finding generated images, and an end-to-end run with tiny random DINO / CLIP
models and a stand-in detector and embedder, every CSV value checked against an independent
computation. The benchmark file and DreamBench photos come from the project's shared data folder
($PERSONALIZE_TEST_DATA, default /work/shared/data); the tests that need it skip without it."""
from __future__ import annotations

import csv
import dataclasses
import functools
import importlib.util
import io
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pack_paths import PACK_ROOT
from personalize_pack.metrics import evaluate as ev
from personalize_pack.metrics import models as em
from personalize_pack.metrics.detect_compare import Detection, detect_and_compare
from personalize_pack.metrics.scores import clip_preprocess, dino_preprocess
from tiny_scorers import OPEN_CLIP_ERROR, TINY_CLIP_ARCH, register_tiny_clip, save_tiny_clip

DATA = Path(os.environ.get("PERSONALIZE_TEST_DATA", "/work/shared/data"))
CASES_JSON = DATA / "cases.json"
needs_data = pytest.mark.skipif(not CASES_JSON.is_file(),
                                reason=f"{CASES_JSON} is not here (set PERSONALIZE_TEST_DATA to the shared data folder)")
needs_open_clip = pytest.mark.skipif(OPEN_CLIP_ERROR is not None,
                                     reason=f"open_clip cannot be imported ({OPEN_CLIP_ERROR}); pip install open_clip_torch")

DREAMBENCH_NAMES = ["dreambench_dog6", "dreambench_dog2", "dreambench_cat", "dreambench_cat2",
                    "dreambench_monster_toy", "dreambench_robot_toy", "dreambench_teapot", "dreambench_can",
                    "dreambench_red_cartoon"]
ALL_NAMES = DREAMBENCH_NAMES + ["cat_and_dog", "dog_and_teapot", "two_cats_and_dog", "detect_and_compare_demo",
                                "mip_combination_1", "mip_combination_2", "mip_combination_3",
                                "mudi_dog6_dog2", "mudi_can_monster_toy", "mudi_monster_toy_robot_toy"]


def by_name(cases):
    return {c.name: c for c in cases}


@functools.lru_cache(maxsize=None)
def read_image(path) -> torch.Tensor:
    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0)


def save_small(src, dst, size):
    dst.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(src) as im:
        im.convert("RGB").resize(size, Image.BICUBIC).save(dst)


def cos(a, b) -> float:
    return float(F.cosine_similarity(a.double(), b.double(), dim=0))


# ------------------------------------------------------------------------------------- cases.json

@needs_data
def test_shared_cases_json_names_and_order():
    cases = ev.load_cases(CASES_JSON)
    assert [c.name for c in cases] == ALL_NAMES        # the file's key order


@needs_data
def test_shared_cases_json_subjects_prompts_and_references():
    c = by_name(ev.load_cases(CASES_JSON))
    cat_and_dog = c["cat_and_dog"]
    assert cat_and_dog.prompt == "a cat and a dog sitting together on a sofa"
    assert cat_and_dog.threshold is None
    assert [(s.name, s.query) for s in cat_and_dog.subjects] == [("cat", "cat"), ("dog", "dog")]
    assert [s.reference_paths for s in cat_and_dog.subjects] == [[DATA / "dreambench/cat/04.jpg"],
                                                                [DATA / "dreambench/dog6/02.jpg"]]
    three = c["two_cats_and_dog"]
    assert [s.query for s in three.subjects] == ["cat", "cat", "dog"]
    assert [s.reference_paths[0] for s in three.subjects] == [DATA / "dreambench/cat/04.jpg",
                                                             DATA / "dreambench/cat2/02.jpg",
                                                             DATA / "dreambench/dog6/02.jpg"]
    assert c["dog_and_teapot"].subjects[1].reference_paths == [DATA / "dreambench/teapot/00.jpg"]

    demo = c["detect_and_compare_demo"]
    assert demo.prompt is None and demo.threshold == 0.4
    assert [s.query for s in demo.subjects] == ["monster toy", "robot toy"]
    assert [s.name for s in demo.subjects] == ["monster_toy", "robot_toy"]
    for s, folder in zip(demo.subjects, ["monster_toy", "robot_toy"]):
        assert s.reference_paths == [DATA / "dreambench" / folder / f"0{i}.jpg" for i in range(3)]

    mip = c["mip_combination_2"]
    assert mip.prompt == "A pet cat playing with dice on a sidewalk."
    assert [s.query for s in mip.subjects] == ["cat", "dice"]
    assert [s.reference_paths for s in mip.subjects] == [[DATA / "mip_adapter_combinations/combination_2/cat.jpg"],
                                                        [DATA / "mip_adapter_combinations/combination_2/dice.jpg"]]
    assert [s.query for s in c["mip_combination_3"].subjects] == ["barn", "dog"]

    mudi = c["mudi_dog6_dog2"]
    assert mudi.prompt is None
    assert [(s.name, s.query) for s in mudi.subjects] == [("dog6", "dog"), ("dog2", "dog")]
    assert mudi.subjects[1].reference_paths == [DATA / f"dreambench/dog2/0{i}.jpg" for i in (0, 3, 4)]
    assert [s.query for s in c["mudi_can_monster_toy"].subjects] == ["can", "toy"]

    cat2 = c["dreambench_cat2"]
    assert cat2.prompt is None and len(cat2.subjects) == 1
    assert (cat2.subjects[0].name, cat2.subjects[0].query) == ("cat2", "cat")
    assert cat2.subjects[0].reference_paths == [DATA / "dreambench/cat2/00.jpg", DATA / "dreambench/cat2/02.jpg"]


@needs_data
def test_data_root_moves_the_relative_paths(tmp_path):
    (tmp_path / "b.json").write_text('{"about": "ignored", "cases": [{"name": "x", '
                                     '"subjects": [{"name": "cat", "images": ["dreambench/cat"]}]}]}')
    with pytest.raises(ev.EvaluationError, match="dreambench/cat does not exist"):
        ev.load_cases(tmp_path / "b.json")              # relative to the JSON file's folder
    (case,) = ev.load_cases(tmp_path / "b.json", data_root=DATA)
    assert case.subjects[0].reference_paths == [DATA / f"dreambench/cat/0{i}.jpg" for i in (0, 3, 4)]


# ------------------------------------------------------------------------------ a "cases" list

def make_refs(root: Path):
    (root / "refs/dog").mkdir(parents=True)
    for name, colour in [("01.jpg", (200, 10, 10)), ("00.png", (10, 200, 10)), ("00_mask.png", (255, 255, 255)),
                         ("Mask-dog.jpg", (0, 0, 0))]:
        Image.new("RGB", (20, 16), colour).save(root / "refs/dog" / name)
    (root / "refs/dog/notes.txt").write_text("not an image")
    Image.new("RGB", (16, 16), (0, 0, 200)).save(root / "refs/cat.webp")


def test_generic_cases_file(tmp_path):
    make_refs(tmp_path)
    obj = {"about": "unknown keys are ignored",
           "cases": [{"name": "pets", "prompt": "a cat and a dog", "threshold": 0.25, "extra": 1,
                      "subjects": [{"name": "cat", "query": "tabby cat", "images": ["refs/cat.webp"]},
                                   {"name": "dog", "images": ["refs/dog"]}]},
                     {"name": "just_a_dog", "subjects": [{"name": "dog", "images": "refs/dog/01.jpg"}]}]}
    pets, dog = ev.parse_cases(obj, tmp_path)
    assert (pets.name, pets.prompt, pets.threshold) == ("pets", "a cat and a dog", 0.25)
    assert [(s.name, s.query) for s in pets.subjects] == [("cat", "tabby cat"), ("dog", "dog")]
    assert pets.subjects[0].reference_paths == [tmp_path / "refs/cat.webp"]
    # a folder: its images without "mask" in the name, sorted
    assert pets.subjects[1].reference_paths == [tmp_path / "refs/dog/00.png", tmp_path / "refs/dog/01.jpg"]
    assert (dog.prompt, dog.threshold) == (None, None)
    assert dog.subjects[0].reference_paths == [tmp_path / "refs/dog/01.jpg"]


@pytest.mark.parametrize("obj, message", [
    ({"cases": [{"name": "pets", "subjects": [{"name": "cat", "images": ["refs/cat.webp", "refs/missing.png"]}]}]},
     r"case pets, subject cat: reference image .*refs/missing.png does not exist"),
    ({"cases": [{"name": "pets", "subjects": [{"name": "cat", "images": ["refs/cat.webp"]}]},
                {"name": "pets", "subjects": [{"name": "dog", "images": ["refs/dog"]}]}]},
     r"case pets: the name appears twice"),
    ({"about": "x", "references": []},
     r"has none of the keys this tool reads \(multi_reference_cases, mip_adapter_combinations, "
     r"mudi_pairs_using_dreambench, detect_and_compare_demo, dreambench_subjects, cases\); its keys: about, references"),
    ({"cases": [{"name": "pets", "subjects": []}]}, r"case pets: the subject list is empty"),
    ({"cases": [{"name": "pets", "threshold": 2, "subjects": [{"name": "cat", "images": ["refs/cat.webp"]}]}]},
     r"case pets: threshold must be a number from 0 to 1"),
    ({"cases": [{"name": "a/b", "subjects": [{"name": "cat", "images": ["refs/cat.webp"]}]}]},
     r"may not be empty, contain /"),
    ({"cases": [{"name": "pets", "subjects": [{"name": "cat"}]}]}, r"case pets, subject cat: no images"),
    ({"cases": []}, r"cases hold no cases"),
    ({"dreambench_subjects": {"cat": {"class": "cat", "images": ["refs/cat.webp"]}},
      "mudi_pairs_using_dreambench": {"pairs": [["cat", "dog9"]]}},
     r"case mudi_cat_dog9: 'dog9' is not in dreambench_subjects"),
    ({"masked_references": [{"image": "refs/cat.webp", "concept": "a cat"}],
      "multi_reference_cases": [{"name": "m", "refs": [0, 1], "target_prompt": "p"}]},
     r"case m: ref 1 is not an index into masked_references"),
])
def test_benchmark_errors(tmp_path, obj, message):
    make_refs(tmp_path)
    with pytest.raises(ev.EvaluationError, match=message):
        ev.parse_cases(obj, tmp_path, "bench.json")


def test_load_cases_file_errors(tmp_path):
    with pytest.raises(ev.UsageError, match="nope.json does not exist"):
        ev.load_cases(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ev.EvaluationError, match="bad.json is not a JSON file"):
        ev.load_cases(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(ev.EvaluationError, match="list.json: expected a JSON object"):
        ev.load_cases(tmp_path / "list.json")


# ----------------------------------------------------------------------------- generated images

def case(name):
    return ev.Case(name, None, [ev.Subject("s", "s", [Path("unused.png")])])


def touch_image(path, size=(8, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (1, 2, 3)).save(path)


def test_discover_images_subfolders_prefixes_and_longest_name(tmp_path):
    for rel in ["cat_and_dog/b.png", "cat_and_dog/a.jpg", "cat_and_dog/c.JPEG", "cat_and_dog/x.webp",
                "cat_1.png", "cat.jpg", "cat_and_dog_7.png", "catalog.png", "dog2_0.png", "other/z.png"]:
        touch_image(tmp_path / rel)
    (tmp_path / "cat_and_dog/notes.txt").write_text("no")
    (tmp_path / "cat_2.txt").write_text("no")
    cases = [case("cat"), case("cat_and_dog"), case("dog")]
    found = ev.discover_images(tmp_path, cases)
    rel = {k: [p.relative_to(tmp_path).as_posix() for p in v] for k, v in found.items()}
    assert rel == {"cat": ["cat.jpg", "cat_1.png"],      # not cat_and_dog_7.png: the longer name wins
                   "cat_and_dog": ["cat_and_dog/a.jpg", "cat_and_dog/b.png", "cat_and_dog/c.JPEG",
                                   "cat_and_dog/x.webp", "cat_and_dog_7.png"],
                   "dog": []}                           # dog2_0.png is not dog's
    # a file of a case that is known but not selected stays with that case
    only_cat = ev.discover_images(tmp_path, [case("cat")], known_names=["cat_and_dog"])
    assert [p.name for p in only_cat["cat"]] == ["cat.jpg", "cat_1.png"]
    assert ev.unmatched_entries(tmp_path, ["cat", "cat_and_dog", "dog"]) == ["catalog.png", "dog2_0.png", "other/"]


def test_select_cases():
    cases = [case("a"), case("b"), case("c")]
    assert [c.name for c in ev.select_cases(cases, "c, a")] == ["a", "c"]      # benchmark order
    assert ev.select_cases(cases, None) == cases
    with pytest.raises(ev.UsageError, match=r"--cases: x, y not in the benchmark \(its cases: a, b, c\)"):
        ev.select_cases(cases, "a,x,y")
    with pytest.raises(ev.UsageError, match="no case names"):
        ev.select_cases(cases, " , ")


def test_no_images_for_any_selected_case(tmp_path):
    touch_image(tmp_path / "b_0.png")
    scorers = ev.Scorers(dino=object())
    with pytest.raises(ev.EvaluationError, match=r"no generated images for any of the 1 selected cases in .*<case>/\*.png"):
        ev.evaluate([case("a")], tmp_path, scorers, known_names=["a", "b"])


def test_progress_bar_lines_and_off():
    t = [100.0]
    out = io.StringIO()
    p = ev.Progress(40, out, "bar", width=10, clock=lambda: t[0])
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
    p = ev.Progress(3, out, "lines", clock=lambda: t[0])
    p.show("a")
    p.advance("a", 2)
    p.case_done("a", 2)
    p.advance("b")
    p.case_done("b", 1)
    p.close()
    assert out.getvalue() == "a: 2 images (2/3, 0:00 elapsed)\nb: 1 image (3/3, 0:00 elapsed)\n"
    out = io.StringIO()
    p = ev.Progress(3, out, "off")
    p.advance("a", 3)
    p.case_done("a", 3)
    p.close()
    assert out.getvalue() == ""


# ----------------------------------------------------------------------------- models and scorers

def tiny_dino(seed=0) -> em.DinoViT:
    torch.manual_seed(seed)
    m = em.DinoViT(em.DinoConfig(embed_dim=64, depth=1, heads=1, patch_size=16, image_size=32))
    with torch.no_grad():                       # spread the embeddings so the cosines differ
        for p in m.parameters():
            p.normal_(0, 0.1)
    return m.eval()


def test_load_scorers_defaults_explicit_and_missing(tmp_path):
    with pytest.raises(ev.EvaluationError, match=r"no metric can be computed: clip_t, clip_i: open_clip_pytorch_model.bin "
                                                 r".* not in .*; dino: dino_deitsmall16_pretrain.pth not in .*"
                                                 r"dnc: owlv2-base-patch16-ensemble/ and dreamsim/ not in .*Where to get"):
        ev.load_scorers(tmp_path)
    torch.save(tiny_dino().state_dict(), tmp_path / em.DINO_FILE)
    s = ev.load_scorers(tmp_path)
    assert s.dino is not None and s.clip is None and s.detector is None
    assert s.active() == ["dino"]
    assert s.skipped() == {"clip_t": f"{em.CLIP_FILE} (or {em.CLIP_SAFETENSORS_FILE}) not in {tmp_path}",
                           "clip_i": f"{em.CLIP_FILE} (or {em.CLIP_SAFETENSORS_FILE}) not in {tmp_path}",
                           "dnc": f"owlv2-base-patch16-ensemble/ and dreamsim/ not in {tmp_path}"}
    only = ev.load_scorers(tmp_path, "dino")
    assert only.metrics == ("dino",) and only.skipped() == {}
    with pytest.raises(ev.EvaluationError, match=r"--metrics clip_i: open_clip_pytorch_model.bin .*huggingface"):
        ev.load_scorers(tmp_path, ["dino", "clip_i"])
    (tmp_path / "dreamsim").mkdir()
    with pytest.raises(ev.EvaluationError, match=r"--metrics dnc: owlv2-base-patch16-ensemble/ not in .*google/owlv2"):
        ev.load_scorers(tmp_path, "dnc")
    with pytest.raises(ev.UsageError, match="unknown metric 'clipi'"):
        ev.load_scorers(tmp_path, "clipi")


def test_load_scorers_loads_the_detector_and_embedder_folders(tmp_path):
    """The real loaders on tiny random models in the release layouts: OWLv2 through transformers, and
    the embedder folder chosen by --embedder (DreamSim by default)."""
    pytest.importorskip("transformers")
    from tiny_dreamsim import build_tiny_dreamsim
    from tiny_owl import build_tiny_owlv2
    from personalize_pack.metrics.dreamsim import DreamSimEnsemble
    from personalize_pack.metrics.owl import OwlDetector
    build_tiny_dreamsim(tmp_path / "dreamsim")
    with pytest.raises(ev.EvaluationError, match=r"--metrics dnc: owlv2-base-patch16-ensemble/ not in .*; "
                                                 r"Download every file of https://huggingface.co/google/owlv2"):
        ev.load_scorers(tmp_path, "dnc")
    build_tiny_owlv2(tmp_path / "owlv2-base-patch16-ensemble")
    s = ev.load_scorers(tmp_path, "dnc")
    assert isinstance(s.detector, OwlDetector) and isinstance(s.embedder, DreamSimEnsemble)
    assert s.active() == ["dnc"] and s.skipped() == {}
    with pytest.raises(ev.EvaluationError, match=r"--metrics dnc: dinov2-base/ not in"):
        ev.load_scorers(tmp_path, "dnc", embedder="dinov2-base")


def test_load_scorers_missing_code_skips_by_default_and_fails_when_asked(tmp_path, monkeypatch):
    def no_transformers(folder):
        raise ImportError("The OWLv2 detector needs transformers: pip install transformers")
    monkeypatch.setattr(ev, "load_owlv2", no_transformers)
    (tmp_path / "dreamsim").mkdir()
    (tmp_path / "owlv2-base-patch16-ensemble").mkdir()
    torch.save(tiny_dino().state_dict(), tmp_path / em.DINO_FILE)
    torch.save({"visual.x": torch.zeros(1)}, tmp_path / em.CLIP_FILE)

    def no_open_clip():
        raise ImportError("the CLIP score needs open_clip (No module named 'open_clip'); pip install open_clip_torch")
    monkeypatch.setattr(em, "import_open_clip", no_open_clip)
    s = ev.load_scorers(tmp_path)
    assert s.active() == ["dino"]
    skipped = s.skipped()
    assert skipped["clip_t"] == skipped["clip_i"] == ("the CLIP score needs open_clip (No module named 'open_clip'); "
                                                      "pip install open_clip_torch")
    assert skipped["dnc"] == ("the detector or embedder cannot be imported (The OWLv2 detector needs transformers: "
                              "pip install transformers)")
    with pytest.raises(ev.EvaluationError, match=r"--metrics dnc: the detector or embedder cannot be imported .*transformers"):
        ev.load_scorers(tmp_path, "dino,dnc")
    with pytest.raises(ev.EvaluationError, match=r"--metrics clip_t: the CLIP score needs open_clip"):
        ev.load_scorers(tmp_path, "clip_t")


class StandInDetector:
    """Two boxes: the left and the right half of the image (integer pixels); records its calls."""

    def __init__(self, count=2):
        self.count, self.calls = count, []

    def detect(self, image, queries, threshold):
        self.calls.append((tuple(image.shape), list(queries), threshold))
        h, w, _ = image.shape
        boxes = [(0, 0, w // 2, h), (w // 2, 0, w, h), (0, 0, w, h // 2)][:self.count]
        return [Detection(b, 0.9, i % len(queries)) for i, b in enumerate(boxes)]

    def to(self, device):
        return self


class StandInEmbedder:
    """The mean colour and a fixed random projection of an 8x8 thumbnail."""

    def __init__(self):
        self.proj = torch.randn(3 * 8 * 8, 13, generator=torch.Generator().manual_seed(5))

    def embed(self, images):
        out = []
        for im in list(images):
            thumb = F.interpolate(im.permute(2, 0, 1)[None], size=(8, 8), mode="area")[0]
            out.append(torch.cat([im.mean(dim=(0, 1)), thumb.flatten() @ self.proj]))
        return torch.stack(out)

    def to(self, device):
        return self


def white_square(crop):
    h, w, c = crop.shape
    s = max(h, w)
    canvas = torch.ones(s, s, c)
    canvas[(s - h) // 2:(s - h) // 2 + h, (s - w) // 2:(s - w) // 2 + w] = crop
    return canvas


GENERATED = {   # generated image (relative to the images folder) -> DreamBench photo, size
    "cat_and_dog/0.png": ("dreambench/cat/00.jpg", (48, 40)),
    "cat_and_dog/1.png": ("dreambench/dog6/00.jpg", (40, 40)),
    "detect_and_compare_demo_0.png": ("dreambench/monster_toy/01.jpg", (44, 36)),
    "detect_and_compare_demo_1.jpg": ("dreambench/robot_toy/02.jpg", (36, 44)),
    "dreambench_teapot.png": ("dreambench/teapot/03.jpg", (36, 36)),
}
ROW_ORDER = ["dreambench_teapot.png", "cat_and_dog/0.png", "cat_and_dog/1.png", "detect_and_compare_demo_0.png",
             "detect_and_compare_demo_1.jpg"]          # the benchmark's case order, then the file order


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    if not CASES_JSON.is_file():
        pytest.skip(f"{CASES_JSON} is not here")
    root = tmp_path_factory.mktemp("evaluate")
    models = root / "models"
    models.mkdir()
    dino = tiny_dino()
    torch.save(dino.state_dict(), models / em.DINO_FILE)
    clip_model = None
    if OPEN_CLIP_ERROR is None:
        register_tiny_clip(root)
        clip_model = save_tiny_clip(models / em.CLIP_FILE)
    images = root / "images"
    for rel, (src, size) in GENERATED.items():
        save_small(DATA / src, images / rel, size)
    cases = ev.load_cases(CASES_JSON)
    scorers = ev.load_scorers(models, clip_arch=TINY_CLIP_ARCH)
    assert scorers.skipped()["dnc"] == f"owlv2-base-patch16-ensemble/ and dreamsim/ not in {models}"
    detector = StandInDetector()
    scorers = dataclasses.replace(scorers, detector=detector, embedder=StandInEmbedder())
    result = ev.evaluate(cases, images, scorers, threshold=0.3, known_names=[c.name for c in cases])
    out = root / "results.csv"
    ev.write_csv(out, result.rows)
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    return SimpleNamespace(root=root, models=models, images=images, dino=dino, clip=clip_model, cases=by_name(cases),
                           scorers=scorers, detector=detector, ev=result, csv_rows=rows, csv=out)


def subjects_of(b, name):
    return b.cases[name].subjects


def independent_subject_mean(embed, gen_image, subjects, cache: dict) -> float:
    g = embed(gen_image)
    per_subject = []
    for s in subjects:
        for p in s.reference_paths:
            if p not in cache:
                cache[p] = embed(read_image(p))
        sims = [cos(g, cache[p]) for p in s.reference_paths]
        per_subject.append(sum(sims) / len(sims))
    return sum(per_subject) / len(per_subject)


def test_end_to_end_rows_and_csv_layout(bench):
    assert [r["image"] for r in bench.csv_rows] == ROW_ORDER
    assert list(bench.csv_rows[0]) == list(ev.CSV_COLUMNS)
    assert [r["case"] for r in bench.csv_rows] == ["dreambench_teapot"] + ["cat_and_dog"] * 2 + \
        ["detect_and_compare_demo"] * 2
    assert [r["subjects"] for r in bench.csv_rows] == ["teapot", "cat+dog", "cat+dog", "monster_toy+robot_toy",
                                                       "monster_toy+robot_toy"]
    assert bench.ev.no_images == [n for n in ALL_NAMES if n not in ("dreambench_teapot", "cat_and_dog",
                                                                   "detect_and_compare_demo")]
    assert bench.ev.unmatched == []
    assert not list(bench.root.glob(".results.csv.*"))          # the temporary file was renamed
    want = ["clip_t", "clip_i", "dino", "dnc"] if bench.clip is not None else ["dino", "dnc"]
    assert bench.ev.metrics == want
    for r in bench.csv_rows:
        if bench.clip is None:
            assert r["clip_t"] == r["clip_i"] == ""
        elif r["case"] != "cat_and_dog":
            assert r["clip_t"] == ""                              # no prompt
        else:
            assert r["clip_t"] != ""


def test_end_to_end_dino_values(bench):
    def embed(img):
        with torch.no_grad():
            x = F.interpolate(dino_preprocess(img[None]), size=(32, 32), mode="bicubic", align_corners=False)
            return bench.dino(x)[0]

    refs = {}
    for r in bench.csv_rows:
        want = independent_subject_mean(embed, read_image(bench.images / r["image"]), subjects_of(bench, r["case"]), refs)
        assert float(r["dino"]) == pytest.approx(want, abs=2e-6)


@needs_open_clip
def test_end_to_end_clip_values(bench):
    import open_clip
    tokenizer = open_clip.get_tokenizer(TINY_CLIP_ARCH)

    def embed(img):
        with torch.no_grad():
            return bench.clip.encode_image(clip_preprocess(img[None], 32))[0]

    values, refs = [], {}
    for r in bench.csv_rows:
        img = read_image(bench.images / r["image"])
        want = independent_subject_mean(embed, img, subjects_of(bench, r["case"]), refs)
        assert float(r["clip_i"]) == pytest.approx(want, abs=2e-6)
        values.append(want)
        prompt = bench.cases[r["case"]].prompt
        if prompt is not None:
            with torch.no_grad():
                text = bench.clip.encode_text(tokenizer([prompt]))[0]
            assert float(r["clip_t"]) == pytest.approx(2.5 * max(0.0, cos(embed(img), text)), abs=2e-6)
    assert len(set(round(v, 4) for v in values)) > 1             # the tiny model tells the images apart


def independent_dnc(image, subjects, count):
    embedder = StandInEmbedder()
    h, w, _ = image.shape
    boxes = [(0, 0, w // 2, h), (w // 2, 0, w, h), (0, 0, w, h // 2)][:count]
    crops = [white_square(image[y0:y1, x0:x1]) for x0, y0, x1, y1 in boxes]
    refs = [embedder.embed([read_image(p) for p in s.reference_paths]) for s in subjects]
    return detect_and_compare(embedder.embed(crops), refs).score


def test_end_to_end_detect_and_compare(bench):
    for r in bench.csv_rows:
        image = read_image(bench.images / r["image"])
        subjects = subjects_of(bench, r["case"])
        assert int(r["boxes"]) == 2
        if len(subjects) == 2:
            want = independent_dnc(image, subjects, 2)
            assert want != 0.0
            assert float(r["dnc"]) == pytest.approx(want, abs=2e-6)
        else:
            assert float(r["dnc"]) == 0.0                    # 2 boxes for 1 subject: the count gate
    # the detector got each case's queries and threshold (the case's own, else the global 0.3)
    calls = [(q, t) for _, q, t in bench.detector.calls]
    assert calls == [(["teapot"], 0.3)] + [(["cat", "dog"], 0.3)] * 2 + [(["monster toy", "robot toy"], 0.4)] * 2
    assert [s[:2] for s, _, _ in bench.detector.calls] == [(36, 36), (40, 48), (40, 40), (36, 44), (44, 36)]


@pytest.mark.parametrize("count", [0, 1, 3])
def test_detect_and_compare_is_zero_for_a_wrong_box_count(bench, count):
    scorers = dataclasses.replace(bench.scorers, detector=StandInDetector(count), metrics=("dnc",))
    result = ev.evaluate([bench.cases["cat_and_dog"]], bench.images, scorers)
    assert [(r.dnc, r.boxes) for r in result.rows] == [(0.0, count)] * 2
    assert result.rows[0].dino is None and result.metrics == ["dnc"]


def test_end_to_end_summary_means_are_the_csv_column_means(bench):
    rows = bench.csv_rows

    def mean(rs, m):
        vals = [float(r[m]) for r in rs if r[m] != ""]
        return sum(vals) / len(vals) if vals else None

    summaries = {s.case: s for s in bench.ev.cases}
    assert list(summaries) == ["dreambench_teapot", "cat_and_dog", "detect_and_compare_demo"]
    text = ev.format_summary(bench.ev)
    for name, s in summaries.items():
        rs = [r for r in rows if r["case"] == name]
        assert s.images == len(rs)
        for m in bench.ev.metrics:
            want = mean(rs, m)
            assert (s.means[m] is None) == (want is None)
            if want is not None:
                assert s.means[m] == pytest.approx(want, abs=1e-6)
        line = next(ln for ln in text.splitlines() if ln.startswith(f"| {name} "))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1] == str(len(rs))
        assert cells[2:] == ["-" if mean(rs, m) is None else f"{mean(rs, m):.4f}" for m in bench.ev.metrics]
    assert bench.ev.overall.images == len(rows) == 5
    for m in bench.ev.metrics:
        assert bench.ev.overall.means[m] == pytest.approx(mean(rows, m), abs=1e-6)
    assert "| **all images** " in text
    if bench.clip is None:
        assert f"- clip_t: skipped: {em.CLIP_FILE} (or {em.CLIP_SAFETENSORS_FILE}) not in {bench.models}" in text
    assert "- no images (16 cases): dreambench_dog6, dreambench_dog2," in text


def test_write_atomic_keeps_the_mode_and_leaves_no_temporary_file(tmp_path):
    out = tmp_path / "r.csv"
    out.write_text("old")
    out.chmod(0o640)
    ev.write_csv(out, [ev.ImageResult("c", "c/0.png", "a+b", clip_i=0.5, boxes=2)])
    assert out.read_text() == "case,image,subjects,clip_t,clip_i,dino,dnc,boxes\nc,c/0.png,a+b,,0.500000,,,2\n"
    assert out.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["r.csv"]


# ----------------------------------------------------------------------------------- command line

TOOL = PACK_ROOT / "tools" / "evaluate.py"


def run_tool(*args):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def dino_only(bench):
    d = bench.root / "dino_only"
    d.mkdir(exist_ok=True)
    (d / em.DINO_FILE).write_bytes((bench.models / em.DINO_FILE).read_bytes())
    return d


def test_cli_scores_the_selected_cases(bench, dino_only, tmp_path):
    out, summary = tmp_path / "out.csv", tmp_path / "summary.md"
    p = run_tool(CASES_JSON, "--images", bench.images, "--models", dino_only, "--cases",
                 "detect_and_compare_demo,cat_and_dog", "--out", out, "--summary", summary, "--no-progress")
    assert p.returncode == 0, p.stderr
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["image"] for r in rows] == ROW_ORDER[1:]
    want = {r["image"]: r["dino"] for r in bench.csv_rows}
    assert [r["dino"] for r in rows] == [want[r["image"]] for r in rows]
    assert all(r["clip_i"] == r["dnc"] == r["boxes"] == "" for r in rows)
    assert summary.read_text() in p.stdout
    assert "| cat_and_dog " in p.stdout and "dreambench_teapot" not in p.stdout
    assert "- dnc: skipped: owlv2-base-patch16-ensemble/ and dreamsim/ not in" in p.stdout
    lines = p.stderr.splitlines()                                  # --no-progress: one line per case
    assert len(lines) == 2
    assert re.fullmatch(r"cat_and_dog: 2 images \(2/4, \d+:\d\d elapsed\)", lines[0])
    assert re.fullmatch(r"detect_and_compare_demo: 2 images \(4/4, \d+:\d\d elapsed\)", lines[1])


def load_tool():
    """tools/evaluate.py imported by file location (its main is what the command line runs)."""
    spec = importlib.util.spec_from_file_location("personalize_evaluate_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_bad_arguments_exit_2(bench, dino_only, tmp_path, capsys):
    tool = load_tool()
    assert tool.main([str(CASES_JSON), "--images", str(bench.images), "--models", str(dino_only),
                      "--threshold", "high"]) == 2
    assert "invalid float value: 'high'" in capsys.readouterr().err
    base = [str(CASES_JSON), "--images", str(bench.images), "--models", str(dino_only), "--out", str(tmp_path / "o.csv")]
    for extra, message in [(["--metrics", "dino,clip"], "unknown metric 'clip'"),
                           (["--cases", "cat_and_dogs"], "--cases: cat_and_dogs not in the benchmark"),
                           (["--threshold", "1.5"], "--threshold must be from 0 to 1"),
                           (["--device", "toaster"], "is not a torch device"),
                           (["--out", str(tmp_path / "no/such/dir/o.csv")], "does not exist")]:
        assert ev.main(base + extra) == 2, extra
    assert ev.main([str(CASES_JSON), "--images", str(tmp_path / "nowhere"), "--models", str(dino_only)]) == 2
    assert ev.main([str(tmp_path / "no.json"), "--images", str(bench.images), "--models", str(dino_only)]) == 2
    assert ev.main(["--images", str(bench.images)]) == 2


def test_cli_explicit_dnc_without_the_detector_exits_1(bench, dino_only):
    p = run_tool(CASES_JSON, "--images", bench.images, "--models", dino_only, "--metrics", "dnc", "--no-progress")
    assert p.returncode == 1
    (line,) = p.stderr.strip().splitlines()
    assert line.startswith("error: --metrics dnc: owlv2-base-patch16-ensemble/ and dreamsim/ not in ")
    assert "huggingface.co/google/owlv2-base-patch16-ensemble" in line


def test_cli_error_messages_are_one_line(bench, dino_only, tmp_path, capsys):
    bad = tmp_path / "bench.json"
    bad.write_text('{"cases": [{"name": "x", "subjects": [{"name": "cat", "images": ["missing.png"]}]}]}')
    assert ev.main([str(bad), "--images", str(bench.images), "--models", str(dino_only)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: case x, subject cat: reference image ") and \
        err[0].endswith("missing.png does not exist")
    assert ev.main([str(CASES_JSON), "--images", str(bench.images), "--models", str(dino_only),
                    "--cases", "mudi_dog6_dog2"]) == 1
    assert "no generated images for any of the 1 selected cases" in capsys.readouterr().err
