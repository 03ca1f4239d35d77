"""The job interface the training loop (``training/sidecar.py``) drives, and the ``toy`` kind the
tests and the overhead benchmark use.

A job kind is a :class:`Job` subclass registered in ``training/sidecar.py``'s ``JOB_KINDS`` under the
``kind`` name ``job.json`` gives (the ComfyUI kinds are in ``training/comfy_model.py``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from .checkpoint import file_digest


@dataclass
class JobContext:
    """What the loop tells a job in ``setup``."""
    job_dir: Path
    config: dict
    device: torch.device
    seed: int
    total_steps: int
    rank: int = 0                 # this process's rank (0 when not distributed)
    world_size: int = 1           # number of processes sharing every step's batch
    is_main: bool = True          # rank 0: the only process that writes files and events

    def shard(self, n: int) -> slice:
        """This rank's part of a global batch of ``n`` items (contiguous, ``n // world_size`` each).
        ``n`` must be divisible by the world size: the loop averages the ranks' gradients with equal
        weights, which equals the single-process gradient of the mean loss only for equal shares."""
        if n % self.world_size:
            raise ValueError(f"the batch ({n}) must be divisible by the number of processes ({self.world_size})")
        per = n // self.world_size
        return slice(self.rank * per, (self.rank + 1) * per)


class Job:
    """One training job, driven by the generic loop in ``training/sidecar.py``.

    The loop owns everything around the job's math: seeding (Python ``random``, NumPy and torch's
    global generators all start from ``config["seed"]``, the same on every rank), the optimizer
    (``make_optimizer``), ``zero_grad`` / ``backward`` / gradient averaging across ranks / clipping
    (``config["max_grad_norm"]``, default 1.0, 0 = off) / ``optimizer.step``, checkpoints (the job's
    ``state_tensors`` + optimizer state + global RNG states + loss history), resume, events,
    Cancel, and the atomic move of the final file. The job only computes.

    Life cycle (every rank runs all of it; only rank 0 writes)::

        job = Kind(job_dir, config)          # cheap: keep the arguments, read nothing big
        job.setup(ctx)                       # build the model, load data, create the trainable tensors on ctx.device
        opt = job.make_optimizer(job.parameters())
        [job.load_state_tensors(t)]          # on resume (the optimizer and RNGs are restored by the loop)
        for i in range(start, total):        # i counts from 0; events number steps from 1
            for a in range(accumulation):    # config["gradient_accumulation"] micro-batches (default 1)
                loss = job.loss(i, a)        # forward of THIS rank's share of micro-batch a of step i -> scalar
            ...                              # loop: backward, all_reduce, clip, opt.step(), loss.item()
            [job.preview(i + 1)]             # every validate_every steps, rank 0 only
        job.save_final(tmp_path)             # rank 0: write the result; the loop renames it to config["output"]

    Rules for a deterministic, resumable job:

    * Draw the random things of micro-batch ``a`` of step ``i`` (batch indices, noise, timesteps)
      from torch's global generator (or ``random`` / NumPy) inside ``loss(i, a)``: the loop saves and restores those
      states, so a resumed run repeats the uninterrupted one bit for bit. A private
      ``torch.Generator`` must go into ``state_tensors`` (``gen.get_state()``).
    * With several ranks every rank draws the same numbers (same seed): draw for the *global*
      batch, then keep ``ctx.shard(batch)``; the result equals one process with the whole batch.
    * ``loss`` returns the mean over this rank's share (the loop averages the ranks' gradients).
    * Keep the trainable tensors' identity fixed after ``setup``: the optimizer holds them.

    Class attributes: ``REQUIRED_KEYS`` (job.json keys this kind needs; a missing one is a clear
    error before ``setup``), ``VOLATILE_KEYS`` (keys that may change between a run and its resume,
    beyond the loop's own ``steps``, intervals, paths and device: excluded from the config hash).
    """

    REQUIRED_KEYS: tuple[str, ...] = ()
    VOLATILE_KEYS: tuple[str, ...] = ()

    def __init__(self, job_dir: Path, config: dict):
        self.job_dir = Path(job_dir)
        self.config = config
        self.ctx: JobContext | None = None

    # ---------------------------------------------------------------- to implement
    def setup(self, ctx: JobContext) -> None:
        """Build the model and data on ``ctx.device`` and create the trainable tensors."""
        self.ctx = ctx

    def parameters(self) -> list[torch.Tensor]:
        """The trainable tensors (``requires_grad=True``), in a fixed order (the optimizer state is
        saved by position)."""
        raise NotImplementedError

    def loss(self, step: int, micro: int = 0) -> torch.Tensor:
        """Forward pass of micro-batch ``micro`` (0 .. ``gradient_accumulation`` - 1) of optimizer
        step ``step`` (0-based) for this rank's share: a scalar tensor with a graph to the trainable
        tensors. No ``backward`` here: the loop averages the micro-batches' gradients."""
        raise NotImplementedError

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything of the job's own state a resume needs (the trainable tensors, private
        generators), as named tensors, on any device. Called at checkpoint steps (rank 0); the loop
        copies them at once and writes the file in the background, so returning live tensors is
        fine. Default: the trainable tensors as ``param.<i>``."""
        return {f"param.{i}": p.detach() for i, p in enumerate(self.parameters())}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what ``state_tensors`` returned (copy into the existing tensors, in place)."""
        params = self.parameters()
        missing = [f"param.{i}" for i in range(len(params)) if f"param.{i}" not in tensors]
        if missing:
            raise KeyError(f"checkpoint lacks {missing[:3]}")
        with torch.no_grad():
            for i, p in enumerate(params):
                p.copy_(tensors[f"param.{i}"])

    def save_final(self, path: Path) -> None:
        """Write the result to ``path`` (a temporary name; the loop fsyncs and renames it)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- optional
    def make_optimizer(self, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        """Default: AdamW with ``learning_rate`` (1e-4), ``weight_decay`` (1e-2), ``adam_betas``
        ((0.9, 0.999)), ``adam_eps`` (1e-8) from the config."""
        c = self.config
        return torch.optim.AdamW(params, lr=float(c.get("learning_rate", 1e-4)),
                                 weight_decay=float(c.get("weight_decay", 1e-2)),
                                 betas=tuple(c.get("adam_betas", (0.9, 0.999))), eps=float(c.get("adam_eps", 1e-8)))

    def preview(self, step: int) -> tuple[str, str] | None:
        """Rank 0, every ``validate_every`` steps (``step`` = steps done): write a PNG into the job
        folder and return (its path, a caption), or ``None`` for no preview. Runs under
        ``torch.no_grad()``, and the loop restores the global RNG states afterwards, so a preview
        never changes the training (put the model back in train mode if you switch it)."""
        return None

    def fingerprint(self) -> str | None:
        """A digest of the training data, mixed into the config hash so a resume with other data is
        refused. Default: sha256 of ``data.safetensors`` in the job folder, if there is one."""
        return file_digest(self.job_dir / "data.safetensors")

    def close(self) -> None:
        """Called once at the end (also after an error or Cancel): free what ``setup`` took."""


# =========================================================================== the toy kind

class ToyJob(Job):
    """A tiny MLP regression that overfits a fixed data set: ``samples`` inputs of size
    ``features`` (N(0, 1)) and the outputs of a random "teacher" MLP, both from the job's seed; the
    student (``features`` → ``hidden`` → ``outputs``, tanh) starts from the seed too. Each step draws
    ``batch`` sample indices with torch's global generator (so resume exercises the RNG restore).
    Test knobs (volatile): ``sleep`` seconds per step, ``fail_at_step`` raises there,
    ``fail_in_setup`` prints a line to stdout (as a chatty library would) and raises in ``setup``."""

    VOLATILE_KEYS = ("sleep", "fail_at_step", "fail_in_setup")

    def setup(self, ctx: JobContext) -> None:
        super().setup(ctx)
        c = self.config
        if c.get("fail_in_setup"):
            print("toy job: a stray line on stdout before failing")
            raise RuntimeError("toy job: failing in setup as asked (fail_in_setup)")
        f, h, o = int(c.get("features", 8)), int(c.get("hidden", 32)), int(c.get("outputs", 4))
        n, self.batch = int(c.get("samples", 64)), int(c.get("batch", 16))
        ctx.shard(self.batch)                                   # fails early on an uneven split
        g = torch.Generator().manual_seed(int(ctx.seed))
        x = torch.randn(n, f, generator=g)
        teacher = (torch.randn(f, h, generator=g) / f ** 0.5, torch.randn(h, o, generator=g) / h ** 0.5)
        y = torch.tanh(x @ teacher[0]) @ teacher[1]
        self.model = nn.Sequential(nn.Linear(f, h), nn.Tanh(), nn.Linear(h, o))
        with torch.no_grad():
            for p in self.model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 / max(p.shape[-1], 1) ** 0.5))
        self.model.to(ctx.device)
        self.x, self.y = x.to(ctx.device), y.to(ctx.device)
        self.sleep = float(c.get("sleep", 0) or 0)
        self.fail_at = c.get("fail_at_step")

    def parameters(self):
        return list(self.model.parameters())

    def loss(self, step, micro=0):
        if self.fail_at is not None and step == int(self.fail_at):
            raise RuntimeError(f"toy job: failing at step {step} as asked (fail_at_step)")
        if self.sleep:
            time.sleep(self.sleep)
        idx = torch.randperm(self.x.shape[0])[: self.batch][self.ctx.shard(self.batch)].to(self.x.device)
        pred = self.model(self.x[idx])
        return torch.nn.functional.mse_loss(pred, self.y[idx])

    def state_tensors(self):
        return {k: v.detach() for k, v in self.model.state_dict().items()}

    def load_state_tensors(self, tensors):
        self.model.load_state_dict({k: tensors[k] for k in self.model.state_dict()})

    def save_final(self, path):
        save_file({k: v.to("cpu").contiguous() for k, v in self.state_tensors().items()}, str(path),
                  metadata={"personalize_kind": "toy"})

    def preview(self, step):
        w = self.model[0].weight.detach().float().cpu()
        w = w + 0.01 * torch.rand_like(w)       # dithered: draws from the global RNG, as a sampler would
        w = (w - w.min()) / (w.max() - w.min() + 1e-12)
        path = self.job_dir / f"preview_{step:06d}.png"
        Image.fromarray((w.numpy() * 255).astype("uint8")).save(path)
        return str(path), f"toy step {step}: first layer weights"
