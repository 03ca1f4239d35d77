"""MRSA kernel against an independent explicit-softmax computation (docs/algorithms.md §0.3, §1.8)."""
import numpy as np
import pytest
import torch

from personalize_pack.attention.kernels import mrsa_attention, sdpa_attention, select_reference_keys

from attention_reference import M1, M2, reference_mrsa, run_ours, to_bnc


@pytest.fixture
def doc_inputs():
    rng = np.random.default_rng(0)
    return [rng.standard_normal((2, 16, 4)) for _ in range(7)]


def test_documented_values(doc_inputs):
    q, ko, vo, k1, v1, k2, v2 = doc_inputs
    expected, P = reference_mrsa(q, ko, vo, [k1, k2], [v1, v2], [M1, M2], [3.0, 2.0])
    # the figures written down in docs/algorithms.md §1.8, from FreeCustom's own formula
    assert expected.sum() == pytest.approx(-21.7124739, abs=1e-6)
    np.testing.assert_allclose(expected[0, :4], [-0.3930885, 0.3321198, -0.0756064, -0.3929402], atol=1e-6)
    np.testing.assert_allclose(expected[5, 4:], [-0.7173587, -0.9984135, -0.0829452, 1.1727015], atol=1e-6)
    mass = P.reshape(2, 16, 3, 16).sum(-1).mean((0, 1))
    np.testing.assert_allclose(mass, [0.14615, 0.65164, 0.20221], atol=1e-5)
    ours = run_ours(q, ko, vo, [k1, k2], [v1, v2], [M1, M2], [3.0, 2.0], heads=2)
    np.testing.assert_allclose(ours, expected, atol=1e-10)


def test_soft_masks_several_references_many_heads():
    rng = np.random.default_rng(1)
    h, n, d, R = 4, 36, 8, 3
    q, ko, vo = (rng.standard_normal((h, n, d)) for _ in range(3))
    krs = [rng.standard_normal((h, n, d)) for _ in range(R)]
    vrs = [rng.standard_normal((h, n, d)) for _ in range(R)]
    masks = [np.clip(rng.uniform(-0.5, 1.0, n), 0, None) for _ in range(R)]   # soft, with zeros
    weights = [3.0, 1.5, -2.0]
    expected, _ = reference_mrsa(q, ko, vo, krs, vrs, masks, weights)
    ours = run_ours(q, ko, vo, krs, vrs, masks, weights, heads=h)
    np.testing.assert_allclose(ours, expected, atol=1e-10)


def test_float32_and_float16_close_to_float64():
    rng = np.random.default_rng(2)
    q, ko, vo, k1, v1 = (rng.standard_normal((2, 64, 16)) for _ in range(5))
    m = (rng.uniform(size=64) > 0.5).astype(float)
    expected, _ = reference_mrsa(q, ko, vo, [k1], [v1], [m], [3.0])
    refs = select_reference_keys(to_bnc(k1).float(), to_bnc(v1).float(), [torch.tensor(m)], [3.0])
    out32 = mrsa_attention(to_bnc(q).float(), to_bnc(ko).float(), to_bnc(vo).float(), refs, 2)[0]
    np.testing.assert_allclose(out32.numpy(), expected, atol=1e-5)
    out16 = mrsa_attention(to_bnc(q).half(), to_bnc(ko).half(), to_bnc(vo).half(), refs, 2)[0]
    np.testing.assert_allclose(out16.float().numpy(), expected, atol=2e-2)


def test_zero_masks_equal_plain_attention(doc_inputs):
    q, ko, vo, k1, v1, k2, v2 = doc_inputs
    plain = sdpa_attention(to_bnc(q), to_bnc(ko), to_bnc(vo), 2)[0].numpy()
    zero = np.zeros((4, 4))
    ours = run_ours(q, ko, vo, [k1, k2], [v1, v2], [zero, zero], [3.0, 2.0], heads=2)
    np.testing.assert_array_equal(ours, plain)
    expected, _ = reference_mrsa(q, ko, vo, [k1, k2], [v1, v2], [zero, zero], [3.0, 2.0])
    np.testing.assert_allclose(plain, expected, atol=1e-10)


def test_weight_zero_removes_a_reference(doc_inputs):
    q, ko, vo, k1, v1, k2, v2 = doc_inputs
    both = run_ours(q, ko, vo, [k1, k2], [v1, v2], [M1, M2], [0.0, 2.0], heads=2)
    only2 = run_ours(q, ko, vo, [k2], [v2], [M2], [2.0], heads=2)
    np.testing.assert_allclose(both, only2, atol=1e-12)
    none = run_ours(q, ko, vo, [k1], [v1], [M1], [0.0], heads=2)
    plain = sdpa_attention(to_bnc(q), to_bnc(ko), to_bnc(vo), 2)[0].numpy()
    np.testing.assert_array_equal(none, plain)


@pytest.mark.parametrize("w", [0.5, 3.0, 7.0])
def test_identical_reference_with_full_mask_is_plain(doc_inputs, w):
    q, ko, vo = doc_inputs[:3]
    ours = run_ours(q, ko, vo, [ko], [vo], [np.ones(16)], [w], heads=2)
    plain = sdpa_attention(to_bnc(q), to_bnc(ko), to_bnc(vo), 2)[0].numpy()
    np.testing.assert_allclose(ours, plain, atol=1e-12)


def test_batched_target_rows_share_references():
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 16, 8, dtype=torch.float64) for _ in range(3))
    rk, rv = torch.randn(2, 16, 8, dtype=torch.float64), torch.randn(2, 16, 8, dtype=torch.float64)
    masks = [torch.rand(16).double().round(), torch.ones(16).double()]
    refs = select_reference_keys(rk, rv, masks, [3.0, 1.0])
    batched = mrsa_attention(q, k, v, refs, 2)
    for i in range(3):
        single = mrsa_attention(q[i:i + 1], k[i:i + 1], v[i:i + 1], refs, 2)
        torch.testing.assert_close(batched[i:i + 1], single)
