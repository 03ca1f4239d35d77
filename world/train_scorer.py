"""Training and validating the world's scorer (``scorer.Reader``) on the world's scenes: each scene
rendered, and the same scene encoded and decoded by the world's VAE with some noise on the latent (the
look of a generated image). Objects are found by ``scorer.segment`` exactly as at scoring time and
labelled by the scene's truth."""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from . import data, scorer, vae

HEADS = ("shape", "colour", "pattern")


def scene_images(seed: int, n: int, tae, log=print) -> tuple[list, list]:
    """(image float [H, W, 3], scene, truth masks) for n scenes (held-out combinations included), each
    scene twice: rendered (first list), and through the VAE with latent noise of 0, 0.1 or 0.2
    (second list)."""
    out, through = [], []
    batch: list = []
    for i in range(n):
        rng = np.random.default_rng([seed, 7, i])
        scene = data.sample_scene(rng, allow_held_out=True)
        img, masks = data.render(scene)
        out.append((data.to_float(img), scene, masks))
        batch.append((img, scene, masks, float(rng.choice([0.0, 0.1, 0.2]))))
        if len(batch) == 32 or i == n - 1:
            x = vae.images_tensor([b[0] for b in batch])
            z = vae.encode(tae, x)
            z = z + torch.tensor([b[3] for b in batch]).view(-1, 1, 1, 1) * torch.randn(z.shape, generator=torch.Generator().manual_seed(seed * 100003 + i))
            rec = vae.decode(tae, z).permute(0, 2, 3, 1).numpy()
            through.extend((r, b[1], b[2]) for r, b in zip(rec, batch))
            batch = []
        if (i + 1) % 500 == 0:
            log(f"scorer scenes {i + 1}/{n}")
    return out, through


def labelled_windows(items: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of the segmented objects that match a true object (overlap over half of both), and
    their labels [N, 3] (shape, colour, pattern indices)."""
    xs, ys = [], []
    for img, scene, masks in items:
        for m in scorer.segment(img):
            for t, tm in zip(scene.things, masks):
                inter = int((m & tm).sum())
                if inter > 0.5 * m.sum() and inter > 0.5 * tm.sum():
                    xs.append(scorer.window(img, m)[0])
                    ys.append([scorer.NAMES[h].index(t.label(h)) for h in HEADS])
    return torch.stack(xs), torch.tensor(ys)


def train(seed: int, tae, scenes: int = 2500, epochs: int = 12, batch: int = 64, lr: float = 2e-3, cache=None,
          log=print):
    """``cache``: a file keeping the labelled windows (they take most of the time to make)."""
    torch.manual_seed(seed)
    t0 = time.time()
    if cache is not None and cache.is_file():
        x, y = torch.load(cache, weights_only=True)
    else:
        rendered, through = scene_images(seed, scenes, tae, log)
        x, y = labelled_windows(rendered + through)
        if cache is not None:
            torch.save((x, y), cache)
    log(f"scorer: {len(x)} object windows ({time.time() - t0:.0f} s)")
    reader = scorer.Reader()
    opt = torch.optim.AdamW(reader.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * (len(x) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    step = 0
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x) - batch + 1, batch):
            idx = perm[i:i + batch]
            xb = x[idx]
            xb = torch.cat([xb[:, :3] * (1 + 0.05 * torch.randn(len(idx), 1, 1, 1, generator=gen)), xb[:, 3:]], 1)
            logits = reader(xb)
            loss = sum(F.cross_entropy(lg, y[idx, h]) for h, lg in enumerate(logits))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 100 == 0:
                log(f"scorer step {step}/{steps} loss {float(loss.detach()):.4f} ({time.time() - t0:.0f} s)")
    return reader.eval()


def validate(sc: scorer.Scorer, items: list) -> dict:
    """Per attribute, the share of true objects the scorer reads right (an object it does not find
    counts as wrong); ``count``: the share of images whose object count it gets right; ``place``: the
    mean distance in pixels between a found object's centre and the true one's."""
    right = {h: 0 for h in HEADS}
    total, count_ok, dist = 0, 0, []
    for img, scene, masks in items:
        found = sc.read(img)
        count_ok += len(found) == len(scene.things)
        for t, tm in zip(scene.things, masks):
            total += 1
            i = scorer.match(found, tm)
            if i is None:
                continue
            f = found[i]
            for h in HEADS:
                right[h] += f.label(h) == t.label(h)
            ys, xs = np.nonzero(tm)
            dist.append(float(np.hypot(f.cx - xs.mean(), f.cy - ys.mean())))
    out = {h: right[h] / total for h in HEADS}
    out.update(count=count_ok / len(items), place_error_px=float(np.mean(dist)), objects=total, images=len(items))
    return out
