"""Every shipped template opened through the real UI: ComfyUI started as a server (CPU, temporary models,
input, output and user folders, the pack linked into a temporary ``custom_nodes``), headless Chromium from
the distribution (``chromium`` + ``chromedriver``) driving the frontend ComfyUI installs.

For each template, as a user gets there: the Templates dialog (the left sidebar's button), the pack's
category under Extensions, the card (titled by the file name). Then, on the loaded graph:

* no missing node type;
* no shifted widget: every saved widget value lands on the widget of its name (the server's node schema
  gives the order), with a value of the widget's kind (a combo value is one of its choices);
* no console error while it loads;
* no missing input image: each Load Image names a file the server lists, and its preview image loads;
* the models it lacks here are all reported by the frontend with a folder (none "unknown") and, where the
  workflow gives one, the download link.

The templates whose loaders can take tiny random models under the real file names (the SD1.5 FreeCustom and
FreeMix examples, MuDI compose-and-score) and the three world templates (on the world checkpoint, built from
the committed weights) are then queued from the page at 64-128 px and 2 steps and must complete with a saved
image. The others load real-size text encoders or vision towers that no tiny file
stands in for inside an unpatched server (tests/integration/test_workflows.py runs them in-process).

Skipped, saying why, without chromium, chromedriver or selenium. About 3 minutes on two CPU cores (18 tests: 12 templates opened, 6 run).
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import time
import urllib.request

import pytest
from workflow_helpers import shipped_stems, workflow_file

from browser_host import browser_missing, free_port, server_tool
from pack_paths import PACK_ROOT, comfyui_root, no_world_weights, world_weights

# the templates queued from the page: stem -> (node type, widget, value) changes a user would make to run it
# small and fast, and the Save Image prefix it writes
RUNNABLE = {
    "personalize_freecustom_multi_reference": (
        [("EmptyLatentImage", "width", 64), ("EmptyLatentImage", "height", 64), ("KSampler", "steps", 2)],
        "personalize_freecustom"),
    "personalize_freemix_structure_appearance": (
        [("EmptyLatentImage", "width", 64), ("EmptyLatentImage", "height", 64), ("KSampler", "steps", 2),
         ("PersonalizeReferenceEncode", "resolution", 64)],
        "personalize_freemix"),
    "personalize_mudi_compose_and_score": (
        [("PersonalizeSubjectComposer", "width", 128), ("PersonalizeSubjectComposer", "height", 128),
         ("EmptyLatentImage", "width", 128), ("EmptyLatentImage", "height", 128), ("BasicScheduler", "steps", 2)],
        "personalize_mudi"),
    # the world's templates on the world checkpoint itself (built from the committed weights)
    "personalize_world_freecustom_multi_reference": (
        [("EmptyLatentImage", "width", 64), ("EmptyLatentImage", "height", 64), ("KSampler", "steps", 2),
         ("PersonalizeReferenceEncode", "resolution", 64)],
        "personalize_world_freecustom"),
    "personalize_world_freemix_structure_appearance": (
        [("EmptyLatentImage", "width", 64), ("EmptyLatentImage", "height", 64), ("KSampler", "steps", 2),
         ("PersonalizeReferenceEncode", "resolution", 64)],
        "personalize_world_freemix"),
    "personalize_world_mudi_compose": ([("BasicScheduler", "steps", 2)], "personalize_world_mudi"),
}
# console messages of a fresh user folder that any page load prints (the frontend asks for user files that
# do not exist yet); nothing a template causes
BENIGN_CONSOLE = ("/api/userdata", "/user.css", "favicon")


def _link(src, dst):
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        dst.symlink_to(src)
    except OSError:
        shutil.copyfile(src, dst)


def _models(base, tiny_sd15_path) -> dict[str, str | None]:
    """base/models with tiny files under the runnable templates' names (and the world checkpoint); returns
    why each runnable template cannot run here (None: it can)."""
    models = base / "models"
    for name in ("v1-5-pruned-emaonly.safetensors", "sd_xl_base_1.0.safetensors"):
        _link(tiny_sd15_path, models / "checkpoints" / name)
    why = dict.fromkeys(RUNNABLE)
    if importlib.util.find_spec("segment_anything") is not None:
        from tiny_sam import save_tiny_sam
        save_tiny_sam(models / "sams" / "sam_vit_b_01ec64.pth")
    else:
        why["personalize_freemix_structure_appearance"] = "SAM Mask needs segment_anything"
    if importlib.util.find_spec("transformers") is not None:
        from tiny_dreamsim import build_tiny_dreamsim
        from tiny_owl import build_tiny_owlv2
        build_tiny_owlv2(models / "personalize_eval" / "owlv2-base-patch16-ensemble")
        build_tiny_dreamsim(models / "personalize_eval" / "dreamsim")
    else:
        why["personalize_mudi_compose_and_score"] = "Detect-and-Compare needs transformers"
    reason = no_world_weights()
    if reason is None:
        from personalize_pack.world import checkpoint
        checkpoint.build(models / "checkpoints" / checkpoint.CHECKPOINT_NAME, world_weights())
    for stem in (s for s in RUNNABLE if s.startswith("personalize_world_")):
        why[stem] = reason
    return why


class Page:
    """The frontend in headless Chromium, with the helpers the checks use."""

    def __init__(self, url):
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
        opts = Options()
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                    "--window-size=1600,1000"):
            opts.add_argument(arg)
        opts.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
        opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.url = url
        self.driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
        self.driver.get(url + "/")
        self.wait_for("window.app && window.app.graph && window.LiteGraph && app.canvas", 120)
        time.sleep(2)

    def js(self, script, *args):
        return self.driver.execute_script(script, *args)

    def wait_for(self, condition: str, timeout: float, *args):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(f"return !!({condition})", *args)
            if value:
                return value
            time.sleep(0.25)
        raise AssertionError(f"timed out after {timeout} s waiting for: {condition}")

    def console(self) -> list[dict]:
        return self.driver.get_log("browser")

    NAV = ("[...document.querySelectorAll('*')].filter(e => e.children.length <= 2 && "
           "(e.innerText || '').trim() === arguments[0])")

    def open_template(self, title: str, pack: str, saved: dict) -> None:
        """The Templates button of the sidebar, the pack's category under Extensions, the card; returns when
        the graph holds the saved workflow's nodes."""
        from selenium.webdriver.common.by import By
        if not self.js(f"return {self.NAV}.length", pack):           # the dialog is closed: open it
            self.driver.find_element(By.CSS_SELECTOR, ".templates-tab-button").click()
        self.wait_for(f"{self.NAV}.length", 30, pack)
        self.js(f"{self.NAV}[0].click();", pack)
        card = f'[data-testid="template-workflow-{title}"]'
        self.wait_for("document.querySelector(arguments[0])", 30, card)
        self.driver.find_element(By.CSS_SELECTOR, card).click()
        want = sorted(f"{n['id']}:{n['type']}" for n in saved["nodes"])
        self.wait_for("!document.querySelector(arguments[0]) && JSON.stringify(app.graph._nodes.map("
                      "n => n.id + ':' + n.type).sort()) === arguments[1]", 60, card, json.dumps(want, separators=(",", ":")))
        time.sleep(1.5)

    def graph(self) -> list[dict]:
        return self.js("""
            return app.graph._nodes.map(n => ({
              id: n.id, type: n.type, registered: n.type in LiteGraph.registered_node_types,
              widgets: (n.widgets || []).map(w => ({name: w.name, type: w.type, value: w.value,
                        choices: Array.isArray(w.options?.values) ? w.options.values : null})),
              image: n.type === 'LoadImage' ? (n.imgs && n.imgs[0] ? {ok: n.imgs[0].complete &&
                        n.imgs[0].naturalWidth > 0, src: n.imgs[0].src} : null) : undefined}));""")

    def close(self):
        self.driver.quit()


