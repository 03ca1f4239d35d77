"""ComfyUI in this process for the world's command lines: its folder, CPU mode, PyTorch attention."""
from __future__ import annotations

import os
import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]


def comfyui_root(given: str | None, what: str) -> Path:
    """``given``, ``$COMFYUI_PATH``, or the ComfyUI the pack is installed in."""
    given = given or os.environ.get("COMFYUI_PATH")
    if not given and PACK_ROOT.parent.name == "custom_nodes":
        given = str(PACK_ROOT.parents[1])
    if not given:
        raise SystemExit(f"{what}: set COMFYUI_PATH or pass --comfyui /path/to/ComfyUI")
    root = Path(given).expanduser().resolve()
    if not (root / "comfy").is_dir():
        raise SystemExit(f"{what}: {root} is not a ComfyUI folder (no comfy/ inside)")
    return root


def setup_comfy(root: Path) -> None:
    """Import ComfyUI's core from ``root`` in CPU mode with PyTorch's attention (deterministic)."""
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from comfy.cli_args import args
    if "comfy.model_management" not in sys.modules:
        args.cpu = True
        args.use_pytorch_cross_attention = True
    args.disable_api_nodes = True
    import comfy.model_management
    import comfy.sd  # noqa: F401
