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

``noise``: the Mean-Shifted Noise node's work: the latent shift once, then ``generate_noise`` against
the plain seeded noise it adds to.

``dc``: Detect-and-Compare per generated image (``--size`` px, two subjects with three reference photos
each): detection, crops + embedding, and the arithmetic, with random models of the real classes
(transformers' OWLv2, the pack's DreamSim ensemble). ``--dc-models tiny`` (default) uses the test
suite's tiny models (64 px OWLv2, 64-wide one-block DreamSim ViTs); ``--dc-models base`` builds both at
the published sizes (OWLv2 base-patch16 at 960 px, three ViT-B/16), random weights, so the time is
that of the real files. Needs transformers.

One JSON object per line on stdout; progress on stderr. See bench/README.md.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from harness import PACK_ROOT, emit, import_pack, log  # bench/ is on sys.path when a benchmark runs

INPUTS = PACK_ROOT / "workflows" / "inputs"
PHOTOS = ("personalize_cat_04", "personalize_dog6_02")

PARTS = ("composer", "noise", "dc")


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
            run = lambda seed: compose_subjects(subjects, opts.size, opts.size, placement, 0.75, 1.0, 0.0,
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
    plain = lambda lat, seed: torch.randn(lat["samples"].shape, generator=torch.Generator().manual_seed(seed))
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
        med = lambda xs: round(1000 * statistics.median(xs), 3)
        emit({"part": "noise", "subjects": n, "size": opts.size, "latent": [4, h, w], "shift_ms": med(shift_t),
              "generate_ms": med(gen_t), "plain_noise_ms": med(base_t),
              "generate_vs_plain": round(statistics.median(gen_t) / statistics.median(base_t), 3),
              "repeats": opts.repeats})
        log(f"noise N={n}: shift {med(shift_t)} ms, generate {med(gen_t)} ms (plain noise {med(base_t)} ms)")


# =========================================================================== Detect-and-Compare

def build_base_owlv2(folder: Path) -> Path:
    """OWLv2 base-patch16 (transformers' default Owlv2Config: 960 px, patch 16, ViT-B) with random
    weights and the tiny test tokenizer (the tokenizer does not change the model's cost)."""
    from tiny_owl import write_tokenizer_files
    from transformers import CLIPTokenizer, Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    folder.mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer_files(folder)
    tok = CLIPTokenizer.from_pretrained(str(folder), pad_token="!", model_max_length=16)
    ids = tok.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>", "!"])
    cfg = Owlv2Config(text_config=dict(vocab_size=vocab, bos_token_id=ids[0], eos_token_id=ids[1], pad_token_id=ids[2]),
                      vision_config=dict(image_size=960))                # the released model's input size
    Owlv2ForObjectDetection(cfg).save_pretrained(folder)
    Owlv2Processor(image_processor=Owlv2ImageProcessor(), tokenizer=tok).save_pretrained(folder)
    return folder


def bench_dc(opts) -> None:
    import tempfile

    import_pack()
    from personalize_pack.metrics import detect_compare as dc
    from personalize_pack.metrics.dreamsim import load_dreamsim
    from personalize_pack.metrics.owl import load_owlv2
    from tiny_dreamsim import build_tiny_dreamsim
    from tiny_owl import build_tiny_owlv2

    tmp = Path(tempfile.mkdtemp(prefix="bench_dc_"))
    if opts.dc_models == "base":
        owl_dir, ds_dir = build_base_owlv2(tmp / "owl"), build_tiny_dreamsim(tmp / "ds", width=768, depth=12, rank=16)
    else:
        owl_dir, ds_dir = build_tiny_owlv2(tmp / "owl"), build_tiny_dreamsim(tmp / "ds")
    dev = torch.device(opts.device)
    detector, embedder = load_owlv2(owl_dir).to(dev), load_dreamsim(ds_dir).to(dev)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    load = lambda p, s: torch.from_numpy(np.asarray(Image.open(p).convert("RGB").resize((s, s))).astype("float32") / 255)
    refs_imgs = [[load(INPUTS / f"{stem}.jpg", 512)] * 3 for stem in PHOTOS]
    t = time.perf_counter()
    refs = [embedder.embed(r) for r in refs_imgs]
    ref_s = time.perf_counter() - t
    queries = ["cat", "dog"]
    image = load(INPUTS / "personalize_mip_2_cat.jpg", opts.size)
    # detection at MuDI's demo threshold; the embedding and the arithmetic on the two best boxes (as if
    # the detector had found exactly one box per subject, the case where all three steps run)
    top = sorted(detector.detect(image, queries, 0.0), key=lambda d: -d.score)[:2]
    crops = dc.crop_boxes(image, [d.box for d in top])
    det_t, emb_t, math_t, total_t = [], [], [], []
    for _ in range(max(2, opts.repeats // 4) + 1):
        sync()
        t0 = time.perf_counter()
        dets = detector.detect(image, queries, 0.4)
        sync()
        t1 = time.perf_counter()
        boxes = embedder.embed(dc.crop_boxes(image, [d.box for d in top]))
        sync()
        t2 = time.perf_counter()
        result = dc.detect_and_compare(boxes, refs)
        t3 = time.perf_counter()
        det_t.append(t1 - t0), emb_t.append(t2 - t1), math_t.append(t3 - t2), total_t.append(t3 - t0)
    det_t, emb_t, math_t, total_t = (x[1:] for x in (det_t, emb_t, math_t, total_t))       # first run: warm-up
    med = lambda xs: round(1000 * statistics.median(xs), 2)
    emit({"part": "dc", "models": opts.dc_models, "device": str(dev), "size": opts.size, "subjects": 2, "references": 6,
          "boxes_at_0.4": len(dets), "boxes_embedded": len(crops), "score": round(result.score, 4), "detect_ms": med(det_t), "embed_boxes_ms": med(emb_t),
          "arithmetic_ms": med(math_t), "per_image_ms": med(total_t), "references_once_ms": round(1000 * ref_s, 1),
          "repeats": len(total_t)})
    log(f"dc ({opts.dc_models}): {med(total_t)} ms per image (detect {med(det_t)}, embed {med(emb_t)}, "
        f"arithmetic {med(math_t)}); references once {1000 * ref_s:.0f} ms")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=PARTS, default=None, help="run one part only")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--size", type=int, default=1024, help="canvas side in pixels")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--device", default="cpu", help="dc: where the detector and embedder run (cpu, cuda)")
    ap.add_argument("--dc-models", choices=("tiny", "base"), default="tiny",
                    help="dc: the test suite's tiny models, or random models at the published sizes")
    opts = ap.parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    emit({"part": "env", "torch": torch.__version__, "threads": torch.get_num_threads(),
          "cpu": platform.processor() or platform.machine(), "python": platform.python_version()})
    for part in PARTS:
        if opts.only in (None, part):
            {"composer": bench_composer, "noise": bench_noise, "dc": bench_dc}[part](opts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