def _get(url):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def ui(tmp_path_factory, tiny_sd15_path):
    missing = browser_missing()
    if missing:
        pytest.skip(missing)
    tool = server_tool()
    base = tmp_path_factory.mktemp("browser_comfy")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "personalize").symlink_to(PACK_ROOT, target_is_directory=True)
    runnable = _models(base, tiny_sd15_path)
    port = free_port()
    log = open(base / "server.log", "w")
    proc = tool.start_server(str(comfyui_root()), sys.executable, base, port, log)
    page = None
    try:
        url = f"http://127.0.0.1:{port}"
        page = Page(url)
        yield {"page": page, "url": url, "base": base, "runnable": runnable, "info": _get(url + "/object_info"),
               "opened": {}}
    finally:
        if page is not None:
            page.close()
        tool.stop_server(proc)
        log.close()


def _expected_widgets(node: dict, schema: dict) -> list[tuple[str, object]]:
    """(widget name, saved value) of a saved node's widget values, in the server schema's order."""
    sys.path.insert(0, str(PACK_ROOT / "tools"))
    from ui_to_api import widget_slots
    slots = widget_slots(schema["input"])
    values = node["widgets_values"]
    assert len(values) == len(slots), (node["type"], [s[0] for s in slots], values)
    return [(name, value) for (name, kind, _), value in zip(slots, values) if kind == "value"]


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and abs(a - b) <= 1e-6 * max(1, abs(b))
    return a == b


