"""The world's command line: train its parts from a seed, build the ComfyUI checkpoint, run the demo.

    python tools/world.py train vae   --out world/weights      # about 12 min on 2 cores
    python tools/world.py train unet  --out world/weights
    python tools/world.py train scorer --out world/weights
    python tools/world.py train ipadapter --out world/weights  # the IP-Adapter on the seeded ViT-L
    python tools/world.py build --comfyui /path/to/ComfyUI      # writes models/checkpoints/personalize_world.safetensors
    python tools/world.py demo --comfyui /path/to/ComfyUI --out world_demo   # MRSA on and off, scored

Training needs a ComfyUI tree (the model classes are ComfyUI's own); see world/README.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pack_import import import_pack

pack = import_pack()
from personalize_pack.world import host

WEIGHTS = Path(__file__).resolve().parents[1] / "world" / "weights"
DEFAULT_SCENES = 16000


def save(sd: dict, path: Path, meta: dict, dtype=None) -> None:
    import torch
    from personalize_pack.files.atomic import atomic_save_safetensors
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    atomic_save_safetensors(path, sd, metadata={k: json.dumps(v) if not isinstance(v, str) else v
                                                 for k, v in meta.items()})
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    del torch


def train(opts) -> None:
    root = host.comfyui_root(opts.comfyui, "tools/world.py train")
    host.setup_comfy(root)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if opts.part == "vae":
        import torch
        from personalize_pack.world import vae
        from personalize_pack.world import checkpoint
        sd, meta = None, {"seed": opts.seed}
        first = 1 if opts.resume else 0         # --resume: phase 2 from the phase-1 file already in --out
        if opts.resume:
            sd = checkpoint.read_part(checkpoint.VAE_FILE, out)
        for phase, cfg in enumerate(vae.PHASES[first:], start=first):
            sd, hist = vae.train(seed=opts.seed, init=sd, phase=phase, **cfg)
            meta[f"phase{phase + 1}"] = dict(cfg, final_reconstruction=sum(hist[-100:]) / 100)
            save(sd, out / checkpoint.VAE_FILE, meta, torch.float16)
        meta["minutes"] = round((time.time() - t0) / 60, 1)
        save(sd, out / checkpoint.VAE_FILE, meta, torch.float16)
    elif opts.part == "unet":
        import torch
        from personalize_pack.world import checkpoint, train as world_train
        work = Path(opts.work)
        work.mkdir(parents=True, exist_ok=True)
        vae_sd = checkpoint.read_part(checkpoint.VAE_FILE, out)
        captions, z = world_train.caption_embeddings(opts.seed, work / f"captions_seed{opts.seed}.pt")
        lat_file = work / f"latents_seed{opts.seed}_{opts.scenes}.pt"
        if lat_file.is_file():
            latents, idx = torch.load(lat_file, weights_only=True)
        else:
            latents, idx = world_train.scene_latents(opts.seed, opts.scenes, vae_sd)
            torch.save((latents, idx), lat_file)
        print(f"{len(latents)} scenes, {len(captions)} captions, latent std {float(latents.std()):.3f}")
        net, ema, hist = world_train.train_unet(latents, idx, z, seed=opts.seed, stop=opts.steps,
                                                checkpoint=work / "unet_training.pt")
        sd = ema if opts.export == "ema" else net
        meta = {"seed": opts.seed, "steps": len(hist), "phases": list(world_train.PHASES), "weights": opts.export, "scenes": opts.scenes, "captions": len(captions),
                "final_loss": sum(hist[-200:]) / 200, "minutes": round((time.time() - t0) / 60, 1)}
        save(sd, out / checkpoint.UNET_FILE, meta, torch.float16)
    elif opts.part == "scorer":
        import torch
        from personalize_pack.world import checkpoint, scorer, train_scorer, vae
        tae = vae.load_state(checkpoint.read_part(checkpoint.VAE_FILE, out))
        work = Path(opts.work)
        work.mkdir(parents=True, exist_ok=True)
        reader = train_scorer.train(opts.seed, tae, cache=work / f"scorer_windows_seed{opts.seed}.pt")
        rendered, through = train_scorer.scene_images(opts.seed + 1, 300, tae)
        acc = {"rendered": train_scorer.validate(scorer.Scorer(reader), rendered),
               "through_vae": train_scorer.validate(scorer.Scorer(reader), through)}
        print("scorer validation (300 fresh scenes):", json.dumps(acc))
        meta = {"seed": opts.seed, "validation": acc, "minutes": round((time.time() - t0) / 60, 1)}
        save(reader.state_dict(), out / checkpoint.SCORER_FILE, meta, torch.float16)
    elif opts.part == "ipadapter":
        import torch
        from personalize_pack.world import ip_adapter
        work = Path(opts.work)
        work.mkdir(parents=True, exist_ok=True)
        n = opts.scenes if opts.scenes != DEFAULT_SCENES else ip_adapter.SCENES
        cache = work / f"ipadapter_set_seed{opts.seed}_{n}.pt"
        if cache.is_file():
            dataset = torch.load(cache, weights_only=False)
        else:
            dataset = ip_adapter.training_set(opts.seed, n, ip_adapter.load_vision(), out)
            torch.save(dataset, cache)
        steps = opts.steps or ip_adapter.STEPS
        adapter, hist = ip_adapter.train(dataset, steps=steps, seed=opts.seed, folder=out)
        meta = {"seed": opts.seed, "steps": steps, "scenes": n, "vision_seed": ip_adapter.VISION_SEED,
                "final_loss": round(sum(hist[-100:]) / len(hist[-100:]), 4),
                "minutes": round((time.time() - t0) / 60, 1)}
        ip_adapter.save_small(adapter, out / ip_adapter.ADAPTER_FILE, meta)
        print(f"wrote {out / ip_adapter.ADAPTER_FILE}: {meta}")
    else:
        raise SystemExit(f"unknown part {opts.part!r}")


def build(opts) -> None:
    root = host.comfyui_root(opts.comfyui, "tools/world.py build")
    host.setup_comfy(root)
    from personalize_pack.world import checkpoint
    path = Path(opts.output) if opts.output else root / "models" / "checkpoints" / checkpoint.CHECKPOINT_NAME
    checkpoint.build(path, Path(opts.weights), overwrite=True)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.0f} MB)")
    if opts.check:
        checkpoint.check_loadable(path)
        print("ComfyUI loads it as an SD1.5 checkpoint")


def quality(opts) -> None:
    root = host.comfyui_root(opts.comfyui, "tools/world.py quality")
    host.setup_comfy(root)
    from personalize_pack.world import checkpoint
    from personalize_pack.world import quality as q
    from personalize_pack.world.runtime import World
    path = Path(opts.checkpoint) if opts.checkpoint else root / "models" / "checkpoints" / checkpoint.CHECKPOINT_NAME
    checkpoint.build(path, Path(opts.weights), overwrite=opts.rebuild)      # also rebuilt when older than the weights
    world = World.load(path, Path(opts.weights))
    results = {"held-out combinations": q.measure(world, q.prompts(True), opts.seeds),
               "trained combinations": q.measure(world, q.prompts(False, 24), opts.seeds, first_seed=50_000)}
    print(q.table(results))
    print(json.dumps(results))


def demo(opts) -> int:
    from ui_to_api import WorkflowError
    from world_demo import run_demo, table
    try:
        report = run_demo(opts.comfyui, Path(opts.weights), Path(opts.out), opts.models, opts.seed, opts.rebuild,
                          opts.cpu, log=lambda msg: print(msg, flush=True))
    except (WorkflowError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(table(report))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train one part of the world from a seed")
    t.add_argument("part", choices=["vae", "scorer", "unet", "ipadapter"])
    t.add_argument("--out", default=str(WEIGHTS))
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--steps", type=int, default=None, help="unet: stop at this step (default: the end of the last "
                   "phase); ipadapter: training steps (default: ip_adapter.STEPS)")
    t.add_argument("--resume", action="store_true", help="vae: run only phase 2, from the phase-1 file in --out")
    t.add_argument("--export", choices=["net", "ema"], default="ema",
                   help="unet: ship the weights' moving average (default, as the shipped file) or the "
                        "network's final weights")
    t.add_argument("--comfyui", default=None)
    t.add_argument("--work", default="world_work", help="folder for caches and the resumable training state")
    t.add_argument("--scenes", type=int, default=DEFAULT_SCENES, help="training scenes for the UNet (the "
                   "IP-Adapter: ip_adapter.SCENES unless given)")
    b = sub.add_parser("build", help="write the world checkpoint into ComfyUI's models/checkpoints")
    b.add_argument("--comfyui", default=None)
    b.add_argument("--weights", default=str(WEIGHTS))
    b.add_argument("--output", default=None, help="another path for the checkpoint file")
    b.add_argument("--check", action="store_true", help="load it with ComfyUI's checkpoint loader afterwards")
    q = sub.add_parser("quality", help="the quality bar: prompted shape and colour present, held-out prompts")
    q.add_argument("--comfyui", default=None)
    q.add_argument("--weights", default=str(WEIGHTS))
    q.add_argument("--checkpoint", default=None, help="the built checkpoint (default: in ComfyUI's models)")
    q.add_argument("--rebuild", action="store_true", help="build the checkpoint again from --weights")
    q.add_argument("--seeds", type=int, default=4, help="samples per prompt")
    d = sub.add_parser("demo", help="run the shipped world MRSA workflow with and without MRSA and score both")
    d.add_argument("--comfyui", default=None, help="ComfyUI tree (default: $COMFYUI_PATH)")
    d.add_argument("--weights", default=str(WEIGHTS), help="folder of the world's weights (default: world/weights)")
    d.add_argument("--out", default="world_demo", help="folder for the two images and the scores (default: world_demo)")
    d.add_argument("--models", default=None, help="models folder holding checkpoints/ (default: ComfyUI's models/); "
                                                  "the world checkpoint is built there when missing")
    d.add_argument("--seed", type=int, default=None, help="sampler seed for both runs (default: the workflow's)")
    d.add_argument("--rebuild", action="store_true", help="rebuild the checkpoint from --weights even if it exists")
    d.add_argument("--cpu", action="store_true", help="run on the CPU even where CUDA is available")
    opts = ap.parse_args(argv)
    if opts.cmd == "quality":
        quality(opts)
    elif opts.cmd == "train":
        train(opts)
    elif opts.cmd == "build":
        build(opts)
    elif opts.cmd == "demo":
        return demo(opts)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
