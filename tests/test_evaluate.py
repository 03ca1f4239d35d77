"""The evaluation (metrics/evaluate.py) and its command (metrics/cli.py, tools/evaluate.py): loading the
scorers, and an end-to-end run with tiny random DINO / CLIP models and a stand-in detector and embedder,
every CSV value checked against an independent computation; the command's arguments, outputs and exit
statuses (the cases themselves: test_cases.py). The benchmark file and DreamBench photos come from the project's shared data folder
($PERSONALIZE_TEST_DATA, default /work/shared/data); the tests that need it skip without it."""
from __future__ import annotations

import csv
import dataclasses
import functools
import importlib.util
import re
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pack_paths import PACK_ROOT
from personalize_pack.metrics import cli
from personalize_pack.metrics import evaluate as ev
from personalize_pack.metrics import models as em
from personalize_pack.metrics.cases import load_cases
from personalize_pack.metrics.detect_compare import Detection, detect_and_compare
from personalize_pack.metrics.errors import EvaluationError, UsageError
from personalize_pack.metrics.scores import clip_preprocess, dino_preprocess
from tiny_scorers import OPEN_CLIP_ERROR, TINY_CLIP_ARCH, register_tiny_clip, save_tiny_clip
from benchmark_cases import ALL_NAMES, CASES_JSON, DATA, by_name

needs_open_clip = pytest.mark.skipif(OPEN_CLIP_ERROR is not None,
                                     reason=f"open_clip cannot be imported ({OPEN_CLIP_ERROR}); pip install open_clip_torch")


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


# ----------------------------------------------------------------------------- models and scorers

def tiny_dino(seed=0) -> em.DinoViT:
    torch.manual_seed(seed)
    m = em.DinoViT(em.DinoConfig(embed_dim=64, depth=1, heads=1, patch_size=16, image_size=32))
    with torch.no_grad():                       # spread the embeddings so the cosines differ
        for p in m.parameters():
            p.normal_(0, 0.1)
    return m.eval()


def test_load_scorers_defaults_explicit_and_missing(tmp_path):
    with pytest.raises(EvaluationError, match=r"no metric can be computed: clip_t, clip_i: open_clip_pytorch_model.bin "
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
    with pytest.raises(EvaluationError, match=r"--metrics clip_i: open_clip_pytorch_model.bin .*huggingface"):
        ev.load_scorers(tmp_path, ["dino", "clip_i"])
    (tmp_path / "dreamsim").mkdir()
    with pytest.raises(EvaluationError, match=r"--metrics dnc: owlv2-base-patch16-ensemble/ not in .*google/owlv2"):
        ev.load_scorers(tmp_path, "dnc")
    with pytest.raises(UsageError, match="unknown metric 'clipi'"):
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
    with pytest.raises(EvaluationError, match=r"--metrics dnc: owlv2-base-patch16-ensemble/ not in .*; "
                                                 r"Download every file of https://huggingface.co/google/owlv2"):
        ev.load_scorers(tmp_path, "dnc")
    build_tiny_owlv2(tmp_path / "owlv2-base-patch16-ensemble")
    s = ev.load_scorers(tmp_path, "dnc")
    assert isinstance(s.detector, OwlDetector) and isinstance(s.embedder, DreamSimEnsemble)
    assert s.active() == ["dnc"] and s.skipped() == {}
    with pytest.raises(EvaluationError, match=r"--metrics dnc: dinov2-base/ not in"):
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
    with pytest.raises(EvaluationError, match=r"--metrics dnc: the detector or embedder cannot be imported .*transformers"):
        ev.load_scorers(tmp_path, "dino,dnc")
    with pytest.raises(EvaluationError, match=r"--metrics clip_t: the CLIP score needs open_clip"):
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
    cases = load_cases(CASES_JSON)
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
        assert cli.main(base + extra) == 2, extra
    assert cli.main([str(CASES_JSON), "--images", str(tmp_path / "nowhere"), "--models", str(dino_only)]) == 2
    assert cli.main([str(tmp_path / "no.json"), "--images", str(bench.images), "--models", str(dino_only)]) == 2
    assert cli.main(["--images", str(bench.images)]) == 2


def test_cli_explicit_dnc_without_the_detector_exits_1(bench, dino_only):
    p = run_tool(CASES_JSON, "--images", bench.images, "--models", dino_only, "--metrics", "dnc", "--no-progress")
    assert p.returncode == 1
    (line,) = p.stderr.strip().splitlines()
    assert line.startswith("error: --metrics dnc: owlv2-base-patch16-ensemble/ and dreamsim/ not in ")
    assert "huggingface.co/google/owlv2-base-patch16-ensemble" in line


def test_cli_error_messages_are_one_line(bench, dino_only, tmp_path, capsys):
    bad = tmp_path / "bench.json"
    bad.write_text('{"cases": [{"name": "x", "subjects": [{"name": "cat", "images": ["missing.png"]}]}]}')
    assert cli.main([str(bad), "--images", str(bench.images), "--models", str(dino_only)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: case x, subject cat: reference image ") and \
        err[0].endswith("missing.png does not exist")
    assert cli.main([str(CASES_JSON), "--images", str(bench.images), "--models", str(dino_only),
                    "--cases", "mudi_dog6_dog2"]) == 1
    assert "no generated images for any of the 1 selected cases" in capsys.readouterr().err
