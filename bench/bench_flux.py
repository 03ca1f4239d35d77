#!/usr/bin/env python3
"""Speed benchmark of the pack's multi-reference self-attention (MRSA) on a FLUX model, on the CPU.

Reuses the benchmarks' shared machinery in harness.py (ComfyUI set-up, step timing through the sampling callback, the
model-call batch probe, the output helpers). Every ratio is computed from measurements taken in the
same run. Output: one JSON object per line on stdout (progress goes to stderr). See bench/README.md
for what each line means and the target.

    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_flux.py                 # full run
    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_flux.py --mask half     # subject only can save time
    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_flux.py --heads 1 --depth 1 --single 1 \
        --size 128 --steps 3 --repeats 1                                     # smoke test

Model: a FLUX dev-shaped model with random weights (``tests/tiny_flux.build_flux``: 128 channels per
head, RoPE axes [16, 56, 56], text and pooled width 768, guidance embedding), by default 4 heads
(hidden 512), 4 double and 8 single blocks, saved in a temporary folder and loaded with
``comfy.sd.load_diffusion_model`` as fp32. Conditioning: random ``[1, 77, 768]`` tensors with a
random pooled output ``[1, 768]`` and guidance 3.5, for the prompt and the negative prompt. R
references (default 2): random 16-channel latents at the target's latent size, masks all ones
(worst case: every reference token attended) or a centred half-area box, random captions
``[1, 77, 768]`` and pooled captions ``[1, 768]``. The patched models are made exactly as the
Multi-Reference Attention node makes them (``MultiReferenceAttentionNode.execute``, whole schedule,
style fidelity 1, seed 0), one per preset and ``--tokens`` setting. Sampling: ``comfy.sample.sample``, euler, ``simple``
scheduler, the same noise for every variant of a round.

Two CFG modes, each with its own plain baseline:

* ``cfg1``: guidance-distilled use, CFG 1: ComfyUI runs the cond pass only (model batch 1 plain,
  1 + R patched: the references ride in the target's call);
* ``cfg``: true CFG (``--cfg``, default 3.5) with the negative prompt: cond and uncond in one call
  (model batch 2 plain, 2 + R patched; the references run with the cond rows only).

Per mode the variants are ``plain`` (the unpatched model), ``mrsa_single`` / ``mrsa_double`` /
``mrsa_all`` (the presets chosen with ``--presets``, the node's ``reference_tokens`` "whole image"),
``mrsa_single_subject`` / ... (the same presets with ``reference_tokens`` "subject only (faster)";
``--tokens`` picks whole, subject or both) and ``floor``: the unpatched model sampled at CFG 1 with a
latent batch equal to the whole-image patched model's call batch (n + R), i.e. what the extra rows
cost by themselves, without any attention work. With "subject only" every reference runs in a model
call of its own (batch 1) on the image tokens its mask touches, stopped after the last patched block,
and then the target runs alone (batch n): R + 1 model calls per step. It saves time only where the
masks are partial (``--mask half``); with all-ones masks it does the whole-image work in R + 1 calls.
Runs are interleaved (every variant of both modes once per round, the order reversed every other
round), the first step of every run is skipped, medians are compared. A forward pre-hook on the
diffusion model records the batch of every model call, so the layouts are measured, not assumed, and
forward hooks on the first double block, the first single block and the model time the two
sections of every call (double blocks; single blocks + final layer), which splits each step into the
rows' cost and the patched blocks' extra work (the model's end hook also fires when a subject-only
references call stops early, so those calls are timed too).

On a shared machine other processes distort CPU timings badly (with 2 threads on 2 cores, a second
busy process can make a step 3-5x slower). So the CPU time the other processes use during every run
is measured from ``/proc/stat`` and reported; before each run the script waits (``--quiet-wait``)
for the other processes to go below ``--busy`` cores, and a run during which they went above it is
run again (``--retries``).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import harness as hr  # bench/ is on sys.path when a benchmark runs (harness puts tests/ there too)
from flux_report import (POSITIONS, PRESETS, TARGET_PRESET, TARGET_STEP_RATIO, TOKENS, mode_cfg, mode_rows,
                         patched_variants)
from harness import ForeignLoad, csv_choice, emit, log, median, rnd

TEXT_WIDTH = 768                 # tests/tiny_flux.py: context_in_dim and vec_in_dim
DEFAULTS = dict(heads=4, depth=4, single=8, size=512, text_tokens=77, refs=2)


# =========================================================================== model and inputs

def load_flux(opts, folder: Path):
    """Build the random FLUX model into ``folder``, load it as fp32 and check that the pack sees
    it as FLUX with the asked block counts. Returns ``(model, spec, build_s, load_s, file_mib)``."""
    import torch
    import comfy.sd
    from tiny_flux import build_flux
    from personalize_pack.attention.families import model_family

    path = folder / "bench_flux.safetensors"
    t = time.perf_counter()
    build_flux(path, heads=opts.heads, depth=opts.depth, single=opts.single, guidance=opts.variant == "dev")
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    model = comfy.sd.load_diffusion_model(str(path), model_options={"dtype": torch.float32})
    load_s = time.perf_counter() - t
    spec = model_family(model.model.diffusion_model)
    if spec is None or spec.family != "flux" or (spec.double, spec.single) != (opts.depth, opts.single):
        raise SystemExit(f"the pack does not see the generated model as FLUX with {opts.depth} double and "
                         f"{opts.single} single blocks: {spec}")
    return model, spec, build_s, load_s, path.stat().st_size / 2**20


def make_conditioning(opts, seed: int = 0):
    """Random prompt and negative prompt: ``[1, T, 768]`` with a pooled output and guidance 3.5."""
    import torch

    g = torch.Generator().manual_seed(seed)

    def one():
        return [[torch.randn(1, opts.text_tokens, TEXT_WIDTH, generator=g),
                 {"pooled_output": torch.randn(1, TEXT_WIDTH, generator=g), "guidance": 3.5}]]
    return one(), one()


def make_flux_references(opts, hw, seed: int = 1):
    """R references with 16-channel latents at the target's latent size, the masks of
    ``harness.make_references`` (all ones or the centred half-area box), captions and pooled
    captions."""
    import torch
    from personalize_pack.references.reference import Reference

    g = torch.Generator().manual_seed(seed)
    masks = [r.mask for r in hr.make_references(opts.refs, hw, opts.mask)]
    return [Reference(latent=torch.randn(1, 16, *hw, generator=g), mask=m, weight=3.0,
                      caption=torch.randn(1, opts.text_tokens, TEXT_WIDTH, generator=g),
                      caption_pooled=torch.randn(1, TEXT_WIDTH, generator=g), name=f"ref{i}")
            for i, m in enumerate(masks)]


# =========================================================================== instrumentation

class SectionClock:
    """Forward hooks (bench instrumentation): per model call its start time and the seconds from
    the model's start to the first double block (``pre``: embeddings, positions), from there to the
    first single block (``double``: the double blocks) and from there to the model's end
    (``single``: the single blocks and the final layer). The hooks fire inside the pack's block
    replaces too, since those call the original block modules.

    A subject-only references call (``reference_tokens`` "subject only") ends with the pack's
    ``RecordDone`` right after its last patched block: the end hook runs anyway (``always_call``),
    marks the call ``record`` (no output) and counts a section it never reached as 0 (double
    preset: no single blocks; single preset: no final layer, which is tiny)."""

    def __init__(self, diffusion_model):
        self.calls: list[dict] = []
        self._cur = None
        diffusion_model.register_forward_pre_hook(self._start)
        diffusion_model.double_blocks[0].register_forward_pre_hook(lambda m, a: self._mark("t_double"))
        diffusion_model.single_blocks[0].register_forward_pre_hook(lambda m, a: self._mark("t_single"))
        diffusion_model.register_forward_hook(self._end, always_call=True)

    def _start(self, module, args):
        self._cur = {"t0": time.perf_counter(), "batch": int(args[0].shape[0]) if args else None}

    def _mark(self, name):
        if self._cur is not None and name not in self._cur:
            self._cur[name] = time.perf_counter()

    def _end(self, module, args, output):
        c, self._cur = self._cur, None
        if c is None:
            return
        t1 = time.perf_counter()
        td, ts = c.get("t_double"), c.get("t_single")
        c["record"] = output is None             # stopped by an exception: a subject-only references call
        c["total"] = t1 - c["t0"]
        c["pre"] = (td - c["t0"]) if td is not None else None
        if c["record"]:
            c["double"] = ((ts if ts is not None else t1) - td) if td is not None else None
            c["single"] = (t1 - ts) if ts is not None else (0.0 if td is not None else None)
        else:
            c["double"] = (ts - td) if td is not None and ts is not None else None
            c["single"] = (t1 - ts) if ts is not None else None
        self.calls.append(c)


def sample_flux(model, latent_batch: int, hw, steps: int, cfg: float, cond, probe, clock, seed: int, foreign=None):
    """One ``comfy.sample.sample`` run (euler, simple). Returns ``(step seconds, model-call batch
    sizes in call order, per-step section seconds, other processes' cores during the run, the
    sampled latent)``: a step's sections are the sums over the model calls that started within it."""
    import torch
    import comfy.sample

    latent = torch.zeros(latent_batch, 16, *hw)
    noise = comfy.sample.prepare_noise(latent, seed)
    stamps = []
    probe.batches.clear()
    clock.calls.clear()
    if foreign is not None:
        foreign.start()
    t0 = time.perf_counter()
    out = comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", cond[0], cond[1], latent,
                              callback=lambda i, x0, x, total: stamps.append(time.perf_counter()),
                              disable_pbar=True, seed=seed)
    load = foreign.cores() if foreign is not None else None
    if len(stamps) != steps:
        raise RuntimeError(f"expected {steps} callbacks, got {len(stamps)}")
    if not torch.isfinite(out).all():
        raise RuntimeError("sampling produced non-finite values")
    marks = [t0] + stamps
    sections = []
    for a, b in zip(marks, marks[1:]):
        calls = [c for c in clock.calls if a <= c["t0"] < b]
        sec = {"calls": len(calls), "batches": [c["batch"] for c in calls],
               "record_calls": sum(1 for c in calls if c["record"]),
               "record": sum(c["total"] for c in calls if c["record"]),      # references-only calls
               "target": sum(c["total"] for c in calls if not c["record"])}  # the calls with the target rows
        for name in ("total", "pre", "double", "single"):
            vals = [c[name] for c in calls]
            sec[name] = sum(vals) if calls and all(v is not None for v in vals) else None
        sections.append(sec)
    return [b - a for a, b in zip(marks, marks[1:])], list(probe.batches), sections, load, out


