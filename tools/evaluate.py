#!/usr/bin/env python
"""Score a folder of generated images against a benchmark description: CLIP-T, CLIP-I, DINO and
Detect-and-Compare per image into a CSV, and a summary table per case (metrics/evaluate.py).

    python tools/evaluate.py /path/to/cases.json --images out/ --models ComfyUI/models/personalize_eval \\
        [--cases cat_and_dog,dog_and_teapot] [--metrics clip_t,clip_i,dino,dnc] [--device cuda] \\
        [--out results.csv] [--summary summary.md]

Generated images of case N: ``out/N/*.png``, ``out/N.png`` or ``out/N_*.png`` (.jpg, .jpeg, .webp too).
Needs torch and Pillow (open_clip_torch for CLIP-T / CLIP-I); ComfyUI is not needed. Exit status 0 on
success, 1 on an evaluation error, 2 on bad arguments.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = "personalize_pack"


def import_pack():
    """The pack imported by file location under a valid module name (its folder may contain '-', and
    the pack root is never put on sys.path: ComfyUI has a top-level ``nodes`` module)."""
    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    spec = importlib.util.spec_from_file_location(PACK_NAME, PACK_ROOT / "__init__.py",
                                                  submodule_search_locations=[str(PACK_ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> int:
    import_pack()
    from personalize_pack.metrics.evaluate import main as evaluate_main
    return evaluate_main(argv)


if __name__ == "__main__":
    sys.exit(main())
