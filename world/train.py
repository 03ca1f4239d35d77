"""Training the world's UNet from a seed: the caption pool encoded once by the seeded CLIP-L, a fixed
set of scenes encoded once by the world's VAE, then noise-prediction training of the 64-channel
network with an exponential moving average of its weights (the EMA is what ships)."""
from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import torch

from . import data, text, unet, vae


def caption_embeddings(seed: int, cache: Path | None, log=print) -> tuple[list, torch.Tensor]:
    """The pool's captions (index 0 is the empty caption, for classifier-free guidance) and their
    conditioning [P, 77, 768] (fp16); cached in ``cache`` when given."""
    captions = [""] + [data.plan_caption(p) for p in data.caption_pool(seed)]
    if cache is not None and cache.is_file():
        saved = torch.load(cache, weights_only=True)
        if saved["captions"] == captions:
            return captions, saved["z"]
    z = text.encode_captions(text.load_clip(), captions, log=log).half()
    if cache is not None:
        torch.save({"captions": captions, "z": z}, cache)
    return captions, z


def scene_latents(seed: int, n: int, vae_sd: dict, log=print) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` training scenes drawn from the pool (scene i from its own generator), their latents
    [n, 4, 16, 16] and caption indices [n] (into ``caption_embeddings``)."""
    pool = data.caption_pool(seed)
    tae = vae.load_state(vae_sd)
    latents, idx = [], []
    batch = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        k = data.pick_plan(rng, pool)
        img, _ = data.render(data.realise(pool[k], rng))
        batch.append(img)
        idx.append(k + 1)
        if len(batch) == 64 or i == n - 1:
            latents.append(vae.encode(tae, vae.images_tensor(batch)))
            batch = []
            if len(latents) % 25 == 0:
                log(f"scenes {i + 1}/{n}")
    return torch.cat(latents), torch.tensor(idx)


# The UNet's training, in phases run one after the other on the same optimiser: each phase has its own
# learning rate (linear warm-up, then cosine to a tenth) and its weight on the low-frequency term of
# ``unet.diffusion_loss``. Phase 1 is the first world run (its end, step 1,800, drew backgrounds in the
# wrong colour); phase 2 adds the low-frequency term and trains on; phases 3 and 4 restart the learning
# rate lower (the prompt's colour was still the weakest attribute; held-out shape and colour went from
# 77% at the end of phase 3 to 83% at the end of phase 4, world/README.md).
PHASES = (dict(steps=1800, lr=5e-4, warmup=200, low_freq=0.0),
          dict(steps=2800, lr=4e-4, warmup=50, low_freq=0.05),
          dict(steps=1400, lr=3e-4, warmup=50, low_freq=0.05),
          dict(steps=2200, lr=2.5e-4, warmup=50, low_freq=0.05))


def lr_at(step: int, phases=PHASES) -> tuple[float, int]:
    """The learning rate at a global step and the phase it belongs to."""
    first = 0
    for k, ph in enumerate(phases):
        if step < first + ph["steps"]:
            s, n, w, lr = step - first, ph["steps"], ph["warmup"], ph["lr"]
            if s < w:
                return lr * (s + 1) / w, k
            return lr * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * (s - w) / max(1, n - w)))), k
        first += ph["steps"]
    raise ValueError(f"step {step} is past the last phase (the phases total {first} steps)")


def train_unet(latents: torch.Tensor, caption_idx: torch.Tensor, z: torch.Tensor, seed: int = 0,
               phases=PHASES, batch: int = 32, ema_decay: float = 0.999, drop: float = 0.1,
               checkpoint: Path | None = None, stop: int | None = None, log=print) -> tuple[dict, dict, list]:
    """Returns (the network's state dict, its EMA's, the loss history). ``checkpoint``: a file written
    every 250 steps and resumed from when present; ``stop``: end at this global step (default: the end
    of the last phase). The EMA starts after phase 1's warm-up with ``min(ema_decay, (1 + n) / (10 + n))``
    after n EMA steps; a checkpoint without an EMA start (written before this rule) restarts the EMA
    from the network at the resumed step."""
    total = sum(ph["steps"] for ph in phases)
    if stop is not None and stop < 1:
        raise ValueError(f"stop: expected a step of at least 1 (the phases total {total} steps), got {stop}")
    stop = total if stop is None else min(stop, total)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = unet.build_small(seed)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=phases[0]["lr"], weight_decay=0.01)
    acp = unet.alphas_cumprod()
    history: list = []
    start, ema_start = 0, phases[0]["warmup"]
    if checkpoint is not None and checkpoint.is_file():
        st = torch.load(checkpoint, weights_only=False)
        net.load_state_dict(st["net"])
        ema.load_state_dict(st["ema"])
        opt.load_state_dict(st["opt"])
        gen.set_state(st["gen"])
        history, start = st["history"], st["step"]
        ema_start = st.get("ema_start")
        if ema_start is None:
            ema.load_state_dict(net.state_dict())
            ema_start = start
        log(f"resumed at step {start} (EMA from step {ema_start})")

    t0 = time.time()
    for step in range(start, stop):
        lr, k = lr_at(step, phases)
        for g in opt.param_groups:
            g["lr"] = lr
        pick = torch.randint(0, len(latents), (batch,), generator=gen)
        cap = caption_idx[pick].clone()
        cap[torch.rand(batch, generator=gen) < drop] = 0
        loss = unet.diffusion_loss(net, latents[pick], z[cap].float(), gen, acp, low_freq=phases[k]["low_freq"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            n_ema = step - ema_start
            d = 0.0 if n_ema < 0 else min(ema_decay, (1 + n_ema) / (10 + n_ema))
            for pe, pn in zip(ema.parameters(), net.parameters()):
                pe.lerp_(pn, 1 - d)
        history.append(float(loss.detach()))
        if step % 50 == 0 or step == stop - 1:
            log(f"unet step {step} (phase {k + 1}) loss {np.mean(history[-50:]):.4f} lr {lr:.2e} ({time.time() - t0:.0f} s)")
        if checkpoint is not None and ((step + 1) % 250 == 0 or step == stop - 1):
            tmp = checkpoint.with_suffix(".tmp")
            torch.save({"net": net.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                        "gen": gen.get_state(), "history": history, "step": step + 1, "ema_start": ema_start}, tmp)
            tmp.replace(checkpoint)
    return ({k: v.detach().clone() for k, v in net.state_dict().items()},
            {k: v.detach().clone() for k, v in ema.state_dict().items()}, history)
