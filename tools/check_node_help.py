"""Check the node help pages in a real ComfyUI and a real browser.

Starts ComfyUI headless (CPU) with this pack linked into a temporary ``custom_nodes/``, then:

1. every node id the pack registers has ``web/docs/<node id>.md``, ComfyUI serves it at the URL the
   frontend asks for (``/extensions/<pack folder>/docs/<node id>.md``), and no page names an unknown id;
2. with ``--browser`` (the default when chromium and selenium are there): headless Chromium opens the UI,
   adds each node of ``--panel`` to an empty graph, selects it, clicks the selection toolbox's info
   button and waits until the side panel shows the page's section headings; a screenshot of each goes to
   ``--screenshots``.

Exit status 0 when everything holds, 1 on a failed check, 2 on a bad set-up. Use ComfyUI's Python:

    python tools/check_node_help.py --comfyui /path/to/ComfyUI [--screenshots out/] [--no-browser]

The browser part needs ``chromium`` and ``chromium-driver`` (apt) and ``pip install selenium``.
"""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "web" / "docs"
DEFAULT_PANEL = ["PersonalizeMultiReferenceAttention", "PersonalizeSAMMask"]


def get(url, timeout=10.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read()


def start_server(comfyui, python, base, port, log):
    cmd = [python, str(Path(comfyui) / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(port),
           "--disable-auto-launch", "--disable-api-nodes", "--base-directory", str(base),
           "--database-url", "sqlite:///:memory:"]
    proc = subprocess.Popen(cmd, cwd=str(comfyui), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ComfyUI exited with status {proc.returncode}; see {log.name}")
        try:
            get(f"http://127.0.0.1:{port}/system_stats", timeout=2)
            return proc
        except (urllib.error.URLError, OSError):
            time.sleep(1)
    stop_server(proc)
    raise RuntimeError(f"ComfyUI did not answer on port {port} within 300 s; see {log.name}")


def stop_server(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def check_served(base_url, pack):
    """Every node id of the pack has its page, served byte for byte; no page for an unknown id."""
    failures = []
    info = json.loads(get(f"{base_url}/object_info", timeout=60)[1])
    ids = sorted(k for k, v in info.items() if v.get("python_module") == f"custom_nodes.{pack}")
    if not ids:
        return ["the pack registered no nodes (did it import? see the server log)"], ids
    pages = {p.stem for p in DOCS.glob("*.md")}
    for node_id in ids:
        path = DOCS / f"{node_id}.md"
        if not path.is_file() or not path.read_text(encoding="utf-8").strip():
            failures.append(f"{node_id}: web/docs/{node_id}.md is missing or empty")
            continue
        try:
            status, body = get(f"{base_url}/extensions/{pack}/docs/{node_id}.md")
        except urllib.error.HTTPError as e:
            status, body = e.code, b""
        if status != 200 or body != path.read_bytes():
            failures.append(f"{node_id}: /extensions/{pack}/docs/{node_id}.md answered {status}")
    for extra in sorted(pages - set(ids)):
        failures.append(f"web/docs/{extra}.md: no node has this id")
    return failures, ids


def headings(node_id):
    """The page's section headings as the panel renders them (markdown code marks dropped)."""
    text = (DOCS / f"{node_id}.md").read_text(encoding="utf-8")
    return [re.sub(r"[`*]", "", m).strip() for m in re.findall(r"^#{1,3} (.+)$", text, re.M)]


def check_panel(base_url, node_ids, shots):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    opts = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1600,1000"):
        opts.add_argument(arg)
    opts.binary_location = shutil.which("chromium") or shutil.which("chromium-browser") or "chromium"
    driver_path = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    failures, saved = [], []
    try:
        driver.get(base_url + "/")
        deadline = time.monotonic() + 120
        while not driver.execute_script("return !!(window.app && window.app.graph && window.LiteGraph)"):
            if time.monotonic() > deadline:
                return ["the frontend did not start within 120 s"], saved
            time.sleep(1)
        time.sleep(2)
        ActionChains(driver).send_keys(Keys.ESCAPE).perform()  # the first-run templates dialog
        time.sleep(1)
        for node_id in node_ids:
            driver.execute_script(
                "app.graph.clear(); const n = LiteGraph.createNode(arguments[0]); n.pos = [200, 200];"
                "app.graph.add(n); app.canvas.selectNode(n); app.canvas.setDirty(true, true);", node_id)
            time.sleep(1.5)
            buttons = driver.find_elements(By.CSS_SELECTOR, '[data-testid="info-button"]')
            if not buttons:
                failures.append(f"{node_id}: no info button on the selection toolbox")
                continue
            buttons[0].click()
            want = headings(node_id)
            deadline = time.monotonic() + 20
            missing = want
            while time.monotonic() < deadline:
                body = driver.execute_script("return document.body.innerText")
                missing = [h for h in want if h not in body]
                if not missing:
                    break
                time.sleep(0.5)
            if shots is not None:
                path = shots / f"node_help_{node_id}.png"
                driver.save_screenshot(str(path))
                saved.append(path)
            if missing:
                failures.append(f"{node_id}: the help panel lacks {missing}")
    finally:
        driver.quit()
    return failures, saved


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI tree (or COMFYUI_PATH)")
    ap.add_argument("--python", default=sys.executable, help="Python that runs ComfyUI (default: this one)")
    ap.add_argument("--port", type=int, default=8199)
    ap.add_argument("--pack-name", default="personalize", help="the pack's folder name in custom_nodes/")
    ap.add_argument("--panel", default=",".join(DEFAULT_PANEL), help="node ids whose help panel to open")
    ap.add_argument("--screenshots", type=Path, default=None, help="folder for the panel screenshots (PNG)")
    ap.add_argument("--no-browser", action="store_true", help="only check that every page is served")
    args = ap.parse_args(argv)
    if not args.comfyui or not (Path(args.comfyui) / "main.py").is_file():
        print("error: --comfyui (or COMFYUI_PATH) must name a ComfyUI tree", file=sys.stderr)
        return 2
    if args.screenshots is not None:
        args.screenshots.mkdir(parents=True, exist_ok=True)

    base = Path(tempfile.mkdtemp(prefix="personalize_help_"))
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / args.pack_name).symlink_to(ROOT, target_is_directory=True)
    log = open(base / "server.log", "w")
    base_url = f"http://127.0.0.1:{args.port}"
    try:
        proc = start_server(args.comfyui, args.python, base, args.port, log)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        failures, ids = check_served(base_url, args.pack_name)
        print(f"{len(ids)} node ids, {len(ids) - len(failures)} pages served as written")
        if not args.no_browser:
            panel = [n for n in args.panel.split(",") if n]
            panel_failures, saved = check_panel(base_url, panel, args.screenshots)
            failures += panel_failures
            print(f"help panel: {len(panel) - len(panel_failures)} of {len(panel)} nodes show their page")
            for path in saved:
                print(f"screenshot: {path}")
    finally:
        stop_server(proc)
        log.close()
    for failure in failures:
        print(f"FAIL {failure}", file=sys.stderr)
    if not failures:
        shutil.rmtree(base, ignore_errors=True)
    else:
        print(f"server log: {base / 'server.log'}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