@pytest.mark.parametrize("stem", shipped_stems())
def test_template_opens_whole(ui, stem):
    page, info = ui["page"], ui["info"]
    path = workflow_file(stem)
    saved = json.loads(path.read_text(encoding="utf-8"))
    page.console()                                                     # drop what came before
    page.open_template(path.stem, "personalize", saved)
    nodes = page.graph()
    ui["opened"][stem] = nodes
    # The frontend asks each missing model's download link for its size; this machine has no network (and
    # the server's --disable-api-nodes policy blocks outside connections), so those asks fail: they name one
    # of the workflow's own links, nothing else may fail.
    links = [e["url"] for n in saved["nodes"] for e in n.get("properties", {}).get("models", []) if "url" in e]
    errors = [e["message"] for e in page.console()
              if e["level"] == "SEVERE" and not any(b in e["message"] for b in BENIGN_CONSOLE)
              and not any(link in e["message"] for link in links)]
    assert errors == [], errors

    # no missing node type, the saved nodes all there
    assert [n["type"] for n in nodes if not n["registered"]] == []
    assert sorted(str(n["id"]) for n in nodes) == sorted(str(n["id"]) for n in saved["nodes"])

    # every saved widget value on the widget of its name, of its kind
    live = {str(n["id"]): n for n in nodes}
    for node in saved["nodes"]:
        if node["type"] not in info:                                   # Note: a frontend-only node
            assert node["type"] == "Note" and live[str(node["id"])]["widgets"][0]["value"] == node["widgets_values"][0]
            continue
        widgets = {w["name"]: w for w in live[str(node["id"])]["widgets"]}
        for name, value in _expected_widgets(node, info[node["type"]]):
            assert name in widgets, f"{node['type']} #{node['id']}: no widget {name!r} (has {sorted(widgets)})"
            w = widgets[name]
            assert _same(w["value"], value), f"{node['type']} #{node['id']}.{name}: {w['value']!r} != {value!r}"
            if w["choices"] is not None and not node.get("properties", {}).get("models"):
                assert value in w["choices"], f"{node['type']}.{name}: {value!r} not a choice"

    # every Load Image names a listed file, and its preview loaded
    for node in (n for n in nodes if n["type"] == "LoadImage"):
        image = next(w for w in node["widgets"] if w["name"] == "image")
        assert image["value"] in image["choices"], f"input image {image['value']} is missing"
    page.wait_for("app.graph._nodes.filter(n => n.type === 'LoadImage').every(n => n.imgs && n.imgs[0] && "
                  "n.imgs[0].complete && n.imgs[0].naturalWidth > 0)", 30)

    # the models missing here: the frontend files each under the workflow's folder (it skips a bypassed or
    # muted node and a widget fed by a link, as it should: neither loads the file)
    for node in saved["nodes"]:
        linked = {i["widget"]["name"] for i in node["inputs"] if i.get("widget") and i.get("link") is not None}
        if node["mode"] in (2, 4):
            continue
        for entry in node.get("properties", {}).get("models", []):
            widget = next(w for w in live[str(node["id"])]["widgets"] if w["value"] == entry["name"])
            if widget["name"] in linked:
                continue
            if widget["choices"] is not None and entry["name"] not in widget["choices"]:
                _assert_reported_missing(page, entry)


def _assert_reported_missing(page, entry):
    """The Errors tab of the workflow panel (the error overlay's "View details") lists the file under the
    workflow's folder for it."""
    page.js("const b = [...document.querySelectorAll('button')].find(b => /view details/i.test(b.innerText));"
            "if (b) b.click();")
    time.sleep(1)
    page.js("const t = [...document.querySelectorAll('button, [role=tab]')].find(b => "
            "/^Errors/.test((b.innerText || '').trim())); if (t) t.click();")
    time.sleep(1)
    text = page.js("return document.body.innerText")
    assert "Missing Models" in text, "the Errors tab shows no missing models"
    listed = text.split("Missing Models", 1)[1]
    assert entry["name"] in listed, f"the frontend does not report {entry['name']} as missing"
    after = listed.split(entry["name"], 1)[1].lstrip()
    assert after.startswith(entry["directory"]), f"{entry['name']}: listed without its folder {entry['directory']}"


@pytest.mark.parametrize("stem", sorted(RUNNABLE))
def test_template_runs_from_the_page(ui, stem):
    if ui["runnable"][stem] is not None:
        pytest.skip(ui["runnable"][stem])
    page, base = ui["page"], ui["base"]
    changes, prefix = RUNNABLE[stem]
    path = workflow_file(stem)
    page.open_template(path.stem, "personalize", json.loads(path.read_text(encoding="utf-8")))
    for class_type, widget, value in changes:
        n = page.js("let k = 0; for (const n of app.graph._nodes) if (n.type === arguments[0]) {"
                    "const w = n.widgets.find(w => w.name === arguments[1]); w.value = arguments[2]; "
                    "w.callback?.(arguments[2]); k++ } return k;", class_type, widget, value)
        assert n >= 1, f"{class_type}.{widget}: no such widget"
    before = set(_get(page.url + "/history"))
    page.js("app.queuePrompt(0, 1)")
    deadline = time.monotonic() + 240
    entry = None
    while time.monotonic() < deadline:
        new = {k: v for k, v in _get(page.url + "/history").items() if k not in before}
        if new and all(v.get("status", {}).get("completed") is not None for v in new.values()):
            (entry,) = new.values()
            if entry["status"].get("status_str") in ("success", "error"):
                break
        time.sleep(1)
    assert entry is not None, "the prompt did not finish within 240 s"
    assert entry["status"]["status_str"] == "success", entry["status"]
    saved = [img for out in entry["outputs"].values() for img in out.get("images", []) if img["type"] == "output"]
    assert saved and all(img["filename"].startswith(prefix) for img in saved)
    for img in saved:
        assert (base / "output" / img.get("subfolder", "") / img["filename"]).stat().st_size > 0
