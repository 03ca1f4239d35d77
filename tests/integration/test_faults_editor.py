"""The empty-folder loaders the whole way, as a user meets them: a ComfyUI server whose model folders are
empty, its own frontend in a headless Chromium building the prompt from a graph (what the editor sends for
a file combo with no files), and the server's answer to that prompt: the pack's message naming the input
and the empty folder, never "validate_inputs() missing 1 required positional argument". Skipped without
Chromium, chromedriver and selenium."""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from browser_host import browser_missing, free_port, server_tool
from pack_paths import PACK_ROOT, comfyui_root

# node id -> (its file input, its folder)
EMPTY = {"PersonalizeMIPAdapterLoader": ("adapter_name", "ipadapter"),
         "PersonalizeApplyInfusion": ("infusion_name", "model_patches")}


def _editor_prompt(base_url: str, node_id: str) -> tuple[object, dict]:
    """The value the frontend's combo widget holds for the node's file input and the API prompt the
    frontend builds for ``node_id`` linked into a Preview Any node."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        opts.add_argument(arg)
    opts.binary_location = shutil.which("chromium") or shutil.which("chromium-browser") or "chromium"
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    try:
        driver.get(base_url + "/")
        deadline = time.monotonic() + 120
        while not driver.execute_script("return !!(window.app && window.app.graph && window.LiteGraph)"):
            assert time.monotonic() < deadline, "the frontend did not start within 120 s"
            time.sleep(1)
        time.sleep(2)
        widget, prompt = driver.execute_script(
            "const [id, input] = arguments;"
            "app.graph.clear();"
            "const n = LiteGraph.createNode(id); app.graph.add(n);"
            "const p = LiteGraph.createNode('PreviewAny'); app.graph.add(p);"
            "n.connect(0, p, 0);"
            "const w = n.widgets.find(w => w.name === input);"
            "return app.graphToPrompt().then(r => [w ? w.value : '<no widget>', JSON.stringify(r.output)]);",
            node_id, EMPTY[node_id][0])
        return widget, json.loads(prompt)
    finally:
        driver.quit()


def _queue(base_url: str, prompt: dict) -> dict:
    req = urllib.request.Request(f"{base_url}/prompt", data=json.dumps({"prompt": prompt}).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        return json.loads(e.read())


def test_the_editor_sends_a_value_and_the_server_names_the_empty_folder():
    missing = browser_missing()
    if missing:
        pytest.skip(missing)
    tool = server_tool()
    base = Path(tempfile.mkdtemp(prefix="personalize_empty_"))
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "personalize").symlink_to(PACK_ROOT, target_is_directory=True)
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    with open(base / "server.log", "w") as log:
        proc = tool.start_server(str(comfyui_root()), sys.executable, base, port, log)
        try:
            for node_id, (file_input, folder) in EMPTY.items():
                widget, prompt = _editor_prompt(base_url, node_id)
                assert widget == f"(no file in models/{folder})"
                sent = next(v["inputs"] for v in prompt.values() if v["class_type"] == node_id)
                assert sent[file_input] == widget
                answer = json.dumps(_queue(base_url, prompt))
                assert "missing 1 required positional argument" not in answer
                assert f"{file_input} - no file is in the {folder} folder" in answer, answer
        finally:
            tool.stop_server(proc)
    shutil.rmtree(base, ignore_errors=True)
