"""Named bad inputs for the parts that need no ComfyUI: the one safe reader of model files
(``files/checkpoints.py``) given a pickle under a .safetensors name, pickles torch's tensors-only reader
refuses, NaN/Inf weights and a cut pickle; and the evaluation command (``metrics/cli.py``) given output
paths that would overwrite an input or each other. Each asserts the clear error (naming the file, the tensor
or the flag) and that nothing was lost (the files' bytes unchanged, no pickled code run, nothing scored).
The node faults run inside ComfyUI: tests/integration/test_faults_inputs.py."""
from __future__ import annotations

import json
import os
import pickle
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from personalize_pack.files.checkpoints import read_checkpoint
from personalize_pack.metrics import cli
from personalize_pack.metrics import models as em

# what torch's own message says and the pack must never pass on: it suggests turning the safety off
UNSAFE_ADVICE = ("weights_only", "Weights only load failed", "add_safe_globals", "safe_globals", "trust")


class Payload:
    """Unpickling this creates the marker file: proof that a refused file's code never ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def read_refused(path, match):
    before = path.read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError) as err:
            read_checkpoint(path)
    msg = str(err.value)
    assert path.name in msg and any(m in msg for m in match), msg
    assert not any(word in msg for word in UNSAFE_ADVICE), msg
    assert path.read_bytes() == before
    return msg


# ----------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("writer", ["pickle", "torch_zip", "torch_legacy"])
def test_a_pickle_named_safetensors_is_refused_unread(tmp_path, writer):
    marker = tmp_path / "executed"
    path = tmp_path / "adapter.safetensors"
    obj = {"w": torch.ones(2), "x": Payload(str(marker))}
    if writer == "pickle":
        with open(path, "wb") as f:
            pickle.dump(obj, f)
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=writer == "torch_zip")
    msg = read_refused(path, ["is named .safetensors but is not a safetensors file"])
    assert ("zip archive" in msg) == (writer == "torch_zip")
    assert "SafetensorError" not in msg and "header too large" not in msg
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [4, 5])
def test_torch_refusal_of_a_newer_pickle_is_reworded_without_its_unsafe_advice(tmp_path, protocol):
    path = tmp_path / "plain.pth"
    with open(path, "wb") as f:
        pickle.dump({"a": [1, 2], "b": "text"}, f, protocol=protocol)
    msg = read_refused(path, ["is not a plain weights file"])
    assert "'Unsupported operand 149'" in msg          # what stopped the reader, named
    assert "not unpickled" in msg


@pytest.mark.parametrize("obj,imports", [({"s": frozenset([1])}, "frozenset"), ({"n": np.ones(2)}, "numpy")])
def test_objects_torch_does_not_allow_are_named_without_its_unsafe_advice(tmp_path, obj, imports):
    path = tmp_path / "objects.pth"
    torch.save(obj, path)
    msg = read_refused(path, ["holds pickled Python objects"])
    assert f"it asks to import {imports}" in msg


def test_a_cut_pickle_is_damaged_not_a_bare_index_error(tmp_path):
    path = tmp_path / "cut.pth"
    path.write_bytes(pickle.dumps({"a": list(range(200))}, protocol=2)[:50])
    msg = read_refused(path, ["is damaged or incomplete (a truncated download?)"])
    assert msg.startswith("cut.pth is damaged")


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_or_inf_weights_are_refused_naming_the_file_and_tensor(tmp_path, fmt, bad):
    good = torch.randn(4, 4)
    poisoned = good.clone()
    poisoned[2, 3] = bad
    path = tmp_path / f"lora.{fmt}"
    if fmt == "safetensors":
        save_file({"up.weight": good, "down.weight": poisoned, "steps": torch.tensor([3])}, str(path))
        key = "down.weight"
    else:
        torch.save({"state_dict": {"image_proj": {"proj.weight": poisoned}, "up.weight": good}}, path)
        key = "state_dict.image_proj.proj.weight"
    what = "NaN" if bad != bad else "infinite"
    msg = read_refused(path, [f"its tensor '{key}' holds 1 {what} values of 16"])
    assert msg.startswith(f"lora.{fmt} is refused")


def test_finite_weights_and_integer_tensors_load(tmp_path):
    path = tmp_path / "fine.safetensors"
    save_file({"w": torch.randn(3, 3), "i": torch.tensor([2**31 - 1]), "h": torch.randn(2).half()}, str(path))
    loaded = read_checkpoint(path)
    assert set(loaded) == {"w", "i", "h"} and loaded["i"].item() == 2**31 - 1


# ----------------------------------------------------------------------------- the evaluation command

@pytest.fixture
def bench(tmp_path):
    """One case with one subject: a reference photo, two generated images, a tiny DINO model, the JSON."""
    root = tmp_path / "bench"
    (root / "refs").mkdir(parents=True)
    (root / "images").mkdir()
    (root / "models").mkdir()
    rng = np.random.default_rng(0)
    for p in (root / "refs" / "cat.png", root / "images" / "cat_1.png", root / "images" / "cat_2.png"):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(p)
    torch.manual_seed(0)
    dino = em.DinoViT(em.DinoConfig(embed_dim=64, depth=1, heads=1, patch_size=16, image_size=32))
    torch.save(dino.state_dict(), root / "models" / em.DINO_FILE)
    bench_json = root / "bench.json"
    bench_json.write_text(json.dumps({"cases": [{"name": "cat", "prompt": "a cat",
                                                 "subjects": [{"name": "cat", "images": ["refs/cat.png"]}]}]}))
    return root


def everything(root):
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


def run_cli(bench, *extra):
    return cli.main([str(bench / "bench.json"), "--images", str(bench / "images"), "--models", str(bench / "models"),
                     "--metrics", "dino", "--no-progress", *map(str, extra)])


def refused(bench, capsys, monkeypatch, *extra):
    """Runs the command with ``extra`` and checks it stopped with status 2 before any scoring and left
    every file as it was; returns its error line."""
    monkeypatch.setattr(cli, "load_scorers", lambda *a, **k: pytest.fail("scoring began"))
    before = everything(bench)
    capsys.readouterr()
    assert run_cli(bench, *extra) == 2
    assert everything(bench) == before
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    return err


def test_csv_over_a_generated_image_is_refused(bench, capsys, monkeypatch):
    image = bench / "images" / "cat_2.png"
    err = refused(bench, capsys, monkeypatch, "--out", image)
    assert f"--out {image} is a generated image of case cat" in err and "choose another file" in err
    # another spelling of the same file
    err = refused(bench, capsys, monkeypatch, "--out", bench / "refs" / ".." / "images" / "cat_1.png")
    assert "is a generated image of case cat" in err


def test_outputs_over_the_references_benchmark_or_models_are_refused(bench, capsys, monkeypatch):
    err = refused(bench, capsys, monkeypatch, "--out", bench / "refs" / "cat.png")
    assert "a reference image of subject cat" in err
    err = refused(bench, capsys, monkeypatch, "--out", bench / "x.csv", "--summary", bench / "bench.json")
    assert f"--summary {bench / 'bench.json'} is the benchmark description" in err
    err = refused(bench, capsys, monkeypatch, "--out", bench / "models" / em.DINO_FILE)
    assert "a file of the --models folder" in err


def test_summary_over_its_own_csv_is_refused(bench, capsys, monkeypatch):
    out = bench / "result.csv"
    out.write_text("an earlier result\n")
    err = refused(bench, capsys, monkeypatch, "--out", out, "--summary", out)
    assert f"--summary {out} is the same file as --out {out}" in err
    link = bench / "link.md"
    os.link(out, link)                                      # a hard link: the same file under another name
    err = refused(bench, capsys, monkeypatch, "--out", out, "--summary", link)
    assert "is the same file as --out" in err
    assert out.read_text() == "an earlier result\n"


def test_distinct_outputs_are_written(bench, capsys):
    out, summary = bench / "result.csv", bench / "summary.md"
    assert run_cli(bench, "--out", out, "--summary", summary) == 0
    rows = out.read_text().splitlines()
    assert len(rows) == 3 and rows[1].startswith("cat,") and "cat_1.png" in rows[1]
    assert "| cat " in summary.read_text()
