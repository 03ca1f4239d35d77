#!/usr/bin/env python
"""Speed of the pack's MuDI parts on the CPU (torch only; ComfyUI is not needed).

    python bench/bench_mudi.py [--only composer] [--repeats 20] [--threads N] [--size 1024]

``composer``: ``compose_subjects`` (the Subject Composer node's work) for 2, 3, 4 and 5 subjects on a
``size x size`` canvas with Seg-Mix's defaults (scales 0.75-1.0 of the largest that fits, margin 32,
white background), for both placements (``random`` with ``max_overlap`` 0, the rejection sampler's
worst case, and ``left to right``). The subjects are the shipped 512x512 masked photos (cat, dog, cat,
dog, ...), checked once by ``make_subject`` outside the timing. Each row: median and min of
``--repeats`` runs after one warm-up, with a new seed per run (so the layouts, and the rejection
sampler's number of tries, differ between runs).

``noise``: reserved for the Mean-Shifted Noise node (not written yet).

One JSON object per line on stdout; progress on stderr. See bench/README.md.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

PACK_ROOT = Path(__file__).resolve().parents[1]
INPUTS = PACK_ROOT / "workflows" / "inputs"
PHOTOS = ("personalize_cat_04", "personalize_dog6_02")
sys.path.insert(0, str(PACK_ROOT / "tests"))
from conftest import import_pack  # noqa: E402  (the pack under a valid module name, as the tests do)

PARTS = ("composer", "noise")


def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def load_subjects(make_subject):
    out = []
    for stem in PHOTOS:
        img = np.asarray(Image.open(INPUTS / f"{stem}.jpg").convert("RGB")).astype("float32") / 255
        msk = np.asarray(Image.open(INPUTS / f"{stem}_mask.jpg").convert("L")).astype("float32") / 255
        out.append(make_subject(torch.from_numpy(img), torch.from_numpy(msk), stem.split("_")[1]))
    return out


# =========================================================================== composer

def bench_composer(opts) -> None:
    import_pack()
    from personalize_pack.references.compose import compose_subjects, make_subject

    photos = load_subjects(make_subject)
    for placement in ("random", "left to right"):
        for n in (2, 3, 4, 5):
            subjects = [photos[i % len(photos)] for i in range(n)]
            run = lambda seed: compose_subjects(subjects, opts.size, opts.size, placement, 0.75, 1.0, 0.0,  # noqa: E731
                                                "white", seed, 32)
            run(10_000)                                         # warm-up
            times = []
            for seed in range(opts.repeats):
                t = time.perf_counter()
                run(seed)
                times.append(time.perf_counter() - t)
            emit({"part": "composer", "placement": placement, "subjects": n, "size": opts.size,
                  "median_ms": round(1000 * statistics.median(times), 2), "min_ms": round(1000 * min(times), 2),
                  "repeats": opts.repeats})
            log(f"composer {placement} N={n}: {1000 * statistics.median(times):.1f} ms")


# =========================================================================== noise

def bench_noise(opts) -> None:
    """The Mean-Shifted Noise node's work per sampling run: the shift (mask union, area resize,
    background mean) once, then generate_noise for a 1024 px SDXL latent (4 x 128 x 128) against the
    plain seeded noise it adds to, for 2-5 subjects (the mask count changes only the union)."""
    import_pack()
    from personalize_pack.references.compose import compose_subjects, make_subject
    from personalize_pack.references.init_noise import MeanShiftedNoise, shift_latent

    photos = load_subjects(make_subject)
    h = w = opts.size // 8
    plain = lambda lat, seed: torch.randn(lat["samples"].shape, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    lat = {"samples": torch.zeros(1, 4, h, w)}
    z = torch.randn(1, 4, h, w)
    for n in (2, 3, 4, 5):
        masks = compose_subjects([photos[i % len(photos)] for i in range(n)], opts.size, opts.size, "left to right",
                                 0.75, 1.0, 0.0, "white", 0, 32).masks
        shift_t, gen_t, base_t = [], [], []
        for seed in range(opts.repeats):
            t = time.perf_counter()
            s = shift_latent(z, masks)
            shift_t.append(time.perf_counter() - t)
            noise = MeanShiftedNoise(seed, s, 1.0, 14.6, plain)
            t = time.perf_counter()
            noise.generate_noise(lat)
            gen_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            plain(lat, seed)
            base_t.append(time.perf_counter() - t)
        med = lambda xs: round(1000 * statistics.median(xs), 3)  # noqa: E731
        emit({"part": "noise", "subjects": n, "size": opts.size, "latent": [4, h, w], "shift_ms": med(shift_t),
              "generate_ms": med(gen_t), "plain_noise_ms": med(base_t),
              "generate_vs_plain": round(statistics.median(gen_t) / statistics.median(base_t), 3),
              "repeats": opts.repeats})
        log(f"noise N={n}: shift {med(shift_t)} ms, generate {med(gen_t)} ms (plain noise {med(base_t)} ms)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=PARTS, default=None, help="run one part only")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--size", type=int, default=1024, help="canvas side in pixels")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    opts = ap.parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    emit({"part": "env", "torch": torch.__version__, "threads": torch.get_num_threads(),
          "cpu": platform.processor() or platform.machine(), "python": platform.python_version()})
    for part in PARTS:
        if opts.only in (None, part):
            {"composer": bench_composer, "noise": bench_noise}[part](opts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
