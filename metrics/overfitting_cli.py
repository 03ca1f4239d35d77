"""The command line ``tools/evaluate.py overfitting ...``: Infusion's overfitting metrics (LFD, W2;
``metrics/overfitting_comfy.py``) of a customised model (a LoRA and/or an Infusion file on a checkpoint)
against its base checkpoint, with ComfyUI imported in-process. Exit status: 0 done, 1 error, 2 bad
arguments (``metrics/common_cli.run_cli``)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from ..attention.infusion import apply_infusion
from ..files.atomic import atomic_write_text
from ..training.comfy_model import init_comfy
from ..training.infusion import load_offsets
from . import models as em
from .common_cli import Progress, check_output, run_cli
from .errors import UsageError
from .overfitting_comfy import OverfittingError, overfitting_metrics, parse_prompt_lines
from .overfitting_report import format_report, json_ready

__all__ = ["build_parser", "read_prompts", "init_comfyui", "load_models", "load_eval_model", "run", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="evaluate.py overfitting",
        description="Infusion's overfitting metrics of a customised model (a LoRA and/or an Infusion file on a "
                    "checkpoint) against its base checkpoint: the latent Fisher divergence (LFD) on prompts without "
                    "the concept and the Wasserstein-2 distance (W2) between image features of the base model's "
                    "class images and the customised model's concept images. Runs ComfyUI in-process.",
        epilog="Exit status: 0 done, 1 error, 2 bad arguments.")
    p.add_argument("--comfyui", help="ComfyUI install (default: $COMFYUI_PATH)")
    p.add_argument("--checkpoint", required=True, metavar="FILE", help="the base checkpoint (.safetensors/.ckpt)")
    p.add_argument("--lora", metavar="FILE", help="a LoRA file applied to the base model's UNet (core LoraLoader's "
                                                  "format); its text-encoder part is not applied")
    p.add_argument("--lora-strength", type=float, default=1.0, help="the LoRA's model strength (default 1.0)")
    p.add_argument("--infusion", metavar="FILE", help="an Infusion file (Train Infusion's .safetensors or an "
                                                      "official .ckpt), applied as Apply Infusion does")
    p.add_argument("--concept-word", default="", help="Infusion: the concept word (default: the one in the file)")
    p.add_argument("--infusion-prompt", help="Infusion: the prompt Apply Infusion locates the concept word in "
                                             "(default: the first --prompts-with prompt)")
    p.add_argument("--infusion-strength", type=float, default=1.0, help="Infusion: strength (default 1.0)")
    p.add_argument("--eval-model", metavar="FILE", help="CLIP (open_clip) or DINO ViT-S/16 file for W2 "
                                                       "(without it W2 is not computed)")
    p.add_argument("--eval-kind", choices=("auto", "clip", "dino"), default="auto",
                   help="the --eval-model's kind (default auto: dino when the file name contains 'dino')")
    p.add_argument("--clip-arch", default=em.CLIP_ARCH, help=f"open_clip architecture (default {em.CLIP_ARCH})")
    p.add_argument("--prompts-without", action="append", metavar="FILE|TEXT",
                   help="prompts without the concept: a text file (one per line) or a prompt; repeatable")
    p.add_argument("--prompts-with", action="append", metavar="FILE|TEXT",
                   help="prompts with the concept (class word / identifier as you write it): a text file or a "
                        "prompt; repeatable")
    p.add_argument("--negative", default="", help="negative prompt for the generations (default empty)")
    p.add_argument("--levels", type=int, default=8, help="noise levels for LFD (default 8)")
    p.add_argument("--samples", type=int, default=4, help="samples per prompt (default 4)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps of the generations (default 20)")
    p.add_argument("--cfg", type=float, default=7.5, help="CFG scale of the generations (default 7.5)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--size", type=int, default=512, help="image size in pixels (default 512)")
    p.add_argument("--shrinkage", default="auto", help="W2 covariance shrinkage: auto (Ledoit-Wolf) or a number "
                                                      "in [0, 1] (0: none)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even where CUDA is available")
    p.add_argument("--out", metavar="FILE", help="write the report as JSON (NaN as null)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show the traceback of an unexpected error")
    return p


def read_prompts(values, flag: str) -> list[str]:
    out = []
    for v in values or []:
        path = Path(v)
        if "\n" not in v and len(v) < 4096 and path.is_file():
            out += parse_prompt_lines(path.read_text(encoding="utf-8"))
        else:
            out += parse_prompt_lines(v)
    return out


def _file(path, flag: str) -> str:
    if path is None:
        return None
    if not Path(path).is_file():
        raise UsageError(f"{flag} {path}: no such file")
    return str(Path(path).resolve())


def _shrinkage(text: str):
    if text == "auto":
        return "auto"
    try:
        v = float(text)
    except ValueError:
        raise UsageError(f"--shrinkage: expected auto or a number in [0, 1], got {text!r}") from None
    if not 0.0 <= v <= 1.0:
        raise UsageError(f"--shrinkage: expected auto or a number in [0, 1], got {text!r}")
    return v


def init_comfyui(path, cpu: bool = False) -> None:
    """Import ComfyUI from ``path`` (or ``$COMFYUI_PATH``) in this process, on the CPU when asked or
    when there is no CUDA (``training.comfy_model.init_comfy``)."""
    path = path or os.environ.get("COMFYUI_PATH")
    if not path:
        raise UsageError("no ComfyUI install given: pass --comfyui PATH or set COMFYUI_PATH")
    root = Path(path).expanduser().resolve()
    if not (root / "comfy").is_dir() or not (root / "folder_paths.py").is_file():
        raise UsageError(f"--comfyui {root} is not a ComfyUI install (no comfy/ or folder_paths.py)")
    device = torch.device("cpu" if cpu or not torch.cuda.is_available() else "cuda")
    init_comfy(str(root), device)


def load_models(a):
    """``(base, custom, clip, vae)`` for the command's arguments."""
    import comfy.sd
    import comfy.utils
    base, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(a.checkpoint, output_vae=True, output_clip=True)
    if base is None or clip is None:
        raise UsageError(f"--checkpoint {a.checkpoint}: ComfyUI found no diffusion model and CLIP in it")
    custom = base
    if a.lora:
        sd = comfy.utils.load_torch_file(a.lora, safe_load=True)
        custom, _ = comfy.sd.load_lora_for_models(custom, None, sd, a.lora_strength, 0.0)
        if not getattr(custom, "patches", None):
            raise UsageError(f"--lora {a.lora}: none of its keys match the checkpoint's UNet")
    if a.infusion:
        prompt = a.infusion_prompt or (a.prompts_with_list[0] if a.prompts_with_list else None)
        if not prompt:
            raise UsageError("--infusion: give --infusion-prompt (or --prompts-with) with the concept word")
        custom = apply_infusion(custom, load_offsets(a.infusion), clip, prompt, a.concept_word, a.infusion_strength,
                                f"--infusion {a.infusion}")
    return base, custom, clip, vae


