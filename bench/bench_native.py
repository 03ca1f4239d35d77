#!/usr/bin/env python3
"""What native reference control costs: the controlled model's step time ÷ the native multi-reference
step time, on small random FLUX.2 and Qwen-Image models, and the memory of one controlled attention
call ÷ the native call. Every ratio comes from measurements taken in this run. Output: one JSON object
per line on stdout (progress on stderr), closed by a ``summary`` line. See bench/README.md.

    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_native.py                   # full run (~15 min, 2 cores)
    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_native.py --size 16 --steps 3 --repeats 1   # smoke test

Models (random weights, fp32, built from ComfyUI's classes as the tests build them, ``tests/tiny_native.py``):
FLUX.2 with ``--heads`` heads of 128 channels (4: hidden 512), 2 double and 4 single blocks, loaded from a
file as Load Diffusion Model does; Qwen-Image with ``--heads`` heads of 64 channels, 4 blocks, built
in-process. The target latent is ``--size`` tokens a side (FLUX.2: 128-channel latents, patch 1; Qwen:
16-channel latents, patch 2, so twice the size in latent pixels); ``--refs`` references of the same size,
chained as ReferenceLatent / TextEncodeQwenImageEditPlus chain them. Random text: 512 tokens on FLUX.2
(its own padding), 64 on Qwen. CFG 1 (the cond pass only, as FLUX.2 klein and Qwen-Image-Edit
lightning run).

Variants, per family: ``native`` (the unpatched model, references as they are), ``neutral`` (Native
Reference Control with no masks, weight 1, no regions: the hook machinery alone), ``masked`` (every
reference with a subject mask covering about half of it and a weight, 1.5 and 0.7) and ``regions``
(the same plus a target region per reference: left half / right half, two people in one image). Runs are
interleaved, the first step of every run is skipped, medians of the step times are compared. Target:
``regions`` and ``masked`` ≤ 1.05 × ``native``.

Memory: one attention call at the full run's layout (heads × 128 channels, the text, the target and the
references' tokens), ComfyUI's attention function alone versus the same call through the control
(``regions`` controls): the peak of the live bytes each allocates (output included), by the torch
profiler's allocation events.
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import harness as hr  # bench/ is on sys.path when a benchmark runs (harness puts tests/ there too)
from harness import emit, log, median, rnd

TARGET = 1.05
FAMILIES = ("flux2", "qwen")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfyui", help="ComfyUI folder (default: $COMFYUI_PATH)")
    ap.add_argument("--families", type=hr.csv_choice(FAMILIES), default=list(FAMILIES))
    ap.add_argument("--size", type=int, default=32, help="target tokens per side (default 32: 1024 image tokens)")
    ap.add_argument("--refs", type=int, default=2, help="reference images (default 2)")
    ap.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    ap.add_argument("--steps", type=int, default=5, help="steps per run, the first skipped (default 5)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of interleaved runs (default 3)")
    ap.add_argument("--only", choices=("speed", "memory"), help="run one part")
    return ap.parse_args(argv)


# =========================================================================== models and inputs

def flux2_family(opts, folder: Path) -> dict:
    import torch
    import comfy.sd
    from tiny_native import FLUX2_TEXT, build_flux2
    path = build_flux2(folder / "bench_flux2.safetensors", heads=opts.heads, depth=2, single=4)
    model = comfy.sd.load_diffusion_model(str(path), model_options={"dtype": torch.float32})
    return dict(model=model, channels=128, patch=1, text=FLUX2_TEXT, text_tokens=512, dims=2)


def qwen_family(opts, folder: Path) -> dict:
    import comfy.model_patcher
    import comfy.supported_models
    import torch
    from tiny_models import random_state
    from tiny_native import QWEN_TEXT, qwen_config
    cfg = dict(qwen_config(opts.heads, 4), attention_head_dim=64, axes_dims_rope=(16, 24, 24))
    config = comfy.supported_models.QwenImage(cfg)
    config.set_inference_dtype(torch.float32, None)
    base = config.get_model({}, device=torch.device("cpu"))
    sd = random_state(base.diffusion_model, "", torch.Generator().manual_seed(0))
    base.diffusion_model.load_state_dict({k: v.float() for k, v in sd.items()})
    model = comfy.model_patcher.ModelPatcher(base, torch.device("cpu"), torch.device("cpu"))
    return dict(model=model, channels=16, patch=2, text=QWEN_TEXT, text_tokens=64, dims=3)


def latent(fam, side: int, seed: int):
    import torch
    shape = (1, fam["channels"]) + ((1,) if fam["dims"] == 3 else ()) + (side * fam["patch"],) * 2
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def conditioning(fam, refs, seed: int):
    import torch
    import node_helpers
    ctx = torch.randn(1, fam["text_tokens"], fam["text"], generator=torch.Generator().manual_seed(seed))
    return node_helpers.conditioning_set_values([[ctx, {}]], {"reference_latents": list(refs)}, append=True)


def controls(opts, side: int, kind: str):
    import torch
    from personalize_pack.attention.native_refs import ReferenceControl
    out = []
    for r in range(opts.refs):
        if kind == "neutral":
            out.append(ReferenceControl())
            continue
        mask = torch.zeros(side * 8, side * 8)
        mask[side * 2: side * 6, side * 2: side * 6] = 1.0       # a centred box, a quarter of the reference
        mask[: side * 8, side * 3: side * 5] = 1.0               # and a band: about half in all
        region = None
        if kind == "regions":
            region = torch.zeros(side * 8, side * 8)
            half = side * 4
            region[:, (r % 2) * half:(r % 2 + 1) * half] = 1.0  # left half, right half, ...
        out.append(ReferenceControl(mask, (1.5, 0.7)[r % 2], region))
    return tuple(out)


# =========================================================================== speed

def sample_steps(model, fam, opts, cond, seed: int) -> list[float]:
    import torch
    import comfy.sample
    lat = torch.zeros_like(latent(fam, opts.size, 0))
    noise = comfy.sample.prepare_noise(lat, seed)
    stamps = []
    t0 = time.perf_counter()
    out = comfy.sample.sample(model, noise, opts.steps, 1.0, "euler", "simple", cond, cond, lat, disable_pbar=True,
                              seed=seed, callback=lambda i, x0, x, total: stamps.append(time.perf_counter()))
    if not torch.isfinite(out).all():
        raise RuntimeError("sampling produced non-finite values")
    marks = [t0] + stamps
    return [b - a for a, b in zip(marks, marks[1:])][1:]


def run_speed(opts, name: str, fam: dict) -> dict:
    from personalize_pack.nodes.native_refs import NativeReferenceControlNode
    refs = [latent(fam, opts.size, 10 + r) for r in range(opts.refs)]
    cond = conditioning(fam, refs, 1)
    models = {"native": fam["model"]}
    for kind in ("neutral", "masked", "regions"):
        models[kind] = NativeReferenceControlNode.execute(fam["model"], controls(opts, opts.size, kind)).result[0]
    steps = {k: [] for k in models}
    names = list(models)
    for rnd_i in range(opts.repeats + 1):                    # round 0 warms every variant up
        for k in (names if rnd_i % 2 == 0 else names[::-1]):
            got = sample_steps(models[k], fam, opts, cond, 3)
            if rnd_i:
                steps[k].extend(got)
        log(f"{name}: round {rnd_i} done")
    med = {k: median(v) for k, v in steps.items()}
    row = {"kind": "speed", "family": name, "tokens": {"text": fam["text_tokens"], "image": opts.size ** 2,
                                                         "references": opts.refs * opts.size ** 2},
           "step_s": {k: rnd(v) for k, v in med.items()},
           "ratio": {k: rnd(med[k] / med["native"]) for k in models if k != "native"},
           "steps_counted": {k: len(v) for k, v in steps.items()}}
    emit(row)
    return row


# =========================================================================== memory

def run_memory(opts) -> dict:
    import torch
    from comfy.ldm.modules.attention import optimized_attention
    from personalize_pack.attention.families import DiTSpec
    from personalize_pack.attention.kernels import Rope
    from personalize_pack.attention.native_refs import REF_GRIDS_KEY, NativeReferenceControl
    from personalize_pack.attention.patch import LATENT_KEY, SigmaRange

    side, T, h = opts.size, 512, opts.heads
    N = side * side
    L = T + N * (1 + opts.refs)
    spec = DiTSpec("flux", 1, 0, 1, Rope(2000.0, (32, 32, 32, 32)))
    tech = NativeReferenceControl(controls(opts, side, "regions"), spec, spec.keys(), SigmaRange(1e9, 0.0))
    opts_call = {"reference_image_num_tokens": [N] * opts.refs, LATENT_KEY: (side, side),
                 REF_GRIDS_KEY: [(side, side)] * opts.refs, "cond_or_uncond": [0]}
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, L, 128, generator=g) for _ in range(3))
    override = tech.override(None, T)

    def native():
        return optimized_attention(q, k, v, h, skip_reshape=True)

    def controlled():
        return override(optimized_attention, q, k, v, h, skip_reshape=True, transformer_options=opts_call)

    controlled()                                          # the plan is built once per layout, then kept
    a, b = hr.tracked_peak(native), hr.tracked_peak(controlled)
    row = {"kind": "memory", "tokens": L, "heads": h, "native_peak_mib": rnd(a["peak_bytes"] / 2**20, 2),
           "controlled_peak_mib": rnd(b["peak_bytes"] / 2**20, 2),
           "ratio": rnd(b["peak_bytes"] / max(1, a["peak_bytes"])), "valid": a["valid"] and b["valid"],
           "inputs_mib": rnd(3 * q.numel() * 4 / 2**20, 2)}
    emit(row)
    return row


def main(argv=None) -> int:
    opts = parse_args(argv)
    t0 = time.perf_counter()
    hr.setup_comfy(hr.comfyui_path(opts, "bench_native"), "pytorch")
    hr.import_pack()
    import torch
    emit({"kind": "setup", "python": platform.python_version(), "torch": torch.__version__,
          "threads": torch.get_num_threads(), "options": vars(opts)})
    checks, extra = {}, {}
    full = opts.size >= 32 and opts.steps >= 4 and opts.repeats >= 2
    if opts.only != "memory":
        with tempfile.TemporaryDirectory() as folder:
            for name in opts.families:
                fam = (flux2_family if name == "flux2" else qwen_family)(opts, Path(folder))
                row = run_speed(opts, name, fam)
                worst = max(row["ratio"]["masked"], row["ratio"]["regions"])
                checks[f"{name}_step_ratio"] = {"value": worst, "target": TARGET, "met": worst <= TARGET,
                                                "applies": full}
    if opts.only != "speed":
        extra["attention_memory_ratio"] = run_memory(opts)["ratio"]        # reported, no target
    hr.emit_summary(checks, t0, "smoke-test size: the step ratios are defined for --size 32 or more, 4+ steps, "
                                "2+ repeats", **extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
