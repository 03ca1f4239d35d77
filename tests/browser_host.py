"""What the tests that drive ComfyUI's own frontend share: the server tool (``tools/check_node_help.py``,
its ``start_server`` / ``stop_server`` / ``main``), a free local port, and why a headless browser cannot
run here (None when it can)."""
from __future__ import annotations

import importlib.util
import shutil
import socket
import sys

from pack_paths import PACK_ROOT


def server_tool():
    """``tools/check_node_help.py``, imported once by file location."""
    name = "personalize_check_node_help"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, PACK_ROOT / "tools" / "check_node_help.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def browser_missing() -> str | None:
    if shutil.which("chromium") is None and shutil.which("chromium-browser") is None:
        return "chromium is not installed (apt-get install chromium chromium-driver)"
    if shutil.which("chromedriver") is None:
        return "chromedriver is not installed (apt-get install chromium-driver)"
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed (pip install selenium)"
    return None
