#!/usr/bin/env python3
"""Speed and memory benchmark of the pack's FreeCustom multi-reference self-attention (MRSA).

Every ratio this script prints is computed from measurements taken in the same run; nothing is
copied from docs/performance-anchors.md. Output: one JSON object per line on stdout (progress goes
to stderr). See bench/README.md for what each line means and the targets.

    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_mrsa.py                 # full run
    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_mrsa.py --layout small --size 64 --steps 3 \
        --refs 2 --batches 1 --repeats 1                                     # smoke test
    python bench/bench_mrsa.py --only memory                                 # no ComfyUI needed

Speed: an SD1.5-shaped UNet with random weights (the real SD1.5 layout, 860M parameters, or a
cheaper "small" layout with the same attention block ids) is built in memory and loaded through
``comfy.sd.load_diffusion_model_state_dict``. ``comfy.sample.sample`` (euler, CFG 7) runs with a
callback that timestamps every step; a run's step times are the gaps between callbacks, the first
step (model loading, warm-up) is skipped. Per batch size B the runs are

* ``plain``: the unpatched model at batch B (UNet calls of batch 2B);
* ``ours``: the model patched with the pack's MRSA and R references at batch B (the references
  ride in the target's UNet call: batch 2B+R);
* ``freecustom_lb``: the unpatched model at batch B(1+R) (UNet calls of batch 2B(1+R)): FreeCustom's
  layout, every reference in both CFG halves of every image, *without* its attention overhead, so
  a lower bound of its cost and the speed-up over it is conservative.

Runs are interleaved (every variant once per round, the order reversed on every other round) and a
forward pre-hook on the UNet records the batch size of every UNet call, so the layout is checked,
not assumed.

Memory: one attn1 replace call in the joint layout (q, k, v of shape [1+R, N, 320], row 0 the
target's cond row, rows 1..R the references, 8 heads, fp32, all-ones masks: every reference token
selected) through the pack's ``PersonalizeAttention`` + ``MultiReferenceAttention``, against plain
``scaled_dot_product_attention`` on the same q, k, v. Each case runs in a fresh subprocess and is
measured twice: by the torch profiler's allocation events (peak of live bytes, exact) and by the
process's peak RSS (what the OS saw).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import harness as hr  # bench/ is on sys.path when a benchmark runs
from harness import emit, log, median, rnd

# Targets (see bench/README.md).
TARGET_STEP_RATIO = {1: 1.75, 4: 1.40}          # ours ÷ plain at R=2
TARGET_SPEEDUP = {1: 1.25, 4: 2.2}              # FreeCustom layout ÷ ours at R=2
TARGET_MEMORY_RATIO = 2.0                       # MRSA call ÷ plain call, peak memory

PRESET = "SD1.5 FreeCustom (output 6-11)"


# =========================================================================== speed

def run_speed(opts) -> dict:
    import torch

    hr.setup_comfy(hr.comfyui_path(opts, "speed benchmark", " (or run --only memory, which needs torch alone)"),
                  opts.attention)
    import comfy.ldm.modules.attention as comfy_attention
    hr.import_pack()
    from personalize_pack.attention.blocks import resolve_layers
    from personalize_pack.attention.install import install_technique
    from personalize_pack.attention.mrsa import MultiReferenceAttention
    from personalize_pack.attention.patch import SigmaRange

    hw = hr.latent_hw(opts.size)
    model, blocks, build_s, load_s = hr.load_sd15_unet(opts.layout)
    dm = model.model.diffusion_model
    keys = resolve_layers(PRESET, "", blocks)
    params = sum(p.numel() for p in dm.parameters())
    emit({"kind": "setup", "layout": opts.layout, "unet_params": params,
          "model_type": type(model.model).__name__, "model_config": type(model.model.model_config).__name__,
          "dtype": str(next(dm.parameters()).dtype), "attention": comfy_attention.optimized_attention.__name__,
          "attention_blocks": [f"{n}:{i}" for n, i in sorted(blocks)], "patched": [f"{n}:{i}.{j}" for n, i, j in keys],
          "size_px": opts.size, "latent": list(hw), "steps": opts.steps, "repeats": opts.repeats,
          "sampler": "euler", "scheduler": "normal", "cfg": 7.0, "mask": opts.mask,
          "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
          "machine": platform.machine(), "build_s": rnd(build_s, 1), "load_s": rnd(load_s, 1)})

    probe = hr.BatchProbe(dm)
    g = torch.Generator().manual_seed(0)
    cond = ([[torch.randn(1, 77, 768, generator=g), {}]], [[torch.randn(1, 77, 768, generator=g), {}]])
    if opts.only == "floor":
        return {"floor": hr.run_floor(model, opts, hw, cond)}
    sigmas = SigmaRange.from_percents(model.model.model_sampling, 0.0, 1.0)
    patched = {R: install_technique(model, MultiReferenceAttention(hr.make_references(R, hw, opts.mask), keys,
                                                                   sigmas, 1.0, 0))
               for R in opts.refs}

    # Warm-up (not recorded): the first sampling runs of a process are slower than the rest.
    for m in (model, patched[max(opts.refs)]):
        hr.sample_once(m, min(opts.batches), hw, 2, cond, probe, seed=999)
    log("warm-up done")

    results = []
    for B in opts.batches:
        variants = [("plain", 0)] + [("ours", R) for R in opts.refs] + [("freecustom_lb", R) for R in opts.refs]
        times = {v: [] for v in variants}                 # pooled over rounds
        per_round = {v: [] for v in variants}             # median per round
        unet_batches = {v: set() for v in variants}
        for rnd_i in range(opts.repeats):
            order = variants if rnd_i % 2 == 0 else variants[::-1]
            for v in order:
                name, R = v
                m = patched[R] if name == "ours" else model
                n = B * (1 + R) if name == "freecustom_lb" else B
                steps, batches = hr.sample_once(m, n, hw, opts.steps, cond, probe, seed=1000 + rnd_i)
                kept = steps[1:]
                times[v].extend(kept)
                per_round[v].append(median(kept))
                unet_batches[v].update(batches)
                log(f"B={B} round {rnd_i + 1}/{opts.repeats} {name} R={R}: latent batch {n}, UNet calls of "
                    f"batch {batches}, median step {median(kept):.3f} s (first {steps[0]:.2f} s)")
        plain = median(times[("plain", 0)])
        plain_rounds = per_round[("plain", 0)]
        emit({"kind": "step", "variant": "plain", "batch": B, "refs": 0,
              "unet_batch": sorted(unet_batches[("plain", 0)]),
              "median_step_s": rnd(plain), "min_step_s": rnd(min(times[("plain", 0)])),
              "round_medians_s": [rnd(x) for x in plain_rounds],
              "steps_measured": len(times[("plain", 0)]),
              "step_s": [rnd(x, 3) for x in times[("plain", 0)]]})
        for v in variants[1:]:
            name, R = v
            med = median(times[v])
            row = {"kind": "step", "variant": name, "batch": B, "refs": R, "unet_batch": sorted(unet_batches[v]),
                   "median_step_s": rnd(med), "plain_median_step_s": rnd(plain), "ratio_vs_plain": rnd(med / plain),
                   "round_ratios": [rnd(a / b) for a, b in zip(per_round[v], plain_rounds)],
                   "min_step_s": rnd(min(times[v])),
                   "ratio_of_min_steps": rnd(min(times[v]) / min(times[("plain", 0)])),
                   "steps_measured": len(times[v]), "step_s": [rnd(x, 3) for x in times[v]]}
            if name == "ours" and R == 2 and B in TARGET_STEP_RATIO:
                row["target_max"] = TARGET_STEP_RATIO[B]
                row["meets_target"] = med / plain <= TARGET_STEP_RATIO[B]
            emit(row)
            results.append(row)
        for R in opts.refs:
            ours, fc = median(times[("ours", R)]), median(times[("freecustom_lb", R)])
            row = {"kind": "speedup", "batch": B, "refs": R, "ours_median_step_s": rnd(ours),
                   "freecustom_lb_median_step_s": rnd(fc), "speedup_vs_freecustom": rnd(fc / ours),
                   "round_speedups": [rnd(b / a) for a, b in zip(per_round[("ours", R)],
                                                                  per_round[("freecustom_lb", R)])]}
            if R == 2 and B in TARGET_SPEEDUP:
                row["target_min"] = TARGET_SPEEDUP[B]
                row["meets_target"] = fc / ours >= TARGET_SPEEDUP[B]
            emit(row)
            results.append(row)
    return {"speed": results}


# =========================================================================== memory

def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """The process's peak RSS: VmHWM on Linux, ru_maxrss elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def reset_peak_rss() -> bool:
    """Reset the peak RSS to the current RSS (Linux >= 4.0). ru_maxrss alone is not enough: Linux
    carries the high-water mark of the parent over fork + exec into the child."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_child(case: str, method: str, tokens: int, R: int, heads: int, channels: int) -> dict:
    """One attn1 call in a fresh process; prints one JSON object."""
    import torch
    import torch.nn.functional as F

    hr.import_pack()
    import personalize_pack.attention.patch as patch
    from personalize_pack.attention.patch import SigmaRange
    from personalize_pack.attention.mrsa import MultiReferenceAttention
    from personalize_pack.references.reference import Reference

    patch._comfy_attention = False       # the base attention is plain SDPA, as in the comparison
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise SystemExit("--mem-tokens must be a square number")
    refs = [Reference(latent=torch.zeros(1, 4, side, side), mask=torch.ones(side * 8, side * 8), weight=3.0,
                      name=f"ref{i}") for i in range(R)]
    key = ("output", 6, 0)
    tech = MultiReferenceAttention(refs, [key], SigmaRange(1e9, 0.0), 1.0, 0)
    state = patch.PersonalizeState().with_technique(tech)
    attn = patch.PersonalizeAttention("attn1")
    rows = {(r, patch.COND): i for i, r in enumerate(refs)}

    def extra_options(n_side):
        # exactly what reference_pass hands the block in the joint layout: 1 target cond row + R references
        layout = patch.RowLayout("joint", [patch.COND], 1, (n_side, n_side), 1.0, rows)
        return {patch.STATE_KEY: state, patch.ROWS_KEY: layout, "cond_or_uncond": [patch.COND],
                "sigmas": torch.tensor([1.0]), "block": key[:2], "block_index": key[2],
                "n_heads": heads, "dim_head": channels // heads}

    def call(q, k, v, eo):
        if case == "mrsa":
            return attn(q, k, v, eo)
        b, n, c = q.shape
        split = lambda x: x.view(b, n, heads, c // heads).transpose(1, 2)
        return F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(b, n, c)

    def inputs(n, seed=0):
        g = torch.Generator().manual_seed(seed)
        return [torch.randn(1 + R, n, channels, generator=g) for _ in range(3)]

    # Warm-up call at the real size, then measure the second call: thread pool and kernels are
    # started, and whatever the pack caches per layer shape (fitted references, token selections)
    # is in the state it has at every step after the first, as in sampling.
    eo = extra_options(side)
    call(*inputs(tokens, seed=1), eo)
    gc.collect()

    inputs_bytes = 3 * (1 + R) * tokens * channels * 4
    out = {"case": case, "method": method, "inputs_bytes": inputs_bytes}
    if method == "rss":
        reset = reset_peak_rss()
        rss0, max0 = rss_bytes(), peak_rss_bytes()
        q, k, v = inputs(tokens)
        t = time.perf_counter()
        o = call(q, k, v, eo)
        out["call_s"] = time.perf_counter() - t
        max1 = peak_rss_bytes()
        # valid: the peak was reset before the inputs, or the call raised it above the old peak
        out.update(peak_bytes=max1 - rss0, valid=reset or max1 > max0, peak_reset=reset, rss_before=rss0,
                   peak_rss_before=max0, peak_rss_after=max1)
    else:
        from torch.profiler import ProfilerActivity, profile
        q, k, v = inputs(tokens)
        t = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            o = call(q, k, v, eo)
        out["call_s"] = time.perf_counter() - t
        events = hr.allocation_events(prof)
        peak, live = hr.live_peak(events)
        out.update(workspace_bytes=peak, peak_bytes=inputs_bytes + peak, live_after_bytes=live,
                   allocations=sum(1 for _, n in events if n > 0), valid=bool(events),
                   largest_allocations=sorted((n for _, n in events if n > 0), reverse=True)[:8])
    if not torch.isfinite(o).all() or tuple(o.shape) != (1 + R, tokens, channels):
        raise SystemExit(f"bad output {tuple(o.shape)}")
    print(json.dumps(out), flush=True)
    return out


def run_memory(opts) -> dict:
    tokens, R, heads, channels = opts.mem_tokens, opts.mem_refs, 8, 320
    env = dict(os.environ)
    # Large blocks straight from mmap and back on free, so RSS follows live memory (glibc).
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    res = {}
    for method in ("tracked", "rss"):
        for case in ("plain", "mrsa"):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--_memory-child", case, "--_memory-method", method,
                   "--mem-tokens", str(tokens), "--mem-refs", str(R)]
            p = subprocess.run(cmd, capture_output=True, text=True, env=env)
            lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
            if p.returncode or not lines:
                raise SystemExit(f"memory child {case}/{method} failed (rc {p.returncode}):\n{p.stderr[-3000:]}")
            res[(method, case)] = json.loads(lines[-1])
            log(f"memory {method} {case}: peak {res[(method, case)]['peak_bytes'] / 2**20:.1f} MiB, "
                f"call {res[(method, case)]['call_s']:.2f} s")
    mib = lambda b: rnd(b / 2**20, 2)
    logits_mrsa = 1 * heads * tokens * tokens * (1 + R) * 4     # the target row's N x N(1+R) fp32 logits
    logits_plain = (1 + R) * heads * tokens * tokens * 4        # plain attention over all 1+R rows
    rows = []
    for method in ("tracked", "rss"):
        p, m = res[(method, "plain")], res[(method, "mrsa")]
        row = {"kind": "memory", "method": method, "tokens": tokens, "refs": R, "heads": heads, "channels": channels,
               "dtype": "float32", "rows": 1 + R, "masks": "all ones (every reference token selected)",
               "inputs_mib": mib(p["inputs_bytes"]), "plain_peak_mib": mib(p["peak_bytes"]),
               "mrsa_peak_mib": mib(m["peak_bytes"]), "ratio": rnd(m["peak_bytes"] / p["peak_bytes"]),
               "plain_call_s": rnd(p["call_s"], 3), "mrsa_call_s": rnd(m["call_s"], 3),
               "valid": bool(p["valid"] and m["valid"]),
               "mrsa_full_logits_mib_if_built": mib(logits_mrsa), "plain_full_logits_mib_if_built": mib(logits_plain)}
        if method == "tracked":
            row.update(plain_workspace_mib=mib(p["workspace_bytes"]), mrsa_workspace_mib=mib(m["workspace_bytes"]),
                       workspace_ratio=rnd(m["workspace_bytes"] / max(1, p["workspace_bytes"])),
                       mrsa_largest_allocations_mib=[mib(b) for b in m["largest_allocations"]],
                       logits_never_built=m["workspace_bytes"] < logits_mrsa / 4,
                       target_max=TARGET_MEMORY_RATIO,
                       meets_target=m["peak_bytes"] / p["peak_bytes"] <= TARGET_MEMORY_RATIO)
        else:
            row["note"] = ("peak RSS (VmHWM, reset just before) above the RSS before the inputs were allocated; "
                           "glibc mmap threshold 128 KiB so freed blocks leave RSS")
        emit(row)
        rows.append(row)
    return {"memory": rows}


# =========================================================================== main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    hr.add_speed_args(ap)
    ap.add_argument("--refs", type=hr.int_list, default=[1, 2, 3], help="reference counts; default 1,2,3")
    ap.add_argument("--batches", type=hr.int_list, default=[1, 4], help="image batch sizes; default 1,4")
    ap.add_argument("--mask", choices=("full", "half"), default="full",
                    help="reference masks in the speed runs: full (worst case) or a centred half-area box")
    hr.add_attention_arg(ap, like="the anchors")
    ap.add_argument("--only", choices=("speed", "floor", "memory"),
                    help="run one part only (floor: plain UNet calls of batch 2B+R over 2B)")
    ap.add_argument("--mem-tokens", type=int, default=4096, help="tokens of the memory call; default 4096")
    ap.add_argument("--mem-refs", type=int, default=3, help="references of the memory call; default 3")
    ap.add_argument("--_memory-child", dest="memory_child", help=argparse.SUPPRESS)
    ap.add_argument("--_memory-method", dest="memory_method", default="tracked", help=argparse.SUPPRESS)
    opts = ap.parse_args(argv)

    if opts.memory_child:
        memory_child(opts.memory_child, opts.memory_method, opts.mem_tokens, opts.mem_refs, 8, 320)
        return 0
    if opts.steps < 2:
        ap.error("--steps must be at least 2 (the first step is skipped)")

    t0 = time.perf_counter()
    out = {}
    if opts.only in (None, "speed", "floor"):
        out.update(run_speed(opts))
    if opts.only in (None, "memory"):
        out.update(run_memory(opts))

    checks = {}
    for row in out.get("speed", []):
        if "meets_target" in row:
            name = ("step_ratio" if row["kind"] == "step" else "speedup") + f"_R{row['refs']}_B{row['batch']}"
            checks[name] = {"value": row.get("ratio_vs_plain", row.get("speedup_vs_freecustom")),
                            "target": row.get("target_max", row.get("target_min")),
                            "direction": "<=" if "target_max" in row else ">=", "met": row["meets_target"]}
    for row in out.get("memory", []):
        if "meets_target" in row:
            checks["memory_ratio"] = {"value": row["ratio"], "target": row["target_max"], "direction": "<=",
                                      "met": row["meets_target"],
                                      "applies": row["tokens"] == 4096 and row["refs"] == 3}
    representative = opts.layout == "full" and opts.size == 256
    for name, c in checks.items():
        c.setdefault("applies", representative)
    hr.emit_summary(checks, t0, "targets are defined for --layout full --size 256 (speed) and 4096 tokens, R=3 "
                 "(memory); checks with applies=false only show that the benchmark works",
                 speed_targets_apply=representative if "speed" in out else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
