"""Losses of MuDI's Seg-Mix LoRA training (``docs/algorithms.md`` §5.2) and the soft masks Infusion
shares. Pure torch.

* ``L_lora = mean(M * (eps_pred - eps)^2)`` over every element (the mask broadcast over channels and
  not renormalised: MuDI's ``(F.mse_loss(pred, target, reduction="none") * mask).mean()``);
* DCO: ``L = -log sigmoid(-beta * (L_lora - L_ref))`` with ``L_ref`` the same loss of the model with
  the LoRA disabled (no gradient), per sample and then averaged over the batch (``dco_per_sample``);
* soft mask ``M * (1 - alpha) + alpha`` (``alpha = 1``: no masking, MuDI's README setting).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

REDUCTIONS = ("mean", "none")


def _mask_like(mask: torch.Tensor, err: torch.Tensor) -> torch.Tensor:
    """``mask`` shaped to broadcast over ``err`` ``[B, C, H, W]`` (or any ``[B, C, *spatial]``):
    ``[*spatial]`` (one mask for the batch), ``[B, *spatial]``, ``[B, 1, *spatial]`` or ``err``'s
    shape."""
    nsp = err.dim() - 2
    m = mask
    if m.dim() == nsp:
        m = m.reshape(1, 1, *m.shape)
    elif m.dim() == nsp + 1:
        m = m.unsqueeze(1)
    if m.dim() != err.dim():
        raise ValueError(f"mask: expected [H,W], [B,H,W] or [B,1,H,W] for predictions of shape {tuple(err.shape)}, "
                         f"got {tuple(mask.shape)}")
    try:
        torch.broadcast_shapes(m.shape, err.shape)
    except RuntimeError:
        raise ValueError(f"mask: shape {tuple(mask.shape)} does not fit predictions of shape {tuple(err.shape)} "
                         f"(resize the mask to the latent, e.g. with mask_to_latent)") from None
    return m.to(device=err.device, dtype=err.dtype)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
               reduction: str = "mean") -> torch.Tensor:
    """``mean(mask * (pred - target)^2)`` in float32 over all elements (``reduction="mean"``, a
    scalar) or over all but the batch dimension (``"none"``, shape ``[B]``; its mean equals the
    scalar). ``mask`` None = all ones; see :func:`_mask_like` for the accepted shapes."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    if pred.shape != target.shape:
        raise ValueError(f"pred and target differ in shape: {tuple(pred.shape)} vs {tuple(target.shape)}")
    if pred.dim() < 2:
        raise ValueError(f"pred: expected a batch [B, C, ...], got shape {tuple(pred.shape)}")
    err = (pred.float() - target.float()) ** 2
    if mask is not None:
        err = err * _mask_like(mask, err)
    if reduction == "none":
        return err.flatten(1).mean(1)
    return err.mean()


def dco_loss(l_lora: torch.Tensor, l_ref: torch.Tensor, beta: float = 1000.0) -> torch.Tensor:
    """Direct Consistency Optimisation: ``-logsigmoid(-beta * (l_lora - l_ref))`` (elementwise; MuDI
    applies it to the batch-mean losses). ``l_ref`` (the prediction with the LoRA disabled) carries
    no gradient: it is detached here. At ``l_lora = l_ref`` the loss is ``log 2`` and its gradient
    ``beta / 2`` times that of ``l_lora``."""
    beta = float(beta)
    if not beta > 0:
        raise ValueError(f"beta: must be positive (DCO off means using the plain loss), got {beta}")
    l_lora = torch.as_tensor(l_lora)
    l_ref = torch.as_tensor(l_ref, device=l_lora.device).detach()
    return -F.logsigmoid(-beta * (l_lora - l_ref.to(l_lora.dtype)))


def dco_per_sample(pred: torch.Tensor, ref_pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None,
                   beta: float = 1000.0) -> torch.Tensor:
    """The batch mean of DCO taken on each sample alone: ``mean_b dco(L_lora[b], L_ref[b])`` with
    ``L[b]`` the masked MSE of sample ``b``. MuDI trains with batch 1 (and accumulates 2), where its
    DCO of the batch means is exactly this; on a bigger batch, DCO of the batch means would let one
    sample's gain hide another's loss."""
    l_lora = masked_mse(pred, target, mask, reduction="none")
    l_ref = masked_mse(ref_pred, target, mask, reduction="none")
    return dco_loss(l_lora, l_ref, beta).mean()


def soft_mask(mask: torch.Tensor, alpha: float) -> torch.Tensor:
    """``mask * (1 - alpha) + alpha``: the subject keeps weight 1 (for a 0/1 mask), the background
    gets ``alpha``; ``alpha = 1`` gives all ones, ``alpha = 0`` the mask itself."""
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"soft_alpha: must lie in 0..1, got {alpha}")
    return mask * (1.0 - alpha) + alpha


def mask_to_latent(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A pixel mask ``[H, W]``, ``[B, H, W]`` or ``[B, 1, H, W]`` resized to the latent grid as MuDI
    does (``F.interpolate(..., mode="bilinear")``, align_corners False: 1024 -> 128), returned
    ``[B, 1, height, width]`` float32."""
    m = mask.float()
    if m.dim() == 2:
        m = m[None, None]
    elif m.dim() == 3:
        m = m[:, None]
    if m.dim() != 4 or m.shape[1] != 1:
        raise ValueError(f"mask: expected [H,W], [B,H,W] or [B,1,H,W], got {tuple(mask.shape)}")
    if tuple(m.shape[-2:]) == (int(height), int(width)):
        return m
    return F.interpolate(m, size=(int(height), int(width)), mode="bilinear", align_corners=False)
