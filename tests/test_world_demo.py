"""The world demo's pieces that need no ComfyUI (tools/world_demo.py): the plain condition is the shipped
world MRSA workflow with only that node bypassed, the subjects are the workflow's references, and the
scores and table say what the world's scorer found. That the demo runs is
tests/integration/test_world_demo.py."""
from __future__ import annotations

import json

import numpy as np
import torch
from workflow_helpers import workflow_file

import world_demo
from personalize_pack.world.scorer import Found

SHIPPED = json.loads(workflow_file("personalize_world_freecustom_multi_reference").read_text(encoding="utf-8"))


def _found(shape, colour, pattern, embedding=(1.0, 0.0)):
    return Found(shape=shape, colour=colour, pattern=pattern, cx=40.0, cy=60.0, area=900,
                 mask=np.zeros((128, 128), bool), embedding=torch.tensor(embedding), confidence=0.9)


class StubReader:
    def __init__(self, found):
        self.found = found

    def read(self, image):
        assert image.shape == (128, 128, 3)
        return self.found


def test_plain_condition_bypasses_only_the_mrsa_node():
    plain = world_demo.without_mrsa(SHIPPED)
    changed = [(a["type"], b["mode"]) for a, b in zip(SHIPPED["nodes"], plain["nodes"]) if a != b]
    assert changed == [("PersonalizeMultiReferenceAttention", 4)]
    assert plain["links"] == SHIPPED["links"]
    assert all(n["mode"] == 0 for n in SHIPPED["nodes"])                 # the shipped graph is untouched
    assert world_demo.sampler_seed(SHIPPED) == 42


def test_subjects_are_the_workflows_references():
    subs = world_demo.subjects()
    assert [(s["shape"], s["colour"], s["pattern"]) for s in subs] == [("circle", "teal", "checkered"),
                                                                       ("square", "orange", "striped")]
    loaded = {n["widgets_values"][0] for n in SHIPPED["nodes"] if n["type"] == "LoadImage"}
    assert {s["image"] for s in subs} | {s["mask"] for s in subs} == loaded


def test_scores_and_table():
    """Reference fidelity per subject is the share of its colour and pattern on the object of its shape
    (0 without one); the table has a row per condition."""
    subs = world_demo.subjects()
    refs = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])]
    image = np.zeros((128, 128, 3), np.uint8)
    with_ = world_demo.score(StubReader([_found("circle", "teal", "checkered"),
                                         _found("square", "orange", "plain", (0.0, 1.0))]), image, subs, refs)
    plain = world_demo.score(StubReader([_found("circle", "red", "plain"), _found("star", "orange", "striped")]),
                             image, subs, refs)
    assert with_["per_subject"] == {"circle": 1.0, "square": 0.5} and with_["reference_fidelity"] == 0.75
    assert with_["reference_embedding"] == 1.0 and with_["shapes_found"] == 2 and with_["subjects_present"] == 1
    assert plain["per_subject"] == {"circle": 0.0, "square": 0.0} and plain["shapes_found"] == 1
    assert plain["subjects_present"] == 0
    assert plain["found"][1] == {"shape": "star", "colour": "orange", "pattern": "striped", "centre": [40.0, 60.0]}
    report = {"subjects": [{k: s[k] for k in ("shape", "colour", "pattern")} for s in subs],
              "conditions": {"plain": plain, "mrsa": with_}}
    lines = world_demo.table(report).splitlines()
    assert lines[0].startswith("| condition | circle (teal checkered) | square (orange striped) | reference fidelity")
    assert lines[2] == "| plain (MRSA bypassed) | 0.00 | 0.00 | 0.00 | 0.50 | 1/2 | 0/2 |"      # the circle looks alike
    assert lines[3] == "| with MRSA | 1.00 | 0.50 | 0.75 | 1.00 | 2/2 | 1/2 |"
