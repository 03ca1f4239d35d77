"""Shared in-process ComfyUI set-up for the integration tests.

ComfyUI can be imported only once per process, with ``args.cpu = True`` set before
``comfy.model_management`` is imported, and its node registry is global. Every integration test goes
through these functions, which do the work once and return the same answer afterwards.
"""
from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

from pack_paths import PACK_ROOT, comfyui_root

_nodes_ready = False


def init_comfyui() -> Path | None:
    """Put ComfyUI on ``sys.path``, force CPU mode and import its core modules. Returns the ComfyUI
    root, or None when no ComfyUI tree is found."""
    root = comfyui_root()
    if root is None:
        return None
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from comfy.cli_args import args
    if "comfy.model_management" not in sys.modules:
        args.cpu = True
        # PyTorch SDPA attention (ComfyUI's default on GPUs). ComfyUI's CPU default, sub-quadratic
        # attention, picks its chunk sizes from the free memory at each call, so two runs of the same
        # graph can differ in the last bits; equality tests need a deterministic kernel.
        args.use_pytorch_cross_attention = True
    args.disable_api_nodes = True
    import execution  # noqa: F401
    import folder_paths
    import nodes  # noqa: F401
    import server  # noqa: F401
    # Keep the tests from creating ComfyUI's user folder inside the ComfyUI tree.
    if not Path(folder_paths.get_user_directory()).is_dir():
        folder_paths.set_user_directory(tempfile.mkdtemp(prefix="comfy_user_"))
    # Nor its input folder: the pack copies its example images into the input folder when it loads.
    if Path(folder_paths.get_input_directory()).resolve() == (root / "input").resolve():
        folder_paths.set_input_directory(tempfile.mkdtemp(prefix="comfy_input_"))
    return root


def import_comfy():
    """``init_comfyui``, then ComfyUI's sampling and model-loading modules; returns the ``comfy``
    package."""
    init_comfyui()
    import comfy.sample
    import comfy.sd
    return comfy


def init_nodes_with_pack() -> Path | None:
    """``init_comfyui`` plus the built-in extra nodes and this pack, loaded the way ComfyUI loads a
    custom node folder. Returns the ComfyUI root, or None without ComfyUI."""
    global _nodes_ready
    root = init_comfyui()
    if root is None or _nodes_ready:
        return root
    import nodes
    import server

    async def _init():
        if getattr(server.PromptServer, "instance", None) is None:
            server.PromptServer(asyncio.get_running_loop())
        if "ImageToMask" not in nodes.NODE_CLASS_MAPPINGS:
            await nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False)
        if "PersonalizeReferenceEncode" not in nodes.NODE_CLASS_MAPPINGS:
            ok = await nodes.load_custom_node(str(PACK_ROOT), module_parent="custom_nodes")
            if not ok:
                raise RuntimeError(f"ComfyUI could not load the pack at {PACK_ROOT} (see the log above)")

    asyncio.run(_init())
    _nodes_ready = True
    return root
