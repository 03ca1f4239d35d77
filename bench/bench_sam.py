#!/usr/bin/env python
"""Time the pack's SAM Mask node per image on the CPU with the ViT-B layout.

    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_sam.py [--repeats 3] [--threads N]

The network is segment_anything's own ``sam_model_registry["vit_b"]()`` with random weights (the
official file cannot be downloaded here; the cost does not depend on the weights), saved to a
temporary ``sams`` folder as ``sam_vit_b_01ec64.pth`` and loaded by the SAM Model Loader node. The
image is the shipped 512x512 ``personalize_dog6_02.jpg``. Timed per image, after one warm-up:

* the SAM Mask node (``execute``) with a box prompt and with a single point (best of 3);
* the encoder alone (pre-processing + ViT-B at 1024x1024), the part every mode pays;
* the "largest object" mode (an 8x8 grid of point prompts, 64 decoder prompts) through the library
  function with its confidence filters off: random weights are never confident, so the node would
  stop with its "no confident object" error after doing the same work.

Without ComfyUI the node rows are skipped and the library function is timed instead. One JSON object
per line on stdout; progress on stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from harness import PACK_ROOT, import_pack, log, timed_runs  # bench/ is on sys.path when a benchmark runs

IMAGE = PACK_ROOT / "workflows" / "inputs" / "personalize_dog6_02.jpg"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI tree (default $COMFYUI_PATH)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from PIL import Image
    from segment_anything import sam_model_registry

    image = torch.from_numpy(np.asarray(Image.open(IMAGE).convert("RGB")).astype("float32") / 255.0)[None]
    tmp = Path(tempfile.mkdtemp(prefix="bench_sam_"))
    sams = tmp / "sams"
    sams.mkdir()
    torch.manual_seed(0)
    path = sams / "sam_vit_b_01ec64.pth"
    torch.save(sam_model_registry["vit_b"]().state_dict(), path)
    log(f"random ViT-B saved to {path} ({path.stat().st_size / 2**20:.0f} MiB)")
    base = {"device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__, "model": "vit_b (random)",
            "image_px": list(image.shape[1:3]), "encoder_input_px": 1024, "repeats": a.repeats}

    try:
        if a.comfyui:
            sys.path.insert(0, str(Path(a.comfyui).resolve()))
            from comfy.cli_args import args
            args.cpu = True
            import asyncio

            import run_workflow as rw
            rw.import_comfyui(Path(a.comfyui).resolve(), cpu=True)
            asyncio.run(rw.ensure_nodes())
            import folder_paths
            import nodes
            folder_paths.add_model_folder_path("sams", str(sams))
            loader = nodes.NODE_CLASS_MAPPINGS["PersonalizeSAMModelLoader"]
            node = nodes.NODE_CLASS_MAPPINGS["PersonalizeSAMMask"]
            t = time.perf_counter()
            sam = loader.execute(path.name, "auto").result[0]
            load_s = time.perf_counter() - t
            print(json.dumps({**base, "what": "SAM Model Loader (read, check, build)", "seconds": round(load_s, 3)}))
            common = dict(negative_points="", units="pixels", threshold=0.0, grid=8, min_confidence=0.88)
            for label, kw in (("box", dict(mode="box", points="", box="80,0,420,512", multimask="auto")),
                              ("point, best of 3", dict(mode="points", points="245,300", box="", multimask="auto"))):
                med, runs = timed_runs(lambda kw=kw: node.execute(sam, image, **kw, **common), a.repeats)
                log(f"SAM Mask node, {label}: {med:.2f} s per image")
                print(json.dumps({**base, "what": f"SAM Mask node, {label}", "seconds_per_image": round(med, 3),
                                  "runs": [round(r, 3) for r in runs]}))
            S = sys.modules[type(sam).__module__.rsplit(".", 1)[0] + ".sam"]   # the references/sam.py ComfyUI loaded
        else:
            import_pack()
            from personalize_pack.references import sam as S
            from personalize_pack.references.sam_checkpoint import load_sam
            t = time.perf_counter()
            sam = load_sam(path)
            print(json.dumps({**base, "what": "load_sam (read, check, build)",
                              "seconds": round(time.perf_counter() - t, 3)}))
            for label, prompts in (("box", S.make_prompts("box", box="80,0,420,512", height=512, width=512)),
                                   ("point, best of 3", S.make_prompts("points", "245,300", height=512, width=512))):
                med, runs = timed_runs(lambda p=prompts: S.segment_image(sam, image[0], p), a.repeats)
                log(f"segment_image, {label}: {med:.2f} s per image")
                print(json.dumps({**base, "what": f"segment_image, {label}", "seconds_per_image": round(med, 3),
                                  "runs": [round(r, 3) for r in runs]}))

        med, runs = timed_runs(lambda: S.encode_image(sam, image[0]), a.repeats)
        log(f"encoder alone: {med:.2f} s per image")
        print(json.dumps({**base, "what": "encoder alone (pre-processing + ViT-B)", "seconds_per_image": round(med, 3),
                          "runs": [round(r, 3) for r in runs]}))
        largest = S.make_prompts("largest object")
        med, runs = timed_runs(lambda: S.segment_image(sam, image[0], largest, grid=8, min_iou=-1e9, min_stability=0.0,
                                                  max_borders=4), a.repeats)
        log(f"largest object (8x8 grid): {med:.2f} s per image")
        print(json.dumps({**base, "what": "largest object, 8x8 grid (library, filters off)",
                          "seconds_per_image": round(med, 3), "runs": [round(r, 3) for r in runs]}))
    finally:
        path.unlink(missing_ok=True)
        sams.rmdir()
        tmp.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
