"""The shared machinery of the benchmarks (bench_*.py): output lines, statistics, command-line helpers,
ComfyUI on the CPU with the pack imported, the random SD1.5-shaped UNet, sampling with per-step
timestamps, interleaved call timing, allocation tracking and the other processes' CPU load.

Every benchmark prints one JSON object per line on stdout (``emit``) and its progress on stderr
(``log``), and closes with a ``summary`` line (``emit_summary``). See bench/README.md.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]
for _folder in ("tools", "tests"):   # the pack importer; the random-weight rules and tiny models of the tests
    if str(PACK_ROOT / _folder) not in sys.path:
        sys.path.insert(0, str(PACK_ROOT / _folder))
from pack_import import import_pack

UNET_BASE = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_heads=8,
                 num_head_channels=-1, use_spatial_transformer=True, legacy=False, context_dim=768,
                 use_linear_in_transformer=False, adm_in_channels=None, transformer_depth_middle=1,
                 num_res_blocks=[2, 2, 2, 2],
                 # input blocks 1,2 | 4,5 | 7,8 | (10,11 none); pop(0) order
                 transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                 # openaimodel pops from the END for output block 0, 1, ...: blocks 0-2 have none
                 transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0])
LAYOUTS = {
    "full": dict(channel_mult=[1, 2, 4, 4]),     # the real SD1.5 UNet: 859.5M parameters
    "small": dict(channel_mult=[1, 1, 1, 1]),    # 320 channels at every level; same block ids
}
SD15_ATTENTION_BLOCKS = ([("input", i) for i in (1, 2, 4, 5, 7, 8)] + [("middle", 0)]
                         + [("output", i) for i in range(3, 12)])


# =========================================================================== output and statistics

def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def emit_summary(checks: dict, t0: float, note: str, **extra) -> None:
    """The closing ``summary`` line: every check, whether all that apply are met, ``note`` when some
    do not apply (a smoke-test size), ``extra`` fields, and the wall time since ``t0``."""
    applying = [c["met"] for c in checks.values() if c["applies"]]
    emit({"kind": "summary", "checks": checks, "all_met": all(applying) if applying else None, **extra,
          "note": None if all(c["applies"] for c in checks.values()) else note,
          "wall_s": rnd(time.perf_counter() - t0, 1)})


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def rnd(x, n=4):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), n)


# =========================================================================== command line

def int_list(text: str) -> list[int]:
    out = [int(x) for x in text.split(",") if x.strip()]
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like '1,2,3', got '{text}'")
    return out


def csv_choice(choices):
    """An argparse type: a comma-separated list of ``choices``, duplicates dropped, order kept."""
    def parse(text: str) -> list[str]:
        out = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in out if x not in choices]
        if not out or bad:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {sorted(choices)}, got '{text}'")
        return list(dict.fromkeys(out))
    return parse


def add_speed_args(ap, steps: int = 6, repeats: int = 2, steps_help: str | None = None,
                   repeats_help: str | None = None) -> None:
    """The options the speed benchmarks of MRSA, DMSA, MIP and FASA share: --comfyui, --size, --layout,
    --steps, --repeats."""
    ap.add_argument("--comfyui", help="ComfyUI folder (default: $COMFYUI_PATH)")
    ap.add_argument("--size", type=int, default=256, help="image size in px (latent = size/8); default 256")
    ap.add_argument("--layout", choices=sorted(LAYOUTS), default="full",
                    help="full: the real SD1.5 UNet (860M); small: 320 channels at every level, same blocks")
    ap.add_argument("--steps", type=int, default=steps,
                    help=steps_help or f"sampling steps per run (the first is skipped); default {steps}")
    ap.add_argument("--repeats", type=int, default=repeats,
                    help=repeats_help or f"rounds of interleaved runs (order reversed every other round); default "
                                         f"{repeats}")


def add_attention_arg(ap, like: str = "bench_mrsa") -> None:
    """--attention: the attention function ComfyUI runs (the choice is made before ComfyUI is imported)."""
    ap.add_argument("--attention", choices=("pytorch", "default"), default="pytorch",
                    help=f"ComfyUI attention: pytorch SDPA (as {like}) or ComfyUI's CPU default")


# =========================================================================== ComfyUI and the SD1.5 UNet

def comfyui_path(opts, what: str, hint: str = "") -> Path:
    """The ComfyUI folder: ``--comfyui``, ``$COMFYUI_PATH``, or the tree the pack is installed in."""
    given = opts.comfyui or os.environ.get("COMFYUI_PATH")
    if not given and PACK_ROOT.parent.name == "custom_nodes":     # the pack installed in ComfyUI
        given = str(PACK_ROOT.parents[1])
    if not given:
        raise SystemExit(f"{what}: set COMFYUI_PATH or pass --comfyui /path/to/ComfyUI{hint}")
    return Path(given).expanduser().resolve()


def setup_comfy(root: Path, attention: str):
    if not (root / "comfy").is_dir():
        raise SystemExit(f"--comfyui / COMFYUI_PATH: {root} is not a ComfyUI folder (no comfy/ inside)")
    sys.path.insert(0, str(root))
    from comfy.cli_args import args
    args.cpu = True                  # before comfy.model_management is imported
    args.disable_api_nodes = True
    if attention == "pytorch":
        args.use_pytorch_cross_attention = True
    import comfy.model_management
    import comfy.sample
    import comfy.sd  # noqa: F401


def build_unet_state_dict(layout: str, seed: int = 0) -> dict:
    """Every key of the UNet with explicit random values (ComfyUI never initialises weights), the
    same rules as tests/tiny_models.py and docs/comfyui-host.md §5: weights N(0, 1/fan_in),
    norm weights 1, biases 0, embeddings N(0, 0.02); stored fp16 like the generated checkpoints."""
    import torch
    from tiny_models import random_state

    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    cfg = dict(UNET_BASE, **LAYOUTS[layout])
    unet = UNetModel(**cfg, device="meta", operations=comfy.ops.disable_weight_init)
    return random_state(unet, "", torch.Generator().manual_seed(seed))


def load_sd15_unet(layout: str):
    """Build the random SD1.5-shaped UNet, load it into ComfyUI as fp32 and check its attention
    blocks. Returns ``(model, blocks, build_s, load_s)``."""
    import torch
    import comfy.sd
    from personalize_pack.attention.blocks import discover_attention_blocks

    t = time.perf_counter()
    sd = build_unet_state_dict(layout)
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    model = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": torch.float32})
    del sd
    gc.collect()
    if model is None:
        raise SystemExit("ComfyUI did not detect the generated UNet")
    load_s = time.perf_counter() - t
    blocks = discover_attention_blocks(model.model.diffusion_model)
    if sorted(blocks) != sorted(SD15_ATTENTION_BLOCKS):
        raise SystemExit(f"attention blocks {sorted(blocks)} are not SD1.5's {sorted(SD15_ATTENTION_BLOCKS)}")
    return model, blocks, build_s, load_s


def latent_hw(size: int) -> tuple[int, int]:
    if size % 8:
        raise SystemExit("--size must be a multiple of 8")
    return size // 8, size // 8


def speed_setup(opts, what: str, hint: str = ""):
    """What every speed benchmark starts with: ComfyUI on the CPU (``opts.comfyui``,
    ``opts.attention``), the pack imported, the SD1.5-shaped UNet of ``opts.layout`` loaded, the
    latent size of ``opts.size``. Returns ``(model, blocks, hw, build_s, load_s)``."""
    setup_comfy(comfyui_path(opts, what, hint), opts.attention)
    import_pack()
    hw = latent_hw(opts.size)
    model, blocks, build_s, load_s = load_sd15_unet(opts.layout)
    return model, blocks, hw, build_s, load_s


# =========================================================================== sampling and timing

class BatchProbe:
    """Forward pre-hook on the UNet: the batch size of every UNet call (bench instrumentation)."""

    def __init__(self, diffusion_model):
        self.batches: list[int] = []
        diffusion_model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        if args:
            self.batches.append(int(args[0].shape[0]))


def sample_once(model, batch, hw, steps, cond, probe, seed):
    """One ``comfy.sample.sample`` run; returns (step seconds, UNet call batch sizes)."""
    import torch
    import comfy.sample

    latent = torch.zeros(batch, 4, *hw)
    noise = comfy.sample.prepare_noise(latent, seed)
    stamps = []
    probe.batches.clear()
    t0 = time.perf_counter()
    out = comfy.sample.sample(model, noise, steps, 7.0, "euler", "normal", cond[0], cond[1], latent,
                              callback=lambda i, x0, x, total: stamps.append(time.perf_counter()),
                              disable_pbar=True, seed=seed)
    if len(stamps) != steps:
        raise RuntimeError(f"expected {steps} callbacks, got {len(stamps)}")
    if not torch.isfinite(out).all():
        raise RuntimeError("sampling produced non-finite values")
    marks = [t0] + stamps
    return [b - a for a, b in zip(marks, marks[1:])], sorted(set(probe.batches))


def make_references(R, hw, mask_kind, seed=1):
    """R references with random 4-channel latents of size ``hw``, weight 3; masks all ones (``full``) or
    a centred box covering half of the area (``half``)."""
    import torch
    from personalize_pack.references.reference import Reference

    g = torch.Generator().manual_seed(seed)
    h, w = hw
    refs = []
    for i in range(R):
        mask = torch.ones(h * 8, w * 8)
        if mask_kind == "half":      # a centred box covering half of the area
            mask.zero_()
            s = round(h * 8 / math.sqrt(2)), round(w * 8 / math.sqrt(2))
            top, left = (h * 8 - s[0]) // 2, (w * 8 - s[1]) // 2
            mask[top:top + s[0], left:left + s[1]] = 1
        refs.append(Reference(latent=torch.randn(1, 4, h, w, generator=g), mask=mask, weight=3.0,
                              name=f"ref{i}"))
    return refs


def sdpa(q, k, v, heads):
    """Plain multi-head attention on ``[B, N, h*d]`` through ``scaled_dot_product_attention``."""
    import torch.nn.functional as F

    b, n, c = q.shape
    split = lambda x: x.view(x.shape[0], x.shape[1], heads, c // heads).transpose(1, 2)
    return F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(b, n, c)


def timed(fn, *args) -> float:
    """Seconds of one call ``fn(*args)``."""
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def timed_runs(fn, repeats: int):
    """One warm-up call, then ``repeats`` timed calls: (median seconds, every run's seconds)."""
    fn()
    runs = [timed(fn) for _ in range(repeats)]
    return statistics.median(runs), runs


def interleaved(calls: dict, rounds: int, warmup: int = 0, self_timed: bool = False) -> dict:
    """``{name: [seconds, ...]}`` of the calls ``{name: fn}`` timed once per round, the order reversed
    every other round, after ``warmup`` untimed calls each. ``self_timed``: each call returns its own
    seconds (it times only part of itself)."""
    names = list(calls)
    for n in names:
        for _ in range(warmup):
            calls[n]()
    times = {n: [] for n in names}
    for i in range(rounds):
        for n in (names if i % 2 == 0 else names[::-1]):
            times[n].append(calls[n]() if self_timed else timed(calls[n]))
    return times


def time_calls(calls: dict, repeats: int) -> dict:
    """Medians and minima (seconds) of interleaved calls, order reversed every other round, after
    two warm-up calls each."""
    import torch

    with torch.no_grad():
        times = interleaved(calls, repeats, warmup=2)
    return {n: (median(x), min(x)) for n, x in times.items()}


def unet_call(model, hw, ctx):
    """``call(n)``: one plain UNet call (``apply_model``, no sampler) of batch ``n`` at latent size ``hw``
    with the text ``ctx`` ``[1, T, D]``, the model loaded first; returns the call's seconds."""
    import torch
    import comfy.model_management as mm

    mm.load_models_gpu([model])

    def call(n):
        x = torch.randn(n, 4, *hw)
        t = torch.full((n,), 5.0)
        with torch.no_grad():
            start = time.perf_counter()
            model.model.apply_model(x, t, c_crossattn=ctx.expand(n, -1, -1), transformer_options={})
            return time.perf_counter() - start
    return call


def run_floor(model, opts, hw, cond) -> list:
    """The floor of any pass that recomputes the references every step: a plain UNet call of batch
    2B+R over one of batch 2B, timed directly (median of interleaved calls). The sampling ratio
    of ours over this floor is the overhead the patch itself adds."""
    call = unet_call(model, hw, cond[0][0][0])
    call(2)
    rows = []
    for B in opts.batches:
        sizes = [2 * B] + [2 * B + R for R in opts.refs]
        times = interleaved({n: (lambda n=n: call(n)) for n in sizes}, max(3, opts.repeats), self_timed=True)
        for R in opts.refs:
            ratio = median(times[2 * B + R]) / median(times[2 * B])
            row = {"kind": "floor", "batch": B, "refs": R, "plain_call_batch": 2 * B, "ours_call_batch": 2 * B + R,
                   "plain_call_s": rnd(median(times[2 * B])), "ours_call_batch_s": rnd(median(times[2 * B + R])),
                   "floor_ratio": rnd(ratio)}
            emit(row)
            rows.append(row)
    return rows


# =========================================================================== memory and machine load

def allocation_events(prof) -> list[tuple[int, int]]:
    """(start ns, bytes) of the CPU allocation (+) and free (-) events a torch profiler recorded, in
    time order."""
    return sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                  if e.name() == "[memory]" and "CPU" in str(e.device_type()))


