"""Infusion's overfitting metrics (metrics/overfitting.py): the Gaussian W2 against closed forms, the
Ledoit–Wolf coefficient against a loop implementation of its definition (and sklearn's when
importable), the matrix square root against a 2×2 closed form (and scipy's when importable), the
noise levels of a real SD1.5 schedule, and the latent Fisher divergence against known perturbations
and an element-by-element loop. Pure torch; no ComfyUI."""
from __future__ import annotations

import math

import pytest
import torch

from personalize_pack.metrics.overfitting import (FisherAccumulator, fit_gaussian, gaussian_w2,
                                                  latent_fisher_divergence, ledoit_wolf_shrinkage, sqrtm_psd,
                                                  timestep_levels, w2_distance)

F64 = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _random_psd(d, seed, rank=None):
    a = torch.randn(d, rank or d, generator=_gen(seed), dtype=F64)
    return a @ a.T


def _rotation(d, seed):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=_gen(seed), dtype=F64))
    return q


def _trace_sqrt_2x2(m):
    """tr √M of a 2×2 PSD matrix: the eigenvalues l1, l2 give (√l1 + √l2)² = tr M + 2√det M."""
    det = max(float(m[0, 0] * m[1, 1] - m[0, 1] * m[1, 0]), 0.0)
    return math.sqrt(float(m[0, 0] + m[1, 1]) + 2.0 * math.sqrt(det))


# ------------------------------------------------------------------------------------ sqrtm_psd