# =========================================================================== the benchmark

def run_flux(opts) -> dict:
    import torch

    hr.setup_comfy(hr.comfyui_path(opts, "FLUX benchmark"), opts.attention)
    hr.import_pack()
    import comfy.ldm.modules.attention as comfy_attention
    from personalize_pack.attention.dit import REFERENCE_TOKENS, subject_tokens
    from personalize_pack.nodes.attention import MultiReferenceAttentionNode

    if set(TOKENS.values()) != set(REFERENCE_TOKENS):
        raise SystemExit(f"the node's reference_tokens options are {REFERENCE_TOKENS}; this benchmark knows "
                         f"{list(TOKENS.values())}")

    if opts.threads:
        torch.set_num_threads(opts.threads)
    if opts.size % 16:
        raise SystemExit("--size must be a multiple of 16 (latent = size/8, FLUX patches of 2x2 latent pixels)")
    hw = (opts.size // 8, opts.size // 8)
    R = opts.refs

    with tempfile.TemporaryDirectory(prefix="bench_flux_") as tmp:
        model, spec, build_s, load_s, file_mib = load_flux(opts, Path(tmp))
        dm = model.model.diffusion_model
        refs = make_flux_references(opts, hw)
        patched = {name: MultiReferenceAttentionNode.execute(model, refs, PRESETS[p], "", 0.0, 1.0, 1.0, 0,
                                                             POSITIONS[opts.positions],
                                                             reference_tokens=TOKENS[tok]).result[0]
                   for name, p, tok in patched_variants(opts)}
        blocks = {}
        for name, p, tok in patched_variants(opts):
            tech = patched[name].model_options["transformer_options"]["personalize"].techniques[-1]
            if tech.subject_tokens != (tok == "subject"):
                raise SystemExit(f"{name}: the node made a technique with subject_tokens={tech.subject_tokens}")
            blocks[p] = [f"{kind.split('_')[0]}:{i}" for kind, i in sorted(tech.attn1_keys, key=spec.order)]
        # The image tokens each subject-only references call keeps (of the image's tokens).
        subj_tokens = [int(subject_tokens(r, hw, spec).numel()) for r in refs]
        emit({"kind": "setup", "part": "flux", "model_type": type(model.model).__name__,
              "model_config": type(model.model.model_config).__name__, "variant": opts.variant,
              "params": sum(p.numel() for p in dm.parameters()), "dtype": str(next(dm.parameters()).dtype),
              "heads": opts.heads, "hidden": 128 * opts.heads, "double_blocks": spec.double,
              "single_blocks": spec.single, "attention": comfy_attention.optimized_attention.__name__,
              "size_px": opts.size, "latent": [16, *hw], "image_tokens": spec.image_tokens(hw),
              "text_tokens": opts.text_tokens, "text_width": TEXT_WIDTH, "refs": R, "mask": opts.mask,
              "reference_tokens": {t: TOKENS[t] for t in opts.tokens}, "subject_image_tokens": subj_tokens,
              "positions": POSITIONS[opts.positions], "presets": {p: PRESETS[p] for p in opts.presets},
              "patched_blocks": blocks, "modes": {m: mode_cfg(m, opts) for m in opts.modes},
              "steps": opts.steps, "repeats": opts.repeats, "sampler": "euler", "scheduler": "simple",
              "guidance": 3.5, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "cpus": os.cpu_count(), "machine": platform.machine(),
              "loadavg": [rnd(x, 2) for x in os.getloadavg()], "file_mib": rnd(file_mib, 1),
              "build_s": rnd(build_s, 1), "load_s": rnd(load_s, 1)})

        probe = hr.BatchProbe(dm)
        clock = SectionClock(dm)
        cond = make_conditioning(opts)

        # variant -> (model, latent batch, cfg); the floor samples the plain model at CFG 1 with the
        # whole-image patched call's batch (n + R rows), so its model calls have exactly that batch.
        def variants_of(mode):
            cfg = mode_cfg(mode, opts)
            n = 1 if mode == "cfg1" else 2          # target rows of one model call
            out = {"plain": (model, 1, cfg)}
            out.update({name: (patched[name], 1, cfg) for name, _, _ in patched_variants(opts)})
            out["floor"] = (model, n + R, 1.0)
            return out

        runs = {(mode, v): spec_ for mode in opts.modes for v, spec_ in variants_of(mode).items()}
        order = list(runs)

        # Warm-up (not recorded): the first sampling runs of a process are slower than the rest.
        for key in order:
            if key[1] == "plain" or key[1].startswith("mrsa_"):
                m, b, cfg = runs[key]
                sample_flux(m, b, hw, 2, cfg, cond, probe, clock, seed=999)
        log("warm-up done")

        times = {k: [] for k in order}           # counted step seconds, pooled over rounds
        per_round = {k: [] for k in order}       # median counted step per round
        batches = {k: set() for k in order}      # model-call batch sizes seen
        calls_per_step = {k: set() for k in order}
        sections = {k: [] for k in order}        # counted steps' section seconds
        loads = {k: [] for k in order}           # other processes' cores during each kept run
        redone = {k: 0 for k in order}           # runs thrown away because others were busy
        finals = {}                              # the sampled latent of round 1 (same noise for every variant)
        foreign = ForeignLoad()
        for r in range(opts.repeats):
            for key in (order if r % 2 == 0 else order[::-1]):
                m, b, cfg = runs[key]
                best = None                      # the attempt during which the others were least busy
                for attempt in range(opts.retries + 1):
                    if opts.quiet_wait > 0:
                        before = foreign.wait_quiet(opts.quiet_wait, opts.busy)
                        if before is not None and before >= opts.busy:
                            log(f"other processes still use {before:.2f} cores after {opts.quiet_wait:.0f} s; "
                                f"running anyway")
                    res = sample_flux(m, b, hw, opts.steps, cfg, cond, probe, clock, seed=1000 + r, foreign=foreign)
                    load = res[3]
                    if best is None or (load is not None and best[3] is not None and load < best[3]):
                        best = res
                    if load is None or load < opts.busy or attempt == opts.retries:
                        break
                    redone[key] += 1
                    log(f"round {r + 1} {key[0]} {key[1]}: other processes used {load:.2f} cores during the run; "
                        f"running it again")
                steps, calls, secs, load, latent = best
                if r == 0:
                    finals[key] = latent
                kept = steps[1:]
                times[key].extend(kept)
                per_round[key].append(median(kept))
                batches[key].update(calls)
                calls_per_step[key].update(s["calls"] for s in secs)
                sections[key].extend(secs[1:])
                loads[key].append(load)
                log(f"round {r + 1}/{opts.repeats} {key[0]} {key[1]}: latent batch {b}, cfg {cfg}, model calls of "
                    f"batch {sorted(set(calls))}, {sorted({s['calls'] for s in secs})} per step, "
                    f"median step {median(kept):.3f} s (first {steps[0]:.2f} s), "
                    f"others {'?' if load is None else f'{load:.2f}'} cores")

    stats = dict(times=times, per_round=per_round, batches=batches, calls_per_step=calls_per_step,
                 sections=sections, loads=loads, redone=redone, finals=finals, subj_tokens=subj_tokens,
                 n_image=spec.image_tokens(hw))
    rows = []
    for mode in opts.modes:
        rows.extend(mode_rows(mode, opts, **stats))
    return {"flux": rows}


# =========================================================================== main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfyui", help="ComfyUI folder (default: $COMFYUI_PATH)")
    ap.add_argument("--heads", type=int, default=DEFAULTS["heads"],
                    help=f"attention heads of 128 channels (hidden = 128 x heads); default {DEFAULTS['heads']}")
    ap.add_argument("--depth", type=int, default=DEFAULTS["depth"],
                    help=f"double blocks; default {DEFAULTS['depth']}")
    ap.add_argument("--single", type=int, default=DEFAULTS["single"],
                    help=f"single blocks; default {DEFAULTS['single']}")
    ap.add_argument("--variant", choices=("dev", "schnell"), default="dev",
                    help="dev: guidance embedding (FLUX.1 dev); schnell: none; default dev")
    ap.add_argument("--size", type=int, default=DEFAULTS["size"],
                    help=f"image size in px (latent size/8, image tokens (size/16)^2); default {DEFAULTS['size']}")
    ap.add_argument("--text-tokens", type=int, default=DEFAULTS["text_tokens"],
                    help=f"text tokens of the prompt, the negative prompt and the captions (width 768); "
                         f"default {DEFAULTS['text_tokens']}")
    ap.add_argument("--refs", type=int, default=DEFAULTS["refs"], help=f"references R; default {DEFAULTS['refs']}")
    ap.add_argument("--mask", choices=("full", "half"), default="full",
                    help="reference masks: all ones (worst case, the default) or a centred half-area box")
    ap.add_argument("--positions", choices=sorted(POSITIONS), default="shifted",
                    help="the node's reference_positions: shifted (its default) or aligned")
    ap.add_argument("--presets", type=csv_choice(PRESETS), default=["single", "double"],
                    help="FLUX presets to patch with (single, double, all); default single,double")
    ap.add_argument("--tokens", choices=("whole", "subject", "both"), default="both",
                    help="the node's reference_tokens: whole image (mrsa_<preset>), subject only "
                         "(mrsa_<preset>_subject) or both; default both")
    ap.add_argument("--modes", type=csv_choice({"cfg1", "cfg"}), default=["cfg1", "cfg"],
                    help="cfg1: CFG 1, cond pass only; cfg: true CFG with a negative prompt; default both")
    ap.add_argument("--cfg", type=float, default=3.5, help="CFG scale of the cfg mode; default 3.5")
    ap.add_argument("--steps", type=int, default=6,
                    help="sampling steps per run (the first is skipped); default 6")
    ap.add_argument("--repeats", type=int, default=4,
                    help="rounds of interleaved runs (order reversed every other round); default 4")
    hr.add_attention_arg(ap)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--busy", type=float, default=0.25,
                    help="other processes using this many CPU cores or more make the machine busy; default 0.25")
    ap.add_argument("--quiet-wait", type=float, default=60.0,
                    help="before each run, wait up to this many seconds for a quiet machine (0: never wait); "
                         "default 60")
    ap.add_argument("--retries", type=int, default=2,
                    help="runs during which the machine was busy are run again, up to this many times; default 2")
    opts = ap.parse_args(argv)
    if opts.steps < 2:
        ap.error("--steps must be at least 2 (the first step is skipped)")
    if opts.repeats < 1:
        ap.error("--repeats must be at least 1")
    if min(opts.heads, opts.depth, opts.single, opts.refs, opts.text_tokens) < 1:
        ap.error("--heads, --depth, --single, --refs and --text-tokens must be at least 1")
    if "cfg" in opts.modes and opts.cfg <= 1.0:
        ap.error("--cfg must be above 1 (the cfg mode is true CFG; CFG 1 is the cfg1 mode)")

    opts.tokens = ["whole", "subject"] if opts.tokens == "both" else [opts.tokens]

    t0 = time.perf_counter()
    out = run_flux(opts)

    default_model = opts.variant == "dev" and all(getattr(opts, k) == v for k, v in DEFAULTS.items())
    representative = opts.mask == "full" and default_model
    checks = {}
    for row in out["flux"]:
        if row["kind"] == "step" and "meets_target" in row:
            checks[f"step_ratio_{row['mode']}_{TARGET_PRESET}"] = {
                "value": row["ratio_vs_plain"], "target": row["target_max"], "direction": "<=",
                "met": row["meets_target"], "applies": representative}
    # Informational, not the target and not part of all_met: subject-only references
    # (reference_tokens "subject only (faster)") against the same 1.8 bound, per preset. They save
    # time only with partial masks, so these apply with the default model and --mask half.
    info = {}
    for row in out["flux"]:
        if row["kind"] == "subject":
            preset = next(p for p, name in PRESETS.items() if name == row["preset"])
            info[f"subject_step_ratio_{row['mode']}_{preset}"] = {
                "value": row["ratio_vs_plain"], "whole_value": row.get("whole_ratio_vs_plain"),
                "subject_vs_whole": row.get("subject_vs_whole"), "mask": opts.mask,
                "target": TARGET_STEP_RATIO, "direction": "<=", "met": row["ratio_vs_plain"] <= TARGET_STEP_RATIO,
                "applies": default_model and opts.mask == "half"}
    extra = {}
    if info:
        extra["informational_checks"] = info
        extra["informational_note"] = (
            "not the issue's target and not counted in all_met: step time of subject-only references ÷ plain "
            "against the same bound; meaningful with --mask half (with all-ones masks subject only does the "
            "whole-image work in R + 1 calls)")
    hr.emit_summary(checks, t0, "the target is defined for the default model, size, text length and R=2 with "
                    "all-ones masks; checks with applies=false only show that the benchmark works",
                    target_checks=(f"checks (step_ratio_<mode>_{TARGET_PRESET}): the issue's target, whole-image "
                                   f"references, {PRESETS[TARGET_PRESET]} preset, default configuration with "
                                   f"all-ones masks"),
                    **extra,
                    layouts_consistent=all(r["layout_consistent"] for r in out["flux"] if "layout_consistent" in r),
                    runs_redone=sum(r.get("runs_redone", 0) for r in out["flux"]),
                    busy_runs_kept=sum(1 for r in out["flux"] for x in r.get("others_cores_runs", [])
                                       if x is not None and x >= opts.busy),
                    loadavg=[rnd(x, 2) for x in os.getloadavg()])
    return 0


if __name__ == "__main__":
    sys.exit(main())
