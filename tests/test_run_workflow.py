"""The headless runner's own parts (tools/run_workflow.py) without ComfyUI: ``--set`` overrides on a
converted prompt, and the command line's error without a ComfyUI install. The conversion itself is
tests/test_ui_to_api.py; the shipped workflows run in tests/integration/test_workflows.py."""
from __future__ import annotations

import json

import pytest
from workflow_helpers import SCHEMAS, api_by_type, workflow_file

import run_workflow as rw
from ui_to_api import WorkflowError, ui_to_api

WORKFLOW = workflow_file("personalize_freecustom_multi_reference")


@pytest.fixture
def workflow():
    return json.loads(WORKFLOW.read_text(encoding="utf-8"))


def test_overrides(workflow):
    prompt = ui_to_api(workflow, SCHEMAS)
    rw.apply_overrides(prompt, ["KSampler.steps=2", "EmptyLatentImage.width=64", "LoadImage.image=x.png",
                                "CheckpointLoaderSimple.ckpt_name=tiny.safetensors"], SCHEMAS)
    assert api_by_type(prompt, "KSampler")["inputs"]["steps"] == 2
    assert api_by_type(prompt, "EmptyLatentImage")["inputs"]["width"] == 64
    assert {n["inputs"]["image"] for n in prompt.values() if n["class_type"] == "LoadImage"} == {"x.png"}
    assert api_by_type(prompt, "CheckpointLoaderSimple")["inputs"]["ckpt_name"] == "tiny.safetensors"
    rw.apply_overrides(prompt, {"PersonalizeReferenceEncode.soft_mask": True}, SCHEMAS)
    assert all(n["inputs"]["soft_mask"] is True for n in prompt.values()
               if n["class_type"] == "PersonalizeReferenceEncode")
    for bad, msg in (("KSampler.stepz=2", "no input 'stepz'"), ("Nope.steps=2", "no active Nope"),
                     ("KSampler", "CLASS_TYPE.input=value")):
        with pytest.raises(WorkflowError, match=msg):
            rw.apply_overrides(prompt, [bad], SCHEMAS)


def test_cli_without_comfyui_fails_clearly(monkeypatch, capsys):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    assert rw.main([str(WORKFLOW)]) == 1
    assert "COMFYUI_PATH" in capsys.readouterr().err