def test_sqrtm_psd_squares_back_and_matches_eigen_and_2x2_closed_form():
    a = _random_psd(6, 0)
    s = sqrtm_psd(a)
    assert s.dtype == F64
    torch.testing.assert_close(s, s.T, rtol=0, atol=0)
    torch.testing.assert_close(s @ s, a, rtol=1e-12, atol=1e-12)
    # its eigenvalues are the square roots of a's, and it shares a's eigenvectors
    torch.testing.assert_close(torch.linalg.eigvalsh(s), torch.linalg.eigvalsh(a).sqrt(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s @ a, a @ s, rtol=1e-10, atol=1e-10)
    # 2×2: √M = (M + √det·I) / √(tr M + 2√det)
    m = torch.tensor([[4.0, 1.5], [1.5, 2.0]], dtype=F64)
    r = math.sqrt(4.0 * 2.0 - 1.5 ** 2)
    want = (m + r * torch.eye(2, dtype=F64)) / math.sqrt(6.0 + 2 * r)
    torch.testing.assert_close(sqrtm_psd(m), want, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(sqrtm_psd(torch.diag(torch.tensor([9.0, 0.25, 0.0]))),
                               torch.diag(torch.tensor([3.0, 0.5, 0.0], dtype=F64)))


def test_sqrtm_psd_against_scipy():
    linalg = pytest.importorskip("scipy.linalg")
    a = _random_psd(8, 1)
    want = torch.from_numpy(linalg.sqrtm(a.numpy()).real)
    torch.testing.assert_close(sqrtm_psd(a), want, rtol=1e-9, atol=1e-9)


def test_sqrtm_psd_clamps_rounding_negatives():
    q = _rotation(4, 2)
    a = q @ torch.diag(torch.tensor([2.0, 1.0, 0.0, -1e-15], dtype=F64)) @ q.T     # PSD up to rounding
    s = sqrtm_psd(a)
    assert torch.isfinite(s).all()
    assert float(torch.linalg.eigvalsh(s).min()) > -1e-12
    torch.testing.assert_close(s @ s, a, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="square"):
        sqrtm_psd(torch.ones(2, 3))


# ------------------------------------------------------------------------------- W2 closed forms

def _closed_commuting(mu1, a, mu2, b):
    """W2² for covariances with the same eigenvectors and eigenvalues a, b: ‖Δμ‖² + Σ(√a − √b)²."""
    return float(((mu1 - mu2) ** 2).sum()), float(((a.sqrt() - b.sqrt()) ** 2).sum())


def test_w2_diagonal_covariances():
    g = _gen(3)
    mu1, mu2 = torch.randn(5, generator=g, dtype=F64), torch.randn(5, generator=g, dtype=F64)
    a = torch.rand(5, generator=g, dtype=F64) + 0.1
    b = torch.rand(5, generator=g, dtype=F64) + 0.1
    mean_t, cov_t = _closed_commuting(mu1, a, mu2, b)
    got = gaussian_w2(mu1, torch.diag(a), mu2, torch.diag(b))
    assert got["mean_term"] == pytest.approx(mean_t, rel=1e-14)
    assert got["cov_term"] == pytest.approx(cov_t, rel=1e-10)
    assert got["w2_squared"] == pytest.approx(mean_t + cov_t, rel=1e-10)
    assert got["w2"] == pytest.approx(math.sqrt(mean_t + cov_t), rel=1e-10)


def test_w2_commuting_full_covariances():
    q = _rotation(6, 4)
    a = torch.tensor([3.0, 2.0, 1.0, 0.5, 0.1, 0.01], dtype=F64)
    b = torch.tensor([0.2, 2.5, 4.0, 0.5, 1.0, 0.3], dtype=F64)
    mu1, mu2 = torch.zeros(6, dtype=F64), torch.linspace(-1, 1, 6, dtype=F64)
    mean_t, cov_t = _closed_commuting(mu1, a, mu2, b)
    got = gaussian_w2(mu1, q @ torch.diag(a) @ q.T, mu2, q @ torch.diag(b) @ q.T)
    assert got["cov_term"] == pytest.approx(cov_t, rel=1e-10)
    assert got["w2_squared"] == pytest.approx(mean_t + cov_t, rel=1e-10)


def test_w2_full_non_commuting_2x2_closed_form():
    c1 = torch.tensor([[2.0, 0.7], [0.7, 1.0]], dtype=F64)
    c2 = torch.tensor([[0.5, -0.2], [-0.2, 3.0]], dtype=F64)
    assert not torch.allclose(c1 @ c2, c2 @ c1)
    mu1, mu2 = torch.tensor([1.0, -2.0], dtype=F64), torch.tensor([0.5, 0.5], dtype=F64)
    # Tr((Σ₁^½ Σ₂ Σ₁^½)^½) = √(tr Σ₁Σ₂ + 2√(det Σ₁ det Σ₂)) for 2×2
    cross = _trace_sqrt_2x2(c1 @ c2)
    want = float(((mu1 - mu2) ** 2).sum()) + float(torch.trace(c1) + torch.trace(c2)) - 2 * cross
    got = gaussian_w2(mu1, c1, mu2, c2)
    assert got["w2_squared"] == pytest.approx(want, rel=1e-12)
    back = gaussian_w2(mu2, c2, mu1, c1)
    assert back["w2"] == pytest.approx(got["w2"], rel=1e-12)


def test_w2_full_against_scipy():
    linalg = pytest.importorskip("scipy.linalg")
    c1, c2 = _random_psd(7, 5), _random_psd(7, 6)
    s1 = linalg.sqrtm(c1.numpy()).real
    cross = float(torch.from_numpy(linalg.sqrtm(s1 @ c2.numpy() @ s1).real).trace())
    want = float(torch.trace(c1) + torch.trace(c2)) - 2 * cross
    got = gaussian_w2(torch.zeros(7), c1, torch.zeros(7), c2)
    assert got["cov_term"] == pytest.approx(want, rel=1e-8)


def test_w2_one_dimensional():
    got = gaussian_w2(torch.tensor([1.5]), torch.tensor([[4.0]]), torch.tensor([-0.5]), torch.tensor([[0.25]]))
    assert got["w2_squared"] == pytest.approx(2.0 ** 2 + (2.0 - 0.5) ** 2, rel=1e-14)
    assert got["mean_term"] == pytest.approx(4.0) and got["cov_term"] == pytest.approx(2.25)
    # from samples: (mean difference)² + (unbiased std difference)²; LW shrinks nothing in 1-d
    g = _gen(7)
    xa = torch.randn(50, 1, generator=g, dtype=F64) * 2 + 1
    xb = torch.randn(80, 1, generator=g, dtype=F64) * 0.5 - 1
    out = w2_distance(xa, xb, normalize=False)
    want = (float(xa.mean()) - float(xb.mean())) ** 2 + (float(xa.std()) - float(xb.std())) ** 2
    assert out["w2_squared"] == pytest.approx(want, rel=1e-12)
    assert out["shrinkage_a"] == 0.0 and out["shrinkage_b"] == 0.0
    assert (out["n_a"], out["n_b"], out["dim"]) == (50, 80, 1)


def test_w2_identical_sets_are_zero():
    f = torch.randn(20, 16, generator=_gen(8))
    out = w2_distance(f, f.clone())
    assert out["w2"] == 0.0 and out["w2_squared"] == 0.0 and out["cov_term"] == 0.0
    # the same set in another order: equal up to rounding
    perm = w2_distance(f, f[torch.randperm(20, generator=_gen(9))])
    assert 0.0 <= perm["w2"] < 1e-6
    c = _random_psd(5, 10)
    assert gaussian_w2(torch.ones(5), c, torch.ones(5), c.clone())["w2"] == 0.0


def test_w2_standard_normal_vs_shifted_is_norm_of_shift():
    m = torch.tensor([0.6, -0.8, 1.2], dtype=F64)
    eye = torch.eye(3, dtype=F64)
    got = gaussian_w2(torch.zeros(3), eye, m, eye)
    assert got["w2"] == pytest.approx(float(m.norm()), rel=1e-14) and got["cov_term"] == 0.0
    g = _gen(11)
    a = torch.randn(4000, 3, generator=g, dtype=F64)
    b = torch.randn(4000, 3, generator=g, dtype=F64) + m
    out = w2_distance(a, b, normalize=False)
    assert out["w2"] == pytest.approx(float(m.norm()), abs=0.06)
    assert out["cov_term"] < 0.01


def test_w2_near_singular_covariances():
    # rank-deficient covariances with eigenvalues ~1e-12 and 0, sharing eigenvectors: exact value known
    q = _rotation(8, 12)
    a = torch.tensor([1.0, 0.5, 0.2, 1e-12, 3e-12, 0.0, 0.0, 0.0], dtype=F64)
    b = torch.tensor([0.8, 0.6, 1e-12, 0.3, 0.0, 2e-12, 0.0, 0.0], dtype=F64)
    c1, c2 = q @ torch.diag(a) @ q.T, q @ torch.diag(b) @ q.T
    mu = torch.zeros(8, dtype=F64)
    _, want = _closed_commuting(mu, a, mu, b)
    ab, ba = gaussian_w2(mu, c1, mu, c2), gaussian_w2(mu, c2, mu, c1)
    for r in (ab, ba):
        assert all(math.isfinite(v) and v >= 0 for v in r.values())
        assert r["w2_squared"] == pytest.approx(want, abs=1e-9)
    assert ab["w2"] == pytest.approx(ba["w2"], rel=1e-9)
    # non-commuting, one eigenvalue 1e-12, the other matrix rank 1: 2×2 closed form
    c1 = torch.diag(torch.tensor([1.0, 1e-12], dtype=F64))
    r = _rotation(2, 13)
    c2 = r @ torch.diag(torch.tensor([2.0, 0.0], dtype=F64)) @ r.T
    want = float(torch.trace(c1) + torch.trace(c2)) - 2 * _trace_sqrt_2x2(c1 @ c2)
    for x, y in ((c1, c2), (c2, c1)):
        got = gaussian_w2(torch.zeros(2), x, torch.zeros(2), y)
        assert got["cov_term"] == pytest.approx(want, abs=1e-9) and got["cov_term"] >= 0
    # a rank-3 covariance against a scaled copy: W2² = (1 − c)² tr Σ
    s = _random_psd(10, 14, rank=3)
    got = gaussian_w2(torch.zeros(10), s, torch.zeros(10), 0.25 * s)
    assert got["w2_squared"] == pytest.approx((1 - 0.5) ** 2 * float(torch.trace(s)), rel=1e-9)
    # features with fewer samples than dimensions: finite, non-negative, symmetric
    g = _gen(15)
    fa, fb = torch.randn(6, 32, generator=g), torch.randn(9, 32, generator=g) + 0.3
    x, y = w2_distance(fa, fb), w2_distance(fb, fa)
    assert math.isfinite(x["w2"]) and x["w2"] > 0 and x["cov_term"] >= 0
    assert x["w2"] == pytest.approx(y["w2"], rel=1e-10)
    assert 0 < x["shrinkage_a"] <= 1 and 0 < x["shrinkage_b"] <= 1


def test_w2_normalises_rows():
    g = _gen(16)
    fa, fb = torch.randn(12, 8, generator=g, dtype=F64), torch.randn(15, 8, generator=g, dtype=F64)
    scale_a = torch.rand(12, 1, generator=g, dtype=F64) * 5 + 0.1
    scale_b = torch.rand(15, 1, generator=g, dtype=F64) * 5 + 0.1
    assert w2_distance(fa * scale_a, fb * scale_b)["w2"] == pytest.approx(w2_distance(fa, fb)["w2"], rel=1e-10)
    assert w2_distance(fa * scale_a, fb, normalize=False)["w2"] != pytest.approx(w2_distance(fa, fb, normalize=False)["w2"])
    with pytest.raises(ValueError, match="8 vs 9"):
        w2_distance(fa, torch.randn(5, 9))


# ----------------------------------------------------------------------------- Ledoit–Wolf fit

def _lw_loop(x):
    """Ledoit & Wolf (2004) from the definition: δ² = ‖S − mI‖²/d, β̄² = (1/n²) Σ_k ‖x_k x_kᵀ − S‖²/d,
    ρ = min(β̄², δ²)/δ², with S the biased (1/n) covariance of the centred rows x_k."""
    n, d = x.shape
    xc = x - x.mean(0)
    s = torch.zeros(d, d, dtype=F64)
    for k in range(n):
        s += torch.outer(xc[k], xc[k])
    s /= n
    m = float(torch.trace(s)) / d
    delta2 = float(((s - m * torch.eye(d, dtype=F64)) ** 2).sum()) / d
    beta2 = sum(float(((torch.outer(xc[k], xc[k]) - s) ** 2).sum()) for k in range(n)) / (n * n * d)
    return min(beta2, delta2) / delta2


def test_ledoit_wolf_coefficient_matches_the_definition():
    g = _gen(17)
    for n, d in ((10, 6), (40, 6), (7, 20)):
        x = torch.randn(n, d, generator=g, dtype=F64) * torch.linspace(0.5, 2.0, d, dtype=F64) + 3.0
        want = _lw_loop(x)
        assert ledoit_wolf_shrinkage(x) == pytest.approx(want, rel=1e-10)
        mu, cov, rho = fit_gaussian(x)
        assert rho == pytest.approx(want, rel=1e-10) and 0 <= rho <= 1
        s = torch.cov(x.T)                                     # unbiased
        target = float(torch.trace(s)) / d * torch.eye(d, dtype=F64)
        torch.testing.assert_close(cov, (1 - rho) * s + rho * target, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(mu, x.mean(0))
        assert float(torch.linalg.eigvalsh(cov).min()) > 0      # full rank even with n ≤ d


def test_ledoit_wolf_against_sklearn():
    covariance = pytest.importorskip("sklearn.covariance")
    x = torch.randn(30, 12, generator=_gen(18), dtype=F64) * torch.linspace(0.2, 3.0, 12, dtype=F64)
    want = covariance.LedoitWolf().fit(x.numpy()).shrinkage_
    assert fit_gaussian(x)[2] == pytest.approx(float(want), rel=1e-10)


def test_ledoit_wolf_vanishes_with_many_samples():
    g = _gen(19)
    scale = torch.tensor([1.0, 1.5, 2.0, 2.5, 3.0], dtype=F64)           # well conditioned, not isotropic
    rhos = [fit_gaussian(torch.randn(n, 5, generator=g, dtype=F64) * scale)[2] for n in (50, 500, 20000)]
    assert rhos[0] > rhos[1] > rhos[2] and rhos[2] < 0.005


def test_fit_gaussian_fixed_shrinkage_and_errors():
    x = torch.randn(5, 8, generator=_gen(20), dtype=F64)
    s = torch.cov(x.T)
    _, cov, rho = fit_gaussian(x, shrinkage=0.3)
    assert rho == 0.3
    torch.testing.assert_close(cov, 0.7 * s + 0.3 * float(torch.trace(s)) / 8 * torch.eye(8, dtype=F64))
    _, cov, rho = fit_gaussian(torch.randn(20, 3, generator=_gen(21)), shrinkage=0)
    assert rho == 0.0
    with pytest.raises(ValueError, match=r"n=5 samples in d=8 dimensions"):
        fit_gaussian(x, shrinkage=0)
    with pytest.raises(ValueError, match=r"n=8 samples in d=8"):
        w2_distance(torch.randn(8, 8), torch.randn(30, 8), shrinkage=0.0)
    with pytest.raises(ValueError, match="at least 2 samples, got n=1"):
        fit_gaussian(x[:1])
    with pytest.raises(ValueError, match="at least 2 samples, got n=1"):
        w2_distance(torch.randn(1, 4), torch.randn(5, 4))
    for bad in (1.5, -0.1, "ledoit", True, None):
        with pytest.raises(ValueError, match="shrinkage"):
            fit_gaussian(x, shrinkage=bad)
    with pytest.raises(ValueError, match=r"\[n, d\]"):
        fit_gaussian(torch.randn(10))
    with pytest.raises(ValueError, match="NaN"):
        fit_gaussian(torch.tensor([[0.0, float("nan")], [1.0, 2.0]]))


# ------------------------------------------------------------------------------- noise levels

def _sd15_sigmas():
    """ComfyUI's ModelSamplingDiscrete schedule for SD1.5 (scaled-linear betas 0.00085..0.012),
    ascending like model_sampling.sigmas."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=F64) ** 2
    ac = torch.cumprod(1 - betas, 0)
    return (((1 - ac) / ac) ** 0.5).float()


def test_timestep_levels_midpoint_quantiles():
    asc = _sd15_sigmas()
    got = timestep_levels(asc, 8)
    # bins of 125 timesteps from the noisiest; the middle of each: timesteps 937, 812, ..., 62
    want = [float(asc[t]) for t in (937, 812, 687, 562, 437, 312, 187, 62)]
    assert got == want
    assert all(x > y for x, y in zip(got, got[1:]))
    assert max(got) < float(asc.max()) and min(got) > float(asc.min())
    assert timestep_levels(asc.flip(0), 8) == want                     # any order
    assert timestep_levels(asc, 1) == [float(asc[499])]
    assert timestep_levels(asc, 1000) == sorted(asc.tolist(), reverse=True)
    assert timestep_levels(torch.tensor([1.0, 2.0, 3.0, 4.0]), 2) == [3.0, 1.0]     # entries 1 and 3 of 4,3,2,1
    with pytest.raises(ValueError, match="9 levels requested from a schedule of 4"):
        timestep_levels(torch.tensor([1.0, 2.0, 3.0, 4.0]), 9)
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="levels"):
            timestep_levels(asc, bad)
    with pytest.raises(ValueError, match="positive"):
        timestep_levels(torch.tensor([0.0, 1.0, 2.0]), 2)


# -------------------------------------------------------------------------- latent Fisher divergence

def _x0(n=3, shape=(2, 3, 3), seed=30, dtype=F64):
    return torch.randn((n,) + shape, generator=_gen(seed), dtype=dtype)


def _identity(x, sigma, prompts):
    return x.clone()


def test_lfd_is_zero_for_identical_predictors():
    x0 = _x0()
    lv = [8.0, 2.0, 0.5]
    out = latent_fisher_divergence(_identity, _identity, x0, [0, 1, 1], lv, draws=2)
    assert out["lfd"] == 0.0 and out["eps_mse"] == 0.0
    assert [p["lfd"] for p in out["per_level"]] == [0.0, 0.0, 0.0]
    assert [p["sigma"] for p in out["per_level"]] == lv
    assert out["count"] == 3 * 3 * 2 and [p["count"] for p in out["per_level"]] == [6, 6, 6]
    assert [(p["prompt"], p["count"]) for p in out["per_prompt"]] == [(0, 6), (1, 12)]


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_lfd_of_a_constant_perturbation(dtype):
    x0 = _x0(dtype=dtype)
    lv = [10.0, 1.0, 0.25]
    results = []
    for delta in (0.01, 0.1, 0.5):
        out = latent_fisher_divergence(_identity, lambda x, s, p, d=delta: x + d, x0, [0, 1, 2], lv)
        # float32 x_t of size ~3σ: (x + δ) − x is exact only to |x|·2⁻²⁴
        rel = 1e-9 if dtype == F64 else 1e-2
        assert out["lfd"] == pytest.approx(sum(delta ** 2 / s ** 2 for s in lv) / len(lv), rel=rel)
        for rec, s in zip(out["per_level"], lv):
            assert rec["sigma"] == s
            assert rec["lfd"] == pytest.approx(delta ** 2 / s ** 2, rel=rel)
            assert rec["eps_mse"] == pytest.approx(delta ** 2, rel=rel)
        results.append(out["lfd"])
    assert results[0] < results[1] < results[2]


def test_lfd_same_noise_reaches_both_models_base_first_and_documented_noise():
    x0 = _x0(n=2)
    lv = [5.0, 0.5]
    seen = {"base": [], "custom": []}
    log = []

    def rec(name):
        def f(x, sigma, prompts):
            seen[name].append((x.clone(), sigma.clone(), list(prompts)))
            log.append(name)
            x.mul_(0)                     # a model that scribbles on its input must not affect the other
            return torch.zeros_like(x)
        return f

    latent_fisher_divergence(rec("base"), rec("custom"), x0, [4, 7], lv, seed=123, draws=2)
    assert log == ["base"] * 4 + ["custom"] * 4        # one call per (draw, level); base calls first
    g = _gen(123)
    for k, ((xb, sb, pb), (xc, sc, pc)) in enumerate(zip(seen["base"], seen["custom"])):
        assert torch.equal(xb, xc) and torch.equal(sb, sc) and pb == pc == [4, 7]
        s = lv[k % 2]                                    # draw-major, then level
        noise = torch.randn(x0.shape, generator=g, dtype=torch.float32).to(F64)
        torch.testing.assert_close(xb, x0 + s * noise, rtol=0, atol=0)
        assert sb.tolist() == [s, s]
    # a predictor returning its input: the two models see the same x_t, so the difference is 0
    out = latent_fisher_divergence(_identity, lambda x, s, p: x.clone(), x0, [0, 0], lv, draws=3)
    assert out["lfd"] == 0.0


def test_lfd_deterministic_for_a_seed():
    x0 = _x0(dtype=torch.float32)
    base = lambda x, s, p: torch.tanh(x)
    custom = lambda x, s, p: torch.tanh(1.2 * x)
    a = latent_fisher_divergence(base, custom, x0, [0, 0, 1], [4.0, 1.0], seed=5)
    b = latent_fisher_divergence(base, custom, x0, [0, 0, 1], [4.0, 1.0], seed=5)
    c = latent_fisher_divergence(base, custom, x0, [0, 0, 1], [4.0, 1.0], seed=6)
    assert a == b
    assert a["lfd"] != c["lfd"] and a["lfd"] > 0
    assert (a["seed"], a["draws"], a["n_latents"], a["sigmas"]) == (5, 1, 3, [4.0, 1.0])


def _base_pred(v, s, p):
    return 0.5 * math.tanh(v) + 0.1 * p


def _custom_pred(v, s, p):
    return 0.5 * math.tanh(1.1 * v) + 0.1 * p + 0.05 * s * v + (0.02 if p == 1 else 0.0)


def _torch_model(fn_kind):
    def f(x, sigma, prompts):
        p = torch.tensor(prompts, dtype=x.dtype).view(-1, 1, 1, 1)
        s = sigma.view(-1, 1, 1, 1)
        if fn_kind == "base":
            return 0.5 * torch.tanh(x) + 0.1 * p
        return 0.5 * torch.tanh(1.1 * x) + 0.1 * p + 0.05 * s * x + 0.02 * (p == 1).to(x.dtype)
    return f


def test_lfd_against_an_element_loop():
    x0 = _x0(n=3)
    prompts = [0, 1, 1]
    lv = [6.0, 1.5, 0.3]
    draws, seed = 2, 9
    # independent: regenerate the documented noise, then loop over every record and element
    g = _gen(seed)
    recs = []                                            # (level, prompt, weighted, mse)
    for _ in range(draws):
        for j, s in enumerate(lv):
            noise = torch.randn(x0.shape, generator=g, dtype=torch.float32).to(F64)
            for i in range(x0.shape[0]):
                xs, ns = x0[i].reshape(-1).tolist(), noise[i].reshape(-1).tolist()
                sq = [(_custom_pred(x + s * e, s, prompts[i]) - _base_pred(x + s * e, s, prompts[i])) ** 2
                      for x, e in zip(xs, ns)]
                mse = sum(sq) / len(sq)
                recs.append((j, prompts[i], mse / s ** 2, mse))
    want_lfd = sum(r[2] for r in recs) / len(recs)
    for bs in (None, 1, 4, 100):                         # batching, also across levels, changes nothing
        out = latent_fisher_divergence(_torch_model("base"), _torch_model("custom"), x0, prompts, lv,
                                       seed=seed, draws=draws, batch_size=bs)
        assert out["lfd"] == pytest.approx(want_lfd, rel=1e-10)
        assert out["count"] == len(recs)
        for j, rec in enumerate(out["per_level"]):
            mine = [r for r in recs if r[0] == j]
            assert rec["level"] == j and rec["sigma"] == lv[j] and rec["count"] == len(mine)
            assert rec["lfd"] == pytest.approx(sum(r[2] for r in mine) / len(mine), rel=1e-10)
            assert rec["eps_mse"] == pytest.approx(sum(r[3] for r in mine) / len(mine), rel=1e-10)
        for rec in out["per_prompt"]:
            mine = [r for r in recs if r[1] == rec["prompt"]]
            assert rec["lfd"] == pytest.approx(sum(r[2] for r in mine) / len(mine), rel=1e-10)
        # balanced design: the flat mean is the mean of the per-level values
        assert out["lfd"] == pytest.approx(sum(r["lfd"] for r in out["per_level"]) / len(lv), rel=1e-12)
    assert want_lfd > 0


def test_lfd_noise_scaling_and_progress():
    x0 = _x0(n=2)
    seen = []

    def flow(sigma, noise, latent):                       # a flow model's x_t = (1 − σ)·x0 + σ·ε
        s = sigma.view(-1, 1, 1, 1)
        return (1 - s) * latent + s * noise

    def base(x, sigma, prompts):
        seen.append(x.clone())
        return x.clone()

    ticks = []
    out = latent_fisher_divergence(base, lambda x, s, p: x + 1.0, x0, 0, [0.8, 0.2], noise_scaling=flow,
                                   seed=1, progress=lambda done, total: ticks.append((done, total)))
    g = _gen(1)
    for x, s in zip(seen, (0.8, 0.2)):
        noise = torch.randn(x0.shape, generator=g, dtype=torch.float32).to(F64)
        torch.testing.assert_close(x, (1 - s) * x0 + s * noise)
    assert ticks == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert out["lfd"] == pytest.approx((1 / 0.8 ** 2 + 1 / 0.2 ** 2) / 2, rel=1e-12)
    assert [p["prompt"] for p in out["per_prompt"]] == [0]


def test_lfd_errors():
    x0 = _x0(n=2)
    with pytest.raises(ValueError, match="prompt_index: 3 values for a batch of 2"):
        latent_fisher_divergence(_identity, _identity, x0, [0, 1, 2], [1.0])
    with pytest.raises(ValueError, match="positive"):
        latent_fisher_divergence(_identity, _identity, x0, [0, 1], [1.0, 0.0])
    with pytest.raises(ValueError, match="no noise levels"):
        latent_fisher_divergence(_identity, _identity, x0, [0, 1], [])
    with pytest.raises(ValueError, match="draws"):
        latent_fisher_divergence(_identity, _identity, x0, [0, 1], [1.0], draws=0)
    with pytest.raises(ValueError, match="customised model's prediction has shape"):
        latent_fisher_divergence(_identity, lambda x, s, p: x[:, :1], x0, [0, 1], [1.0])
    with pytest.raises(ValueError, match="customised model's prediction is not finite"):
        latent_fisher_divergence(_identity, lambda x, s, p: x * float("nan"), x0, [0, 1], [1.0])


def test_fisher_accumulator_directly():
    acc = FisherAccumulator()
    with pytest.raises(ValueError, match="no predictions"):
        acc.result()
    eb = torch.zeros(3, 4)
    ec = torch.tensor([[1.0] * 4, [2.0] * 4, [0.0, 0.0, 0.0, 4.0]])          # row MSEs 1, 4, 4
    acc.add(eb, ec, 2.0, 0, [0, 1, 1])
    acc.add(eb[:1], ec[:1] * 3, torch.tensor([0.5]), 1, 1)                   # MSE 9 at σ = 0.5
    r = acc.result()
    assert r["count"] == 4
    assert r["per_level"] == [{"level": 0, "sigma": 2.0, "lfd": (1 + 4 + 4) / 4 / 3, "eps_mse": 3.0, "count": 3},
                              {"level": 1, "sigma": 0.5, "lfd": 36.0, "eps_mse": 9.0, "count": 1}]
    assert r["lfd"] == pytest.approx((0.25 + 1 + 1 + 36) / 4)
    assert r["per_prompt"] == [{"prompt": 0, "lfd": 0.25, "eps_mse": 1.0, "count": 1},
                               {"prompt": 1, "lfd": pytest.approx((1 + 1 + 36) / 3), "eps_mse": pytest.approx(17 / 3),
                                "count": 3}]
    with pytest.raises(ValueError, match="level 0 was added at sigma=2"):
        acc.add(eb, ec, 3.0, 0, 0)
    with pytest.raises(ValueError, match="shapes differ"):
        acc.add(eb, ec[:2], 2.0, 0, 0)
    with pytest.raises(ValueError, match="one noise level"):
        acc.add(eb, ec, torch.tensor([1.0, 2.0, 1.0]), 2, 0)
