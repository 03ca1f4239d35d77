#!/usr/bin/env python3
"""Speed benchmark of reference reuse (Reference Reuse node, attention/ref_cache.py): MRSA with its
references computed every step, served from the cache across runs, or run once per run, against
the plain model; and the cache's size.

Every ratio is computed from measurements taken in the same run. Output: one JSON object per line on
stdout (progress on stderr), closing with a ``summary`` line. See bench/README.md.

    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_reuse.py                       # full run
    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_reuse.py --layout small --size 64 --steps 4 \
        --repeats 1 --batches 1 --heads 1 --depth 1 --single 1 --flux-size 128      # smoke test

UNet part: the SD1.5-shaped UNet of bench_mrsa (random weights, real layout), FreeCustom's preset
(output 6-11), R references (default 2), euler, CFG 7, per image batch B (default 1 and 4):

* ``plain``: the unpatched model;
* ``per_step``: MRSA as FreeCustom runs it (references re-noised and run every step, in the
  target's call);
* ``warm``: MRSA + Reference Reuse, 'every step', kept across runs, after one untimed run that
  filled the cache: the model calls carry the target rows only;
* ``once``: MRSA + Reference Reuse, 'once per run', not kept: every timed run is a first run, whose
  first step runs the references (at their fixed noise level) and whose other steps read them.

Above batch 1 only ``plain`` and ``warm`` run (``--all-batches`` runs all four at every batch size).

``per_step`` and ``warm`` are compared by their median step (the first step of every run skipped);
``once`` by the whole run (every step, the first included) against the plain run's. FLUX part: the
small random FLUX of bench_flux (single-blocks preset, whole-image references, CFG 1), the same
four variants at batch 1. Runs are interleaved (order reversed every other round), and a forward
pre-hook records the batch of every model call, so the layouts are checked, not assumed.

Size: the cache's bytes after the untimed run are measured; per reference and step they scale with
the image tokens of the patched layers and the dtype's width, which gives SD1.5 at 512 px (30 steps,
fp16) and FLUX.1 dev at 1024 px (the single-blocks preset: 38 blocks of 3072 channels, bf16) from the
same per-token rule that the measured bytes are checked against.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import harness as hr  # bench/ is on sys.path when a benchmark runs
from harness import emit, log, median, rnd

TARGETS = {"warm_B1": 1.15, "warm_B4": 1.08, "warm_flux": 1.3, "once_first_run": 1.15}
PRESET = "SD1.5 FreeCustom (output 6-11)"
FLUX_PRESET = "FLUX dev/schnell: single blocks"
EVERY, ONCE = "every step (FreeCustom)", "once per run"


def reuse(model, **kw):
    from personalize_pack.nodes.reference_cache import ReferenceReuseNode
    return ReferenceReuseNode.execute(model, **kw).result[0]


def timed_run(model, channels, batch, hw, steps, cfg, cond, probe, seed, scheduler):
    """One ``comfy.sample.sample`` run: (step seconds, model-call batches)."""
    import torch
    import comfy.sample

    latent = torch.zeros(batch, channels, *hw)
    noise = comfy.sample.prepare_noise(latent, seed)
    stamps = []
    probe.batches.clear()
    t0 = time.perf_counter()
    out = comfy.sample.sample(model, noise, steps, cfg, "euler", scheduler, cond[0], cond[1], latent,
                              callback=lambda i, x0, x, total: stamps.append(time.perf_counter()),
                              disable_pbar=True, seed=seed)
    if len(stamps) != steps or not torch.isfinite(out).all():
        raise RuntimeError(f"bad run: {len(stamps)} callbacks of {steps}, finite={bool(torch.isfinite(out).all())}")
    marks = [t0] + stamps
    return [b - a for a, b in zip(marks, marks[1:])], list(probe.batches)


def compare(part, models, batch, run, opts, targets):
    """Interleaved rounds of every variant; emits a ``step`` line per variant and returns them."""
    times = {v: [] for v in models}
    totals = {v: [] for v in models}
    layouts = {v: [] for v in models}
    for r in range(opts.repeats):
        for v in (list(models) if r % 2 == 0 else list(models)[::-1]):
            steps, batches = run(models[v], batch, 1000 + r)
            times[v].extend(steps[1:])
            totals[v].append(sum(steps))
            layouts[v] = batches
            log(f"{part} B={batch} round {r + 1}: {v} median step {median(steps[1:]):.3f} s, run {sum(steps):.2f} s, "
                f"model calls {sorted(set(batches))}")
    plain, plain_total = median(times["plain"]), median(totals["plain"])
    rows = []
    for v in models:
        row = {"kind": "step", "part": part, "variant": v, "batch": batch, "median_step_s": rnd(median(times[v])),
               "median_run_s": rnd(median(totals[v])), "model_call_batches": layouts[v],
               "ratio_vs_plain": rnd(median(times[v]) / plain),
               "run_ratio_vs_plain": rnd(median(totals[v]) / plain_total)}
        key = targets.get(v)
        if key is not None:
            value = row["run_ratio_vs_plain"] if v == "once" else row["ratio_vs_plain"]
            row.update(target=key[0], target_name=key[1], meets_target=value <= key[0])
        emit(row)
        rows.append(row)
    return rows


def bytes_per_ref_step(store) -> float:
    return store.bytes / max(1, len(store))


def run_unet(opts) -> tuple[list, dict]:
    import torch

    model, blocks, hw, _, _ = hr.speed_setup(opts, "reuse benchmark")
    from personalize_pack.attention.ref_cache import STORE
    from personalize_pack.nodes.attention import MultiReferenceAttentionNode
    refs = hr.make_references(opts.refs, hw, opts.mask)
    mrsa = MultiReferenceAttentionNode.execute(model, refs, PRESET, "", 0.0, 1.0, 1.0, 0).result[0]
    models = {"plain": model, "per_step": mrsa, "warm": reuse(mrsa),
              "once": reuse(mrsa, references_run=ONCE, keep_across_runs=False)}
    g = torch.Generator().manual_seed(0)
    cond = ([[torch.randn(1, 77, 768, generator=g), {}]], [[torch.randn(1, 77, 768, generator=g), {}]])
    probe = hr.BatchProbe(model.model.diffusion_model)

    def run(m, batch, seed):
        return timed_run(m, 4, batch, hw, opts.steps, 7.0, cond, probe, seed, "normal")

    STORE.drop()
    for name in ("plain", "warm"):                      # warm-up; fills the cache (not timed)
        run(models[name], min(opts.batches), 999)
    size = {"bytes": STORE.bytes, "entries": len(STORE), "per_ref_step_bytes": bytes_per_ref_step(STORE)}
    emit({"kind": "setup", "part": "unet", "layout": opts.layout, "size_px": opts.size, "latent": list(hw),
          "refs": opts.refs, "mask": opts.mask, "steps": opts.steps, "repeats": opts.repeats, "preset": PRESET,
          "dtype": str(next(model.model.diffusion_model.parameters()).dtype), "torch": torch.__version__,
          "threads": torch.get_num_threads(), "cache": size})
    rows = []
    for B in opts.batches:
        targets = {"warm": (TARGETS[f"warm_B{B}"], f"warm_B{B}") if f"warm_B{B}" in TARGETS else None,
                   "once": (TARGETS["once_first_run"], "once_first_run") if B == 1 else None}
        # Above batch 1 only the warm cache has a target: the other variants run there with --all-batches.
        chosen = models if B == 1 or opts.all_batches else {k: models[k] for k in ("plain", "warm")}
        rows += compare("unet", chosen, B, run, opts, {k: v for k, v in targets.items() if v and k in chosen})
    return rows, size


def run_flux(opts) -> tuple[list, dict, dict]:
    from bench_flux import load_flux, make_conditioning, make_flux_references
    from personalize_pack.attention.ref_cache import STORE
    from personalize_pack.nodes.attention import MultiReferenceAttentionNode

    fopts = argparse.Namespace(heads=opts.heads, depth=opts.depth, single=opts.single, variant="dev",
                               text_tokens=77, refs=opts.refs, mask=opts.mask)
    hw = (opts.flux_size // 8, opts.flux_size // 8)
    with tempfile.TemporaryDirectory(prefix="bench_reuse_") as tmp:
        model, spec, _, _, _ = load_flux(fopts, Path(tmp))
        refs = make_flux_references(fopts, hw)
        mrsa = MultiReferenceAttentionNode.execute(model, refs, FLUX_PRESET, "", 0.0, 1.0, 1.0, 0).result[0]
        models = {"plain": model, "per_step": mrsa, "warm": reuse(mrsa),
                  "once": reuse(mrsa, references_run=ONCE, keep_across_runs=False)}
        cond = make_conditioning(fopts)
        probe = hr.BatchProbe(model.model.diffusion_model)

        def run(m, batch, seed):
            return timed_run(m, 16, batch, hw, opts.steps, 1.0, cond, probe, seed, "simple")

        STORE.drop()
        for name in ("plain", "warm"):
            run(models[name], 1, 999)
        size = {"bytes": STORE.bytes, "entries": len(STORE), "per_ref_step_bytes": bytes_per_ref_step(STORE)}
        shape = {"blocks": spec.single, "tokens": spec.image_tokens(hw), "hidden": 128 * opts.heads, "dtype_bytes": 4}
        emit({"kind": "setup", "part": "flux", "heads": opts.heads, "double": opts.depth, "single": opts.single,
              "size_px": opts.flux_size, "refs": opts.refs, "mask": opts.mask, "steps": opts.steps,
              "preset": FLUX_PRESET, "cache": size, "shape": shape})
        rows = compare("flux", models, 1, run, opts, {"warm": (TARGETS["warm_flux"], "warm_flux"),
                                                      "once": (TARGETS["once_first_run"], "once_first_run_flux")})
    return rows, size, shape


def size_lines(unet_size, opts, flux=None):
    """The cache's size: measured here, and at the sizes users sample at (SD1.5 512 px, FLUX 1024 px)."""
    out = []
    if unet_size is not None:
        # Tokens of every patched layer scale with the image area; fp32 here, fp16 on a GPU.
        per = unet_size["per_ref_step_bytes"] * (512 / opts.size) ** 2 * 0.5
        row = {"kind": "cache_size", "model": "SD1.5 (output 6-11)", "size_px": 512, "steps": 30, "refs": 2,
               "dtype": "float16", "mask": opts.mask, "per_ref_step_mib": rnd(per / 2**20, 2),
               "run_mib": rnd(per * 2 * 30 / 2**20, 1), "measured_at_px": opts.size,
               "measured_per_ref_step_mib": rnd(unet_size["per_ref_step_bytes"] / 2**20, 3)}
        if opts.layout != "full":
            row["note"] = "--layout small has narrower layers than SD1.5: this size is not SD1.5's"
        emit(row)
        out.append(row)
    if flux is not None:
        size, shape = flux
        rule = shape["blocks"] * shape["tokens"] * shape["hidden"] * 2 * shape["dtype_bytes"]
        frac = size["per_ref_step_bytes"] / rule           # the kept share of the tokens (1 for full masks)
        per = 38 * 4096 * 3072 * 2 * 2 * frac
        row = {"kind": "cache_size", "model": "FLUX.1 dev (single blocks)", "size_px": 1024, "steps": 28, "refs": 2,
               "dtype": "bfloat16", "mask": opts.mask, "kept_token_share": rnd(frac, 3),
               "rule_checked": abs(frac - 1.0) < 1e-6 if opts.mask == "full" else None,
               "per_ref_step_mib": rnd(per / 2**20, 1), "run_gib": rnd(per * 2 * 28 / 2**30, 2),
               "once_per_run_gib": rnd(per * 2 / 2**30, 2)}
        emit(row)
        out.append(row)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    hr.add_speed_args(ap, steps=20, repeats=2, steps_help="sampling steps per run; default 20 (the once-per-run "
                                                          "target is for a 20-step first run)")
    hr.add_attention_arg(ap)
    ap.add_argument("--parts", type=hr.csv_choice({"unet", "flux"}), default=["unet", "flux"],
                    help="unet, flux or both; default both")
    ap.add_argument("--refs", type=int, default=2, help="references; default 2")
    ap.add_argument("--batches", type=hr.int_list, default=[1, 4], help="UNet image batch sizes; default 1,4")
    ap.add_argument("--all-batches", action="store_true",
                    help="run per_step and once at every batch size (default: at batch 1 only; above it plain and "
                         "warm, the only variant with a target there)")
    ap.add_argument("--mask", choices=("full", "half"), default="full",
                    help="reference masks: all ones (the default) or a centred half-area box")
    ap.add_argument("--heads", type=int, default=4, help="FLUX heads of 128 channels; default 4")
    ap.add_argument("--depth", type=int, default=4, help="FLUX double blocks; default 4")
    ap.add_argument("--single", type=int, default=8, help="FLUX single blocks; default 8")
    ap.add_argument("--flux-size", type=int, default=512, help="FLUX image size in px; default 512")
    opts = ap.parse_args(argv)
    if opts.steps < 3:
        ap.error("--steps must be at least 3")

    t0 = time.perf_counter()
    rows, unet_size, flux = [], None, None
    if "unet" in opts.parts:
        r, unet_size = run_unet(opts)
        rows += r
    if "flux" in opts.parts:
        if "unet" not in opts.parts:
            hr.setup_comfy(hr.comfyui_path(opts, "reuse benchmark"), opts.attention)
            hr.import_pack()
        r, size, shape = run_flux(opts)
        rows += r
        flux = (size, shape)
    size_lines(unet_size, opts, flux)
    representative = opts.layout == "full" and opts.size == 256 and opts.steps == 20 and opts.mask == "full"
    flux_default = (opts.heads, opts.depth, opts.single, opts.flux_size) == (4, 4, 8, 512)
    checks = {}
    for row in rows:
        if "meets_target" in row:
            name = row["target_name"]
            checks[name] = {"value": row["run_ratio_vs_plain"] if row["variant"] == "once" else row["ratio_vs_plain"],
                            "target": row["target"], "direction": "<=", "met": row["meets_target"],
                            "applies": representative and (row["part"] == "unet" or flux_default)}
    hr.emit_summary(checks, t0, "targets are defined for --layout full --size 256 --steps 20 --mask full and the "
                                "default FLUX; checks with applies=false only show that the benchmark works")
    return 0


if __name__ == "__main__":
    sys.exit(main())