def live_peak(events) -> tuple[int, int]:
    """(peak of the live bytes, live bytes at the end) over ``allocation_events``."""
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak, live


def tracked_peak(fn) -> dict:
    """Peak of the live bytes one call allocates (torch profiler allocation events, in time order),
    output included; the inputs are not counted."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = allocation_events(prof)
    peak, _ = live_peak(events)
    del out
    return {"peak_bytes": peak, "valid": bool(events),
            "largest_allocations": sorted((n for _, n in events if n > 0), reverse=True)[:4]}


class ForeignLoad:
    """CPU time the *other* processes of the machine use, in cores: the machine's busy time
    (``/proc/stat``) minus this process's own CPU time (``os.times``), per wall second. 0 on an idle
    machine; 2 when other work keeps both cores of a 2-core machine busy. None where ``/proc/stat``
    is missing."""

    def __init__(self):
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._t = self._read()

    def _read(self):
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        busy = sum(fields[:8]) - fields[3] - fields[4]          # all but idle and iowait
        own = os.times()
        return time.perf_counter(), busy / self.hz, own.user + own.system

    def start(self):
        self._t = self._read()

    def cores(self):
        """Other processes' cores since ``start``."""
        now = self._read()
        if now is None or self._t is None or now[0] <= self._t[0]:
            return None
        return max(0.0, ((now[1] - self._t[1]) - (now[2] - self._t[2])) / (now[0] - self._t[0]))

    def wait_quiet(self, limit_s: float, busy: float, window_s: float = 1.0) -> float | None:
        """Wait (up to ``limit_s``) until the other processes use less than ``busy`` cores over a
        ``window_s`` window; returns the last window's value."""
        end = time.perf_counter() + limit_s
        while True:
            self.start()
            time.sleep(window_s)
            load = self.cores()
            if load is None or load < busy or time.perf_counter() >= end:
                return load
