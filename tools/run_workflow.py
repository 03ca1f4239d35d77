#!/usr/bin/env python
"""Run a UI-format ComfyUI workflow (the JSON the frontend saves) headless, in-process, on a ComfyUI
install, with this pack loaded.

    python tools/run_workflow.py "workflows/FreeCustom MRSA (SD1.5).json" \\
        --comfyui /path/to/ComfyUI --models /path/to/models \\
        --set KSampler.steps=20 --output out/

The workflow is converted to ComfyUI's API prompt format with the live node schemas (tools/ui_to_api.py),
validated and executed with ``execution.PromptExecutor``. Example input images shipped in
``workflows/inputs/`` are copied into the input folder when a workflow refers to them and they are
missing there. Exit status 0 on success, 1 on a validation or execution error, 2 on bad arguments.

Not supported: subgraphs (unpack them in the editor first) and the frontend's dynamic-prompt syntax.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:    # tools/ is not a package: its modules import by path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from ui_to_api import WorkflowError, ordered_inputs, ui_to_api

PACK_ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_INPUTS = PACK_ROOT / "workflows" / "inputs"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


# ---------------------------------------------------------------------------------------------
# Overrides (--set CLASS_TYPE.input=value)
# ---------------------------------------------------------------------------------------------

def parse_value(text: str):
    try:
        return json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return text


def normalize_overrides(overrides) -> list[tuple[str, str, object]]:
    """Accepts {"Class.input": value} or ["Class.input=value", ...]; returns (class, input, value)."""
    if not overrides:
        return []
    if isinstance(overrides, dict):
        pairs = list(overrides.items())
    else:
        pairs = []
        for text in overrides:
            key, sep, raw = text.partition("=")
            if not sep:
                raise WorkflowError(f"--set {text!r}: expected CLASS_TYPE.input=value")
            pairs.append((key, parse_value(raw)))
    items = []
    for key, value in pairs:
        cls, dot, name = key.strip().rpartition(".")
        if not dot or not cls or not name:
            raise WorkflowError(f"--set {key!r}: expected CLASS_TYPE.input=value")
        items.append((cls, name, value))
    return items


def apply_overrides(prompt: dict, overrides, schemas: dict) -> dict:
    """Set ``input`` to ``value`` on every node of ``class_type`` (replacing a link if there is one)."""
    for cls, name, value in normalize_overrides(overrides):
        targets = [n for n in prompt.values() if n["class_type"] == cls]
        if not targets:
            raise WorkflowError(f"--set {cls}.{name}: the workflow has no active {cls} node")
        known = {n for n, _, _ in ordered_inputs(schemas.get(cls, {}))}
        if name not in known:
            raise WorkflowError(f"--set {cls}.{name}: {cls} has no input {name!r} (inputs: {', '.join(sorted(known))})")
        for node in targets:
            node["inputs"][name] = value
    return prompt


# ---------------------------------------------------------------------------------------------
# In-process ComfyUI
# ---------------------------------------------------------------------------------------------

def find_comfyui(path=None) -> Path:
    path = path or os.environ.get("COMFYUI_PATH")
    if not path:
        raise WorkflowError("no ComfyUI install given: pass --comfyui PATH or set COMFYUI_PATH")
    root = Path(path).expanduser().resolve()
    if not (root / "comfy").is_dir() or not (root / "execution.py").is_file():
        raise WorkflowError(f"{root} is not a ComfyUI install (no comfy/ or execution.py)")
    return root


def import_comfyui(root: Path, cpu: bool = False) -> None:
    """Import ComfyUI's core modules once per process; on the CPU when asked or when there is no CUDA
    (this must be decided before ``comfy.model_management`` is first imported)."""
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from comfy.cli_args import args
    if "comfy.model_management" not in sys.modules:
        import torch
        if cpu or not torch.cuda.is_available():
            args.cpu = True
    args.disable_api_nodes = True
    import execution  # noqa: F401
    import folder_paths
    import nodes  # noqa: F401
    import server  # noqa: F401
    # A headless run needs no user settings; keep PromptServer from creating the user folder.
    if not Path(folder_paths.get_user_directory()).is_dir():
        folder_paths.set_user_directory(tempfile.mkdtemp(prefix="comfy_user_"))


async def ensure_nodes() -> None:
    """The built-in extra nodes and this pack, loaded once; PromptServer bound to the running loop."""
    import nodes
    import server
    loop = asyncio.get_running_loop()
    if getattr(server.PromptServer, "instance", None) is None:
        server.PromptServer(loop)
    else:
        server.PromptServer.instance.loop = loop   # an earlier run's loop is closed by now
    if "ImageToMask" not in nodes.NODE_CLASS_MAPPINGS:
        await nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False)
    if "PersonalizeReferenceEncode" not in nodes.NODE_CLASS_MAPPINGS:
        if not await nodes.load_custom_node(str(PACK_ROOT), module_parent="custom_nodes"):
            raise WorkflowError(f"ComfyUI could not import the pack at {PACK_ROOT} (traceback in the log above)")


def live_schemas(class_types) -> dict:
    import nodes
    return {t: nodes.NODE_CLASS_MAPPINGS[t].INPUT_TYPES() for t in class_types if t in nodes.NODE_CLASS_MAPPINGS}


def add_model_folders(models_dir: Path) -> list[str]:
    """Register every ``models_dir/<folder>`` that names a ComfyUI model folder (checkpoints, vae,
    loras, clip_vision, diffusion_models, ... and the pack's own). Returns the folder names added."""
    import folder_paths
    if not models_dir.is_dir():
        raise WorkflowError(f"--models {models_dir}: not a folder")
    added = []
    for sub in sorted(p for p in models_dir.iterdir() if p.is_dir()):
        name = folder_paths.map_legacy(sub.name)
        if name in folder_paths.folder_names_and_paths and name not in ("custom_nodes", "datasets"):
            folder_paths.add_model_folder_path(name, str(sub), is_default=True)
            added.append(name)
    return added


def copy_example_inputs(prompt: dict, input_dir: Path) -> list[str]:
    """Copy the shipped example images the prompt refers to into ``input_dir`` when missing there."""
    if not EXAMPLE_INPUTS.is_dir():
        return []
    shipped = {p.name: p for p in EXAMPLE_INPUTS.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    wanted = {v for node in prompt.values() for v in node["inputs"].values() if isinstance(v, str) and v in shipped}
    from pack_import import import_pack
    import_pack()
    from personalize_pack.files.copy_absent import copy_if_absent   # never over a file of the name

    input_dir.mkdir(parents=True, exist_ok=True)
    return [name for name in sorted(wanted) if copy_if_absent(shipped[name], input_dir / name)]


class HeadlessServer:
    """What PromptExecutor needs of PromptServer: it reports here instead of to websockets."""

    def __init__(self, prompt: dict, log):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata = {}
        self.prompt = prompt
        self.log = log
        self._started = None

    def _finish_node(self):
        if self._started is not None:
            took = time.perf_counter() - self._started
            if took >= 1.0:
                self.log(f"  ({took:.1f} s)")
            self._started = None

    def send_sync(self, event, data, sid=None):
        if not isinstance(data, dict):
            return
        if event == "executing":
            self._finish_node()
            if data.get("node") is None:
                return
            node = self.prompt.get(str(data["node"]), {})
            cls = node.get("class_type", "?")
            title = node.get("_meta", {}).get("title", cls)
            self.log(f"[node {data['node']}] {cls}" + (f" ({title})" if title != cls else ""))
            self._started = time.perf_counter()
        elif event in ("execution_success", "execution_error", "execution_interrupted"):
            self._finish_node()
        elif event == "execution_cached" and data.get("nodes"):
            self.log(f"cached: nodes {', '.join(map(str, data['nodes']))}")

    def queue_updated(self):
        pass


def _format_node_errors(node_errors: dict) -> str:
    lines = []
    for node_id, info in node_errors.items():
        for err in info.get("errors", []):
            lines.append(f"  node {node_id} ({info.get('class_type')}): {err.get('message')}: {err.get('details')}")
    return "\n".join(lines)


def run_workflow(path, comfy_root=None, output_dir=None, models_dir=None, overrides=None, input_dir=None,
                 log=print, cpu=False) -> dict:
    """Run the UI-format workflow at ``path`` in-process and return the history outputs
    (``{node_id: {"images": [{"filename", "subfolder", "type"}]}}``). Raises WorkflowError."""
    root = find_comfyui(comfy_root)
    workflow = json.loads(Path(path).read_text(encoding="utf-8"))
    import_comfyui(root, cpu)
    return asyncio.run(_run(workflow, output_dir, models_dir, overrides, input_dir, log))


async def _run(workflow, output_dir, models_dir, overrides, input_dir, log) -> dict:
    import comfy.utils
    import execution
    import folder_paths

    await ensure_nodes()
    if models_dir is not None:
        added = add_model_folders(Path(models_dir))
        log(f"model folders from {models_dir}: {', '.join(added) or 'none'}")

    saved_dirs = folder_paths.get_output_directory(), folder_paths.get_input_directory()
    previous_hook, previous_pbar = comfy.utils.PROGRESS_BAR_HOOK, comfy.utils.PROGRESS_BAR_ENABLED
    try:
        if output_dir is not None:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            folder_paths.set_output_directory(str(Path(output_dir).resolve()))
        if input_dir is not None:
            Path(input_dir).mkdir(parents=True, exist_ok=True)
            folder_paths.set_input_directory(str(Path(input_dir).resolve()))

        types = {n["type"] for n in workflow.get("nodes", [])}
        schemas = live_schemas(types)
        prompt = apply_overrides(ui_to_api(workflow, schemas), overrides, schemas)
        copied = copy_example_inputs(prompt, Path(folder_paths.get_input_directory()))
        if copied:
            log(f"copied example inputs into {folder_paths.get_input_directory()}: {', '.join(copied)}")

        prompt_id = str(uuid.uuid4())
        ok, error, outputs, node_errors = await execution.validate_prompt(prompt_id, prompt, None)
        if not ok or node_errors:   # stricter than the server, which runs the outputs that did validate
            details = _format_node_errors(node_errors) or f"  {(error or {}).get('details', '')}"
            message = (error or {}).get("message", "some outputs failed validation")
            raise WorkflowError(f"validation failed: {message}\n{details}")

        def hook(value, total, preview=None, *args, **kwargs):
            log(f"  step {value}/{total}")

        comfy.utils.set_progress_bar_global_hook(hook)
        comfy.utils.set_progress_bar_enabled(False)   # the hook prints the steps; no tqdm bars
        stub = HeadlessServer(prompt, log)
        executor = execution.PromptExecutor(stub, cache_type=execution.CacheType.CLASSIC,
                                            cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})
        start = time.perf_counter()
        extra = {"client_id": "headless", "extra_pnginfo": {"workflow": workflow}}   # PNGs embed the workflow
        await executor.execute_async(prompt, prompt_id, extra, outputs)
        if not executor.success:
            for event, data in executor.status_messages:
                if event == "execution_error":
                    raise WorkflowError(
                        f"node {data.get('node_id')} ({data.get('node_type')}) failed: "
                        f"{data.get('exception_type')}: {data.get('exception_message')}\n"
                        + "".join(data.get("traceback") or []))
            raise WorkflowError("execution failed or was interrupted")
        log(f"done in {time.perf_counter() - start:.1f} s")
        result = executor.history_result["outputs"]
        out_root = Path(folder_paths.get_output_directory())
        for node_out in result.values():
            for item in node_out.get("images", []) or []:
                if item.get("type") == "output":
                    log(f"saved {out_root / item.get('subfolder', '') / item['filename']}")
        return result
    finally:
        comfy.utils.set_progress_bar_global_hook(previous_hook)
        comfy.utils.set_progress_bar_enabled(previous_pbar)
        folder_paths.set_output_directory(saved_dirs[0])
        folder_paths.set_input_directory(saved_dirs[1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Run a UI-format ComfyUI workflow headless, in-process.")
    parser.add_argument("workflow", help="UI-format workflow JSON (as saved by the ComfyUI frontend)")
    parser.add_argument("--comfyui", help="ComfyUI install (default: $COMFYUI_PATH)")
    parser.add_argument("--models", help="folder with model subfolders: checkpoints/, vae/, loras/, clip_vision/, ...")
    parser.add_argument("--output", help="output folder (default: ComfyUI's output/)")
    parser.add_argument("--input-dir", help="input folder LoadImage reads from (default: ComfyUI's input/)")
    parser.add_argument("--set", action="append", default=[], metavar="CLASS_TYPE.input=value",
                        help="override an input of every node of a class; value parsed as JSON when it can be "
                             "(repeatable), e.g. --set KSampler.steps=2")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even where CUDA is available")
    parser.add_argument("--verbose", action="store_true", help="show ComfyUI's INFO log")
    a = parser.parse_args(argv)

    import logging
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="%(message)s")
    try:
        run_workflow(a.workflow, a.comfyui, output_dir=a.output, models_dir=a.models, overrides=a.set,
                     input_dir=a.input_dir, log=lambda msg: print(msg, flush=True), cpu=a.cpu)
    except WorkflowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
