"""Several training processes on one machine (``torchrun`` / ``accelerate launch``, one per GPU): the
process group, the one all_reduce per step that averages the gradients, and the end-of-run check
that every rank holds the same weights. With one process (``WORLD_SIZE`` unset or 1) nothing here
touches ``torch.distributed``."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


class Distributed:
    """The process group when started by ``torchrun`` / ``accelerate launch`` (``WORLD_SIZE > 1``)."""

    def __init__(self):
        env = os.environ
        self.world_size = int(env.get("WORLD_SIZE", "1") or 1)
        self.rank = int(env.get("RANK", "0") or 0)
        self.local_rank = int(env.get("LOCAL_RANK", "0") or 0)
        self.active = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files and sends events."""
        return self.rank == 0

    def device(self, wanted: str) -> torch.device:
        """This process's device for job.json's ``device`` (the caller has checked that CUDA is there):
        with several processes, the GPU of this process's local rank."""
        if wanted.startswith("cuda"):
            if self.enabled:
                torch.cuda.set_device(self.local_rank)
                return torch.device("cuda", self.local_rank)
            return torch.device(wanted)
        return torch.device("cpu")

    def init(self, device: torch.device) -> None:
        if self.enabled:
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            self.active = True

    def broadcast_parameters(self, params) -> None:
        """Rank 0's values of ``params`` on every rank: an identical start."""
        if self.enabled:
            with torch.no_grad():
                for p in params:
                    dist.broadcast(p.data, 0)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def close(self) -> None:
        if self.active:
            try:
                dist.destroy_process_group()
            except Exception:
                pass
            self.active = False


def average_gradients(params, loss, cancel: bool, world: int) -> torch.Tensor:
    """One all_reduce per step: every gradient, the loss and the cancel flag in one flat buffer
    (built without a host sync). Averages the gradients in place and returns the reduced
    [loss sum, cancelled ranks] pair, still on the device: the caller reads it with the step's one
    ``tolist()``."""
    parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params]
    extra = torch.zeros(2, device=loss.device)
    extra[0] = loss.detach().float()
    if cancel:
        extra[1].fill_(1.0)
    flat = torch.cat(parts + [extra])
    dist.all_reduce(flat)
    off = 0
    for p in params:
        n = p.numel()
        g = flat[off:off + n].view_as(p).div_(world).to(p.dtype)
        if p.grad is None:
            p.grad = g
        else:
            p.grad.copy_(g)
        off += n
    return flat[off:off + 2]


def ranks_identical(params) -> bool:
    """Whether every rank holds rank 0's values of ``params`` (bit for bit)."""
    flat = torch.cat([p.detach().reshape(-1).float() for p in params])
    ref = flat.clone()
    dist.broadcast(ref, 0)
    same = torch.tensor([1.0 if torch.equal(flat, ref) else 0.0], device=flat.device)
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    return bool(same.item() == 1.0)
