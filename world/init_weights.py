"""The one initialisation of the world's networks built from ComfyUI's uninitialised layer classes."""
from __future__ import annotations

import math

import torch


def init_weights(module: torch.nn.Module, gen: torch.Generator) -> None:
    """ComfyUI's layers start uninitialised; give every convolution and linear layer PyTorch's default
    scale (uniform in +-1/sqrt(fan_in)) from ``gen``, biases zero, norms one."""
    for name, p in module.named_parameters():
        with torch.no_grad():
            if p.dim() >= 2:
                bound = 1.0 / math.sqrt(p[0].numel())
                p.copy_(torch.rand(p.shape, generator=gen) * 2 * bound - bound)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)
