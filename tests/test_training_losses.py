"""training/losses.py: masked MSE, DCO (docs/algorithms.md §5.2, §5.10(c)), soft masks."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from personalize_pack.training.losses import dco_loss, dco_per_sample, mask_to_latent, masked_mse, soft_mask


# ----------------------------------------------------------------------------- DCO

def test_dco_spec_numbers():
    """§5.10(c): L_lora 0.1002, L_ref 0.1000, beta 1000 -> log(1 + e^0.2) = 0.7981389."""
    out = dco_loss(torch.tensor(0.1002, dtype=torch.float64), torch.tensor(0.1000, dtype=torch.float64), 1000.0)
    assert abs(float(out) - 0.7981389) < 5e-8
    assert abs(float(out) - math.log1p(math.exp(0.2))) < 1e-12
    # float32 inputs: 0.1002 - 0.1 is 2.0000338e-4 in float32, so beta * diff = 0.2000034
    out32 = dco_loss(torch.tensor(0.1002), torch.tensor(0.1000))
    assert out32.dtype == torch.float32 and abs(float(out32) - 0.7981389) < 3e-6
    assert abs(float(dco_loss(torch.tensor(0.3), torch.tensor(0.3))) - math.log(2)) < 1e-7


def test_dco_matches_an_independent_formula_and_gradient():
    g = torch.Generator().manual_seed(0)
    a = (0.05 + 0.1 * torch.rand(64, generator=g, dtype=torch.float64)).requires_grad_(True)
    b = 0.05 + 0.1 * torch.rand(64, generator=g, dtype=torch.float64)
    beta = 250.0
    out = dco_loss(a, b, beta)
    expect = [math.log1p(math.exp(beta * (x - y))) for x, y in zip(a.tolist(), b.tolist())]
    np.testing.assert_allclose(out.detach().numpy(), expect, rtol=1e-12, atol=1e-12)
    out.sum().backward()
    # d/dL_lora log(1 + e^{beta d}) = beta * sigmoid(beta d)
    grad = [beta / (1 + math.exp(-beta * (x - y))) for x, y in zip(a.tolist(), b.tolist())]
    np.testing.assert_allclose(a.grad.numpy(), grad, rtol=1e-10)
    # large beta*diff: no overflow (softplus), the loss is linear in the difference
    big = dco_loss(torch.tensor(1.0), torch.tensor(0.0), 1000.0)
    assert torch.isfinite(big) and abs(float(big) - 1000.0) < 1e-3
    assert float(dco_loss(torch.tensor(0.0), torch.tensor(1.0), 1000.0)) < 1e-30


def test_dco_reference_gets_no_gradient_and_bad_beta():
    a = torch.tensor(0.2, requires_grad=True)
    b = torch.tensor(0.1, requires_grad=True)
    dco_loss(a, b, 10.0).backward()
    assert a.grad is not None and b.grad is None
    for beta in (0.0, -1.0):
        with pytest.raises(ValueError, match="beta"):
            dco_loss(a, b, beta)


# ----------------------------------------------------------------------------- masked MSE

def plain_masked_mse(pred, target, mask):
    """Loops over every element (float64): sum m[b,h,w] (p - t)^2 / number of elements."""
    p, t, m = pred.double().numpy(), target.double().numpy(), mask.double().numpy()
    B, C, H, W = p.shape
    per = []
    for b in range(B):
        s = 0.0
        for c in range(C):
            for y in range(H):
                for x in range(W):
                    s += m[b, y, x] * (p[b, c, y, x] - t[b, c, y, x]) ** 2
        per.append(s / (C * H * W))
    return sum(per) / B, per


def test_masked_mse_matches_a_plain_computation():
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(3, 4, 6, 5, generator=g), torch.randn(3, 4, 6, 5, generator=g)
    mask = torch.rand(3, 6, 5, generator=g)
    total, per = plain_masked_mse(pred, target, mask)
    for m in (mask, mask[:, None]):
        assert abs(float(masked_mse(pred, target, m)) - total) < 1e-6
        np.testing.assert_allclose(masked_mse(pred, target, m, reduction="none").numpy(), per, rtol=1e-5)
    # MuDI's own expression
    mudi = (F.mse_loss(pred.float(), target.float(), reduction="none") * mask[:, None]).mean()
    torch.testing.assert_close(masked_mse(pred, target, mask), mudi)
    # one mask for the whole batch, and no mask = plain MSE
    total1, _ = plain_masked_mse(pred, target, mask[0].expand(3, -1, -1))
    assert abs(float(masked_mse(pred, target, mask[0])) - total1) < 1e-6
    torch.testing.assert_close(masked_mse(pred, target), F.mse_loss(pred, target))
    assert masked_mse(pred, target).dim() == 0
    # half precision in, float32 out, same value
    h = masked_mse(pred.half(), target.half(), mask)
    assert h.dtype == torch.float32
    assert abs(float(h) - float(masked_mse(pred.half().float(), target.half().float(), mask))) < 1e-7
    # a 0/1 mask only counts the masked pixels
    hard = torch.zeros(3, 6, 5)
    hard[:, 2:4, 1:3] = 1
    inside = ((pred - target) ** 2)[:, :, 2:4, 1:3].sum() / pred.numel()
    torch.testing.assert_close(masked_mse(pred, target, hard), inside)


def test_dco_per_sample_is_mudis_batch_one_dco_averaged():
    """Batch B equals B of MuDI's batch-1 steps averaged (its code: ``(mse(pred, target) * mask).mean()``
    for the LoRA and the LoRA-off prediction, then ``-logsigmoid(-beta * diff)``), value and gradient;
    and differs from DCO of the batch means when one sample improves while another worsens."""
    g = torch.Generator().manual_seed(5)
    target = torch.randn(3, 4, 8, 8, generator=g)
    ref = target + 0.3 * torch.randn(3, 4, 8, 8, generator=g)
    pred = (ref + 0.001 * torch.randn(3, 4, 8, 8, generator=g)).requires_grad_()
    mask = (torch.rand(3, 8, 8, generator=g) > 0.3).float()
    got = dco_per_sample(pred, ref, target, mask, beta=1000.0)
    one = []
    for b in range(3):
        l = (F.mse_loss(pred[b:b + 1], target[b:b + 1], reduction="none") * mask[b:b + 1, None]).mean()
        r = (F.mse_loss(ref[b:b + 1], target[b:b + 1], reduction="none") * mask[b:b + 1, None]).mean()
        one.append(-F.logsigmoid(-1000.0 * (l - r)))
    want = torch.stack(one).mean()
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-6)
    (ga,) = torch.autograd.grad(got, pred)
    (gb,) = torch.autograd.grad(want, pred)
    assert torch.allclose(ga, gb, rtol=1e-5, atol=1e-9)
    # sample 0 much better than its reference, sample 1 much worse: per sample the worse one is not
    # hidden by the better one's gain (the batch-mean DCO sees a difference of zero and gives log 2)
    t = torch.zeros(2, 1, 2, 2)
    r = torch.full((2, 1, 2, 2), 0.1)
    p = torch.stack([torch.zeros(1, 2, 2), torch.full((1, 2, 2), 0.1 * 2 ** 0.5)])
    per = float(dco_per_sample(p, r, t, None, beta=100.0))
    batch = float(dco_loss(masked_mse(p, t), masked_mse(r, t), 100.0))
    assert batch == pytest.approx(math.log(2), abs=1e-6)
    assert per == pytest.approx((math.log1p(math.exp(-1.0)) + math.log1p(math.exp(1.0))) / 2, rel=1e-5)


def test_masked_mse_errors():
    p = torch.zeros(2, 4, 8, 8)
    with pytest.raises(ValueError, match="does not fit"):
        masked_mse(p, p, torch.ones(2, 16, 16))
    with pytest.raises(ValueError, match="expected"):
        masked_mse(p, p, torch.ones(8))
    with pytest.raises(ValueError, match="differ in shape"):
        masked_mse(p, p[:1])
    with pytest.raises(ValueError, match="reduction"):
        masked_mse(p, p, reduction="sum")


# ----------------------------------------------------------------------------- masks

def test_soft_mask():
    m = torch.tensor([[0.0, 1.0], [0.25, 0.5]])
    assert torch.equal(soft_mask(m, 1.0), torch.ones(2, 2))
    assert torch.equal(soft_mask(m, 0.0), m)
    torch.testing.assert_close(soft_mask(m, 0.3), torch.tensor([[0.3, 1.0], [0.475, 0.65]]))
    for a in (-0.1, 1.5):
        with pytest.raises(ValueError, match="soft_alpha"):
            soft_mask(m, a)


def test_mask_to_latent_like_mudi():
    m = torch.zeros(1024, 1024)
    m[:, :512] = 1                                              # left half
    lat = mask_to_latent(m, 128, 128)
    assert lat.shape == (1, 1, 128, 128) and lat.dtype == torch.float32
    assert torch.equal(lat[..., :64], torch.ones(1, 1, 128, 64)) and torch.equal(lat[..., 64:], torch.zeros(1, 1, 128, 64))
    g = torch.Generator().manual_seed(0)
    r = (torch.rand(2, 64, 48, generator=g) > 0.5).float()
    expect = F.interpolate(r[:, None], size=(8, 6), mode="bilinear")        # MuDI's call
    assert torch.equal(mask_to_latent(r, 8, 6), expect)
    assert torch.equal(mask_to_latent(r[:, None], 8, 6), expect)
    assert torch.equal(mask_to_latent(r, 64, 48), r[:, None])
    with pytest.raises(ValueError):
        mask_to_latent(torch.ones(2, 3, 8, 8), 4, 4)
    # the full chain as the trainer uses it: union mask -> latent grid -> soft mask -> loss
    pred, target = torch.randn(2, 4, 8, 6, generator=g), torch.randn(2, 4, 8, 6, generator=g)
    w = soft_mask(mask_to_latent(r, 8, 6), 0.5)
    total, _ = plain_masked_mse(pred, target, w[:, 0])
    assert abs(float(masked_mse(pred, target, w)) - total) < 1e-6
