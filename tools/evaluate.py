#!/usr/bin/env python
"""Score a folder of generated images against a benchmark description: CLIP-T, CLIP-I, DINO and
Detect-and-Compare per image into a CSV, and a summary table per case (metrics/cli.py).

    python tools/evaluate.py /path/to/cases.json --images out/ --models ComfyUI/models/personalize_eval \\
        [--cases cat_and_dog,dog_and_teapot] [--metrics clip_t,clip_i,dino,dnc] [--device cuda] \\
        [--out results.csv] [--summary summary.md]

Generated images of case N: ``out/N/*.png``, ``out/N.png`` or ``out/N_*.png`` (.jpg, .jpeg, .webp too).
Needs torch and Pillow (open_clip_torch for CLIP-T / CLIP-I); ComfyUI is not needed. Exit status 0 on
success, 1 on an evaluation error, 2 on bad arguments.

Infusion's overfitting metrics (LFD and W2, metrics/overfitting_cli.py) of a customised model against
its base checkpoint, with ComfyUI run in-process (use ComfyUI's Python)::

    python tools/evaluate.py overfitting --comfyui /path/to/ComfyUI --checkpoint sd15.safetensors \
        --lora my_lora.safetensors | --infusion cat.safetensors --concept-word cat \
        --prompts-without prompts_without.txt --prompts-with prompts_with.txt \
        [--eval-model open_clip_pytorch_model.bin] [--levels 8] [--samples 4] [--steps 20] [--size 512] \
        [--seed 0] [--out report.json]
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pack_import import import_pack


def main(argv=None) -> int:
    import_pack()
    from personalize_pack.metrics.cli import main as evaluate_main
    return evaluate_main(argv)


if __name__ == "__main__":
    sys.exit(main())
