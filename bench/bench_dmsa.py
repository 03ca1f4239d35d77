#!/usr/bin/env python3
"""Speed benchmark of the pack's FreeMix disentangle-mixing self-attention (DMSA) on the CPU.

Reuses the benchmarks' shared machinery in harness.py (random-weight SD1.5 UNet built in memory, step timing through the
sampling callback, the UNet batch probe, the direct floor measurement). Every ratio is computed from
measurements taken in the same run. Output: one JSON object per line on stdout (progress goes to
stderr). See bench/README.md for what each line means and the targets.

    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_dmsa.py                 # full run
    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_dmsa.py --layout small --size 64 --steps 4 \
        --repeats 1                                                          # smoke test

DMSA: ``plain`` (the unpatched model) and ``dmsa`` (the model patched exactly as the
Disentangle-Mixing Attention node patches it: preset "SD1.5 FreeMix", a structure and an appearance
reference with centred half-area subject masks, blend word = token 5 of a 77-token prompt, structure
phase 0..1, appearance phase from 0.4 of the schedule) sample the same latent with euler, CFG 7,
interleaved over several rounds. Every step is assigned to the phase its sigma lies in (structure
phase only, or appearance phase on output 9-11), so the step times are reported per phase too; the
UNet batch of every step is recorded (2 target rows + 1 reference row in the structure phase, + 2 in
the appearance phase) to check the assignment. The floor is a plain UNet call of batch 3 and 4 over
one of batch 2, timed directly (harness.run_floor).

The SAM Mask node's time per image is measured by bench_sam.py.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from types import SimpleNamespace

import harness as hr  # bench/ is on sys.path when a benchmark runs
from harness import emit, log, median, rnd

TARGET_STEP_RATIO = 1.8          # dmsa ÷ plain, median step, B=1 (see bench/README.md)
PRESET = "SD1.5 FreeMix"
BLEND_TOKENS, PROMPT_TOKENS = [5], 77


# =========================================================================== DMSA speed

def build_dmsa(model, blocks, hw, opts):
    """The technique exactly as nodes/attention.py's DisentangleMixingAttentionNode builds it
    (node defaults: structure 0..1, appearance opts.appearance_start..1, weight 3.0, threshold 0.2,
    no spatial normalisation, seed 0), the blend word given by its token position."""
    from personalize_pack.attention.blocks import DMSA_PRESETS
    from personalize_pack.attention.dmsa import DisentangleMixingAttention
    from personalize_pack.attention.install import install_technique
    from personalize_pack.attention.patch import SigmaRange

    s_ref, a_ref = hr.make_references(2, hw, opts.mask)
    s_ref = type(s_ref)(latent=s_ref.latent, mask=s_ref.mask, weight=s_ref.weight, name="structure")
    a_ref = type(a_ref)(latent=a_ref.latent, mask=a_ref.mask, weight=a_ref.weight, name="appearance")
    keys = DMSA_PRESETS[PRESET].keys(blocks)
    ms = model.model.model_sampling
    s_range = SigmaRange.from_percents(ms, 0.0, 1.0)
    a_range = SigmaRange.from_percents(ms, opts.appearance_start, 1.0)
    tech = DisentangleMixingAttention(s_ref, a_ref, *keys, s_range, a_range, blend_tokens=BLEND_TOKENS,
                                      prompt_tokens=PROMPT_TOKENS, structure_weight=3.0, threshold=0.2,
                                      norm_range=None, seed=0)
    return install_technique(model, tech), tech, keys


def step_phases(model, tech, steps) -> tuple[list[str], list[float]]:
    """The phase of every step of an euler/normal run of ``steps`` steps, from the sigma its model
    call is made at: "appearance" when the appearance range covers it, else "structure"."""
    import comfy.samplers

    sigmas = [float(s) for s in comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"),
                                                                "normal", steps)]
    return ["appearance" if tech._appearance_on(s) else "structure" for s in sigmas[:steps]], sigmas


def run_dmsa(opts) -> dict:
    import torch

    model, blocks, hw, build_s, load_s = hr.speed_setup(opts, "DMSA benchmark")
    import comfy.ldm.modules.attention as comfy_attention
    dm = model.model.diffusion_model
    patched, tech, (s_keys, a_keys, m_keys) = build_dmsa(model, blocks, hw, opts)
    phases, sigmas = step_phases(model, tech, opts.steps)
    counted = phases[1:]
    fmt = lambda ks: [f"{n}:{i}.{j}" for n, i, j in sorted(ks)]
    emit({"kind": "setup", "part": "dmsa", "layout": opts.layout, "unet_params": sum(p.numel() for p in dm.parameters()),
          "model_type": type(model.model).__name__, "model_config": type(model.model.model_config).__name__,
          "dtype": str(next(dm.parameters()).dtype), "attention": comfy_attention.optimized_attention.__name__,
          "preset": PRESET, "structure_layers": fmt(s_keys), "appearance_layers": fmt(a_keys), "map_layers": fmt(m_keys),
          "blend_tokens": BLEND_TOKENS, "prompt_tokens": PROMPT_TOKENS, "mask": opts.mask,
          "structure_percents": [0.0, 1.0], "appearance_percents": [opts.appearance_start, 1.0],
          "sigmas": [rnd(s) for s in sigmas], "step_phases": phases,
          "size_px": opts.size, "latent": list(hw), "batch": 1, "steps": opts.steps, "repeats": opts.repeats,
          "sampler": "euler", "scheduler": "normal", "cfg": 7.0,
          "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
          "machine": platform.machine(), "build_s": rnd(build_s, 1), "load_s": rnd(load_s, 1)})
    if "structure" not in counted or "appearance" not in counted:
        log(f"warning: the counted steps (2..{opts.steps}) do not cover both phases {counted}; "
            f"use more --steps or another --appearance-start")

    probe = hr.BatchProbe(dm)
    g = torch.Generator().manual_seed(0)
    cond = ([[torch.randn(1, PROMPT_TOKENS, 768, generator=g), {}]],
            [[torch.randn(1, PROMPT_TOKENS, 768, generator=g), {}]])

    # Warm-up (not recorded), 3 steps so the DMSA run passes through both phases.
    for m in (model, patched):
        hr.sample_once(m, 1, hw, 3, cond, probe, seed=999)
    log("warm-up done")

    variants = ("plain", "dmsa")
    times = {v: [] for v in variants}                      # (step index, seconds), pooled over rounds
    per_round = {v: [] for v in variants}                  # median counted step per round
    step_batches = {v: {} for v in variants}               # step index -> UNet batch sizes seen
    for r in range(opts.repeats):
        for v in (variants if r % 2 == 0 else variants[::-1]):
            steps, _ = hr.sample_once(patched if v == "dmsa" else model, 1, hw, opts.steps, cond, probe,
                                      seed=1000 + r)
            calls = list(probe.batches)                    # in call order; euler+CFG: one UNet call per step
            if len(calls) == opts.steps:
                for i, b in enumerate(calls):
                    step_batches[v].setdefault(i, set()).add(b)
            times[v].extend((i, s) for i, s in enumerate(steps) if i > 0)
            per_round[v].append(median(steps[1:]))
            log(f"round {r + 1}/{opts.repeats} {v}: UNet calls of batch {calls}, median step "
                f"{median(steps[1:]):.3f} s (first {steps[0]:.2f} s)")

    def phase_stats(v, phase=None):
        xs = [s for i, s in times[v] if phase is None or phases[i] == phase]
        batches = sorted({b for i, bs in step_batches[v].items() if phase is None or phases[i] == phase for b in bs})
        return xs, batches

    rows = []
    plain_all, plain_b = phase_stats("plain")
    plain_row = {"kind": "step", "variant": "plain", "batch": 1, "unet_batch": plain_b,
                 "median_step_s": rnd(median(plain_all)), "min_step_s": rnd(min(plain_all)),
                 "round_medians_s": [rnd(x) for x in per_round["plain"]], "steps_measured": len(plain_all),
                 "phases": {}, "step_s": [rnd(s, 3) for _, s in times["plain"]]}
    dmsa_all, dmsa_b = phase_stats("dmsa")
    ratio = median(dmsa_all) / median(plain_all)
    dmsa_row = {"kind": "step", "variant": "dmsa", "batch": 1, "refs": 2, "unet_batch": dmsa_b,
                "median_step_s": rnd(median(dmsa_all)), "plain_median_step_s": rnd(median(plain_all)),
                "ratio_vs_plain": rnd(ratio),
                "round_ratios": [rnd(a / b) for a, b in zip(per_round["dmsa"], per_round["plain"])],
                "min_step_s": rnd(min(dmsa_all)), "ratio_of_min_steps": rnd(min(dmsa_all) / min(plain_all)),
                "mean_ratio": rnd((sum(dmsa_all) / len(dmsa_all)) / (sum(plain_all) / len(plain_all))),
                "steps_measured": len(dmsa_all), "phases": {},
                "target_max": TARGET_STEP_RATIO, "meets_target": ratio <= TARGET_STEP_RATIO,
                "step_s": [rnd(s, 3) for _, s in times["dmsa"]]}
    for phase in ("structure", "appearance"):
        p_xs, p_b = phase_stats("plain", phase)
        d_xs, d_b = phase_stats("dmsa", phase)
        plain_row["phases"][phase] = {"steps_measured": len(p_xs), "median_step_s": rnd(median(p_xs)),
                                      "unet_batch": p_b}
        dmsa_row["phases"][phase] = {
            "steps": [i for i in range(1, opts.steps) if phases[i] == phase],
            "steps_measured": len(d_xs), "median_step_s": rnd(median(d_xs)), "unet_batch": d_b,
            "expected_unet_batch": 3 if phase == "structure" else 4,
            "plain_median_step_s": rnd(median(p_xs)),
            "ratio_vs_plain": rnd(median(d_xs) / median(p_xs)) if d_xs and p_xs else None,
            "ratio_of_min_steps": rnd(min(d_xs) / min(p_xs)) if d_xs and p_xs else None}
    dmsa_row["phases_consistent"] = all(
        not ph["unet_batch"] or ph["unet_batch"] == [ph["expected_unet_batch"]] for ph in dmsa_row["phases"].values())
    for row in (plain_row, dmsa_row):
        emit(row)
        rows.append(row)

    # The floor: plain UNet calls of batch 2+1 (structure phase) and 2+2 (appearance phase) over batch 2.
    floor_opts = SimpleNamespace(batches=[1], refs=[1, 2], repeats=opts.repeats)
    floors = {r["refs"]: r["floor_ratio"] for r in hr.run_floor(model, floor_opts, hw, cond)}
    ph = dmsa_row["phases"]
    n_s, n_a = ph["structure"]["steps_measured"], ph["appearance"]["steps_measured"]
    mixed_floor = (n_s * floors[1] + n_a * floors[2]) / max(1, n_s + n_a)
    over = {"kind": "overhead", "batch": 1, "dmsa_ratio_vs_plain": rnd(ratio),
            "floor_ratio_batch4": floors[2], "floor_ratio_batch3": floors[1],
            "above_floor": rnd(ratio / floors[2]),
            "step_mix_floor_ratio": rnd(mixed_floor), "above_step_mix_floor": rnd(ratio / mixed_floor),
            "structure_phase": {"ratio_vs_plain": ph["structure"]["ratio_vs_plain"], "floor_ratio": floors[1],
                                "above_floor": rnd(ph["structure"]["ratio_vs_plain"] / floors[1])
                                if ph["structure"]["ratio_vs_plain"] else None},
            "appearance_phase": {"ratio_vs_plain": ph["appearance"]["ratio_vs_plain"], "floor_ratio": floors[2],
                                 "above_floor": rnd(ph["appearance"]["ratio_vs_plain"] / floors[2])
                                 if ph["appearance"]["ratio_vs_plain"] else None}}
    emit(over)
    rows.append(over)
    return {"dmsa": rows}


# =========================================================================== main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    hr.add_speed_args(ap, steps=10, repeats=3,
                      steps_help="sampling steps per run (the first is skipped); default 10, so both phases run",
                      repeats_help="rounds of interleaved plain/DMSA runs (order reversed every other round); default 3")
    ap.add_argument("--appearance-start", type=float, default=0.4,
                    help="fraction of the schedule where the appearance phase starts; default 0.4 (FreeMix)")
    ap.add_argument("--mask", choices=("half", "full"), default="half",
                    help="reference masks: a centred box of half the area (default) or all ones")
    hr.add_attention_arg(ap)
    opts = ap.parse_args(argv)
    if opts.steps < 2:
        ap.error("--steps must be at least 2 (the first step is skipped)")
    if opts.repeats < 1:
        ap.error("--repeats must be at least 1")

    t0 = time.perf_counter()
    out = run_dmsa(opts)

    checks = {}
    representative = opts.layout == "full" and opts.size == 256
    for row in out.get("dmsa", []):
        if "meets_target" in row:
            checks["dmsa_step_ratio_B1"] = {"value": row["ratio_vs_plain"], "target": row["target_max"],
                                            "direction": "<=", "met": row["meets_target"],
                                            "applies": representative and opts.mask == "half"}
    hr.emit_summary(checks, t0, "the target is defined for --layout full --size 256 --mask half; checks with applies=false only "
                    "show that the benchmark works")
    return 0


if __name__ == "__main__":
    sys.exit(main())