def load_eval_model(a):
    if not a.eval_model:
        return None
    kind = a.eval_kind
    if kind == "auto":
        kind = "dino" if "dino" in Path(a.eval_model).name.lower() else "clip"
    return em.load_dino(a.eval_model) if kind == "dino" else em.load_clip(a.eval_model, a.clip_arch)


def run(a, stdout=None, stderr=None) -> dict:
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    a.checkpoint = _file(a.checkpoint, "--checkpoint")
    a.lora = _file(a.lora, "--lora")
    a.infusion = _file(a.infusion, "--infusion")
    a.eval_model = _file(a.eval_model, "--eval-model")
    if not a.lora and not a.infusion:
        raise UsageError("give the customised model: --lora FILE and/or --infusion FILE")
    without = read_prompts(a.prompts_without, "--prompts-without")
    a.prompts_with_list = read_prompts(a.prompts_with, "--prompts-with")
    if not without:
        raise UsageError("--prompts-without: give prompts without the concept (a file, one per line, or the flag "
                         "repeated)")
    if a.eval_model and not a.prompts_with_list:
        raise UsageError("--prompts-with: give prompts with the concept for W2 (or leave out --eval-model)")
    for flag, v, lo in (("--levels", a.levels, 1), ("--samples", a.samples, 1), ("--steps", a.steps, 1),
                        ("--size", a.size, 8)):
        if v < lo:
            raise UsageError(f"{flag}: expected an integer ≥ {lo}, got {v}")
    shrinkage = _shrinkage(a.shrinkage)
    if a.out:
        check_output(Path(a.out), "--out")
    init_comfyui(a.comfyui, a.cpu)
    eval_model = load_eval_model(a)
    base, custom, clip, vae = load_models(a)
    mode = "off" if a.no_progress else "bar" if hasattr(stderr, "isatty") and stderr.isatty() else "lines"
    bar = Progress(0, stderr, mode, width=24, label_width=48)
    try:
        report = overfitting_metrics(base, custom, clip, vae, eval_model, without, a.prompts_with_list, a.levels,
                                     a.samples, a.steps, a.seed, a.size, bar, cfg=a.cfg, negative=a.negative,
                                     shrinkage=shrinkage)
    finally:
        bar.close()
    report["inputs"] = {"checkpoint": a.checkpoint, "lora": a.lora, "lora_strength": a.lora_strength if a.lora else None,
                        "infusion": a.infusion, "eval_model": a.eval_model}
    stdout.write(format_report(report))
    if a.out:
        atomic_write_text(a.out, json.dumps(json_ready(report), indent=2) + "\n")
        stdout.write(f"\nreport: {a.out}\n")
    stdout.flush()
    return report


def main(argv=None) -> int:
    """``tools/evaluate.py overfitting ...``; returns the exit status."""
    return run_cli(build_parser(), run, argv, (UsageError,), (OverfittingError, em.EvalModelError, FileNotFoundError))
