"""``python tools/world.py demo`` end to end in a real ComfyUI on the world model: with an empty models
folder it builds the world checkpoint from the world's weights, runs the shipped world MRSA workflow
twice with the same seed (as shipped, and with Multi-Reference Attention bypassed), writes both images and
the scores, and prints the table. Skipped, saying why, without the world's weights
(``pack_paths.world_weights``)."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from workflow_helpers import TOOLS, rgb

from pack_paths import comfyui_root, no_world_weights, world_weights

CHECKPOINT = "personalize_world.safetensors"
INPUTS = ["personalize_world_orange_striped_square.png", "personalize_world_orange_striped_square_mask.png",
          "personalize_world_teal_checkered_circle.png", "personalize_world_teal_checkered_circle_mask.png"]


def _world_cli():
    spec = importlib.util.spec_from_file_location("world_cli", TOOLS / "world.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_world_demo_end_to_end(tmp_path, capsys):
    reason = no_world_weights()
    if reason:
        pytest.skip(reason)
    import comfy_host
    comfy_host.init_nodes_with_pack()
    from PIL import Image
    models, out = tmp_path / "models", tmp_path / "demo"
    argv = ["demo", "--comfyui", str(comfyui_root()), "--weights", str(world_weights()), "--out", str(out),
            "--models", str(models)]
    assert _world_cli().main(argv) == 0
    printed = capsys.readouterr().out

    # the checkpoint was built where it was missing; the references, both images and the scores are in --out
    assert (models / "checkpoints" / CHECKPOINT).is_file()
    assert "building the world checkpoint" in printed
    assert sorted(p.name for p in (out / "inputs").iterdir()) == INPUTS
    report = json.loads((out / "world_demo_scores.json").read_text(encoding="utf-8"))
    assert set(report["conditions"]) == {"plain", "mrsa"}
    assert report["seed"] == 42 and report["prompt"] == "a circle and a square"
    assert [s["shape"] for s in report["subjects"]] == ["circle", "square"]
    images = {}
    for key, cond in report["conditions"].items():
        assert cond["image"] == f"world_demo_{key}.png"
        with Image.open(out / cond["image"]) as im:
            assert im.size == (128, 128) and "workflow" in im.info        # ComfyUI's Save Image, reloadable
        images[key] = rgb(out / cond["image"])
        assert images[key].std() > 1.0
        assert set(cond["per_subject"]) == {"circle", "square"}
        assert all(v in (0.0, 0.5, 1.0) for v in cond["per_subject"].values())
        assert cond["reference_fidelity"] == pytest.approx(np.mean(list(cond["per_subject"].values())), abs=1e-4)
        assert 0 <= cond["subjects_present"] <= cond["shapes_found"] <= 2
        assert -1.0 <= cond["reference_embedding"] <= 1.0
    # the same seed with and without MRSA: the references change the picture
    assert np.abs(images["mrsa"] - images["plain"]).mean() > 1.0

    # the table: one row per condition, the numbers of the JSON
    rows = [line for line in printed.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| condition | circle (teal checkered) | square (orange striped)")
    plain, mrsa = (next(r for r in rows if r.startswith(f"| {label} |"))
                   for label in ("plain (MRSA bypassed)", "with MRSA"))
    assert f"| {report['conditions']['plain']['reference_fidelity']:.2f} |" in plain
    assert f"| {report['conditions']['mrsa']['reference_fidelity']:.2f} |" in mrsa

    # a second run reuses the checkpoint
    assert _world_cli().main(argv + ["--out", str(tmp_path / "again")]) == 0
    assert "using the world checkpoint" in capsys.readouterr().out
