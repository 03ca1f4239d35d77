"""Flattening the checkpoint dictionaries of the pack's model files (SAM, BiSeNet). Pure torch."""
from __future__ import annotations

import torch


def flat_state_dict(obj, nested_keys=("state_dict", "model", "net", "module")) -> dict | None:
    """The ``{key: tensor}`` of a loaded checkpoint: a state dict, one nested (up to two levels)
    under one of ``nested_keys``, a ``module.`` prefix (DataParallel) removed; None when there is
    no dictionary of tensors."""
    for _ in range(2):
        if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            for key in nested_keys:
                if isinstance(obj.get(key), dict):
                    obj = obj[key]
                    break
    if not isinstance(obj, dict) or not obj:
        return None
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd
