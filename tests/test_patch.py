"""The reference pass and the shared attention patch, called the way ComfyUI calls them
(``apply_model`` wrapper arguments, ``extra_options`` with ``cond_or_uncond`` and ``sigmas``), on
a one-layer stand-in UNet. Expected values are computed independently from what the UNet saw."""
import numpy as np
import pytest
import torch

from personalize_pack.attention.kernels import sdpa_attention
from personalize_pack.attention.patch import ROWS_KEY
from personalize_pack.attention.reference_pass import reference_pass
from personalize_pack.references.reference import Reference

from attention_reference import heads_first, reference_mrsa
from one_layer_unet import HEADS, KEY, OneLayerUNet, make_reference, mrsa, options

@pytest.mark.parametrize("labels", [[1, 0], [0, 1], [0], [0, 0, 1]])
@pytest.mark.parametrize("batch", [1, 2])
def test_joint_pass_matches_independent_mrsa(labels, batch):
    refs = [make_reference(0), make_reference(1, weight=2.0)]
    unet = OneLayerUNet()
    n = batch * len(labels)
    x = torch.randn(n, 4, 4, 4)
    t = torch.full((n,), 5.0)
    c = torch.randn(n, 77, 16)
    out = reference_pass(unet, x, t, None, c, None, options(mrsa(refs), labels, rows=n))
    assert out.shape[0] == n
    call = unet.calls[-1]
    assert call["x"].shape[0] == n + 2, "references ride in the same call, once, cond only"
    torch.testing.assert_close(call["x"][:n], x)
    # each reference row is its latent (scaled) plus sigma times unit noise
    for i, r in enumerate(refs):
        eps = (call["x"][n + i] - 0.18215 * r.latent[0]) / 5.0
        assert abs(float(eps.std()) - 1.0) < 0.35 and abs(float(eps.mean())) < 0.5
    q, k, v = unet.last_qkv
    layout = call["opts"][ROWS_KEY]
    assert layout.mode == "joint" and layout.n_target == n
    m = [r.mask.reshape(4, 8, 4, 8).mean((1, 3)).ge(0.5).double().reshape(-1) for r in refs]
    for row in range(n):
        label = labels[row // batch]
        got = unet.last_out[row]
        if label == 0:
            exp, _ = reference_mrsa(heads_first(q[row]), heads_first(k[row]), heads_first(v[row]),
                                    [heads_first(k[n + i]) for i in range(2)],
                                    [heads_first(v[n + i]) for i in range(2)], [m[0], m[1]], [3.0, 2.0])
        else:
            exp = sdpa_attention(q[row:row + 1], k[row:row + 1], v[row:row + 1], HEADS)[0].numpy()
        np.testing.assert_allclose(got.numpy(), exp, atol=1e-9)
    for i in range(2):   # reference rows: plain self-attention
        exp = sdpa_attention(q[n + i:n + i + 1], k[n + i:n + i + 1], v[n + i:n + i + 1], HEADS)[0]
        torch.testing.assert_close(unet.last_out[n + i], exp)


def test_reference_noise_is_fresh_per_step_and_shared_by_split_calls():
    refs = [make_reference(0)]
    unet = OneLayerUNet()
    x, c = torch.randn(1, 4, 4, 4), torch.randn(1, 77, 16)
    tech = mrsa(refs)
    for sigma in (5.0, 5.0, 3.0):
        reference_pass(unet, x, torch.full((1,), sigma), None, c, None, options(tech, [0], sigma, rows=1))
    a, b, d = (call["x"][1] - 0.18215 * refs[0].latent[0] for call in unet.calls)
    torch.testing.assert_close(a, b)                    # same step: the same noise, whatever the call order
    assert not torch.allclose(a / 5.0, d / 3.0)         # next step: fresh noise


def test_outside_sigma_range_and_uncond_only_calls_are_plain():
    refs = [make_reference(0)]
    tech = mrsa(refs, sigma_range=(4.0, 1.0))
    unet = OneLayerUNet()
    x, c = torch.randn(2, 4, 4, 4), torch.randn(2, 77, 16)
    reference_pass(unet, x, torch.full((2,), 5.0), None, c, None, options(tech, [1, 0], 5.0))
    assert unet.calls[-1]["x"].shape[0] == 2 and ROWS_KEY not in unet.calls[-1]["opts"]
    reference_pass(unet, x[:1], torch.full((1,), 2.0), None, c[:1], None, options(tech, [1], 2.0, rows=1))
    assert unet.calls[-1]["x"].shape[0] == 1
    plain = sdpa_attention(*(t[:1] for t in unet.last_qkv), HEADS)
    torch.testing.assert_close(unet.last_out, plain)


def test_zero_masks_leave_the_target_unchanged():
    refs = [make_reference(0, mask=torch.zeros(32, 32)), make_reference(1, mask=torch.zeros(32, 32))]
    unet = OneLayerUNet()
    x, c, t = torch.randn(2, 4, 4, 4), torch.randn(2, 77, 16), torch.full((2,), 5.0)
    patched = reference_pass(unet, x, t, None, c, None, options(mrsa(refs), [1, 0]))
    plain_unet = OneLayerUNet()
    plain = plain_unet(x, t, None, c, None, {})
    torch.testing.assert_close(patched, plain)


def test_style_fidelity_blends_uncond_references():
    refs = [make_reference(0)]
    unet = OneLayerUNet()
    x, c = torch.randn(2, 4, 4, 4), torch.randn(2, 77, 16)
    reference_pass(unet, x, torch.full((2,), 5.0), None, c, None, options(mrsa(refs, sf=0.25), [1, 0]))
    call = unet.calls[-1]
    assert call["x"].shape[0] == 4, "cond and uncond reference rows"
    layout = call["opts"][ROWS_KEY]
    q, k, v = unet.last_qkv
    ref_c, ref_u = 2 + layout.rows[(refs[0], 0)], 2 + layout.rows[(refs[0], 1)]
    # the uncond reference borrows the uncond row's text conditioning, the cond one the cond row's
    torch.testing.assert_close(call["c"][ref_u], c[0])
    torch.testing.assert_close(call["c"][ref_c], c[1])
    m = [refs[0].mask.reshape(4, 8, 4, 8).mean((1, 3)).ge(0.5).double().reshape(-1)]
    mr, _ = reference_mrsa(heads_first(q[0]), heads_first(k[0]), heads_first(v[0]), [heads_first(k[ref_u])],
                           [heads_first(v[ref_u])], m, [3.0])
    plain = sdpa_attention(q[:1], k[:1], v[:1], HEADS)[0].numpy()
    np.testing.assert_allclose(unet.last_out[0].numpy(), 0.75 * mr + 0.25 * plain, atol=1e-9)


def test_separate_pass_with_foreign_patches_equals_joint():
    refs = [make_reference(0), make_reference(1, weight=2.0)]
    x, c, t = torch.randn(2, 4, 4, 4), torch.randn(2, 77, 16), torch.full((2,), 5.0)
    joint = OneLayerUNet()
    out_joint = reference_pass(joint, x, t, None, c, None, options(mrsa(refs), [1, 0]))
    seen = []

    def foreign(q, k, v, eo):   # another pack's replace: it sees only batches consistent with cond_or_uncond
        seen.append((q.shape[0], list(eo["cond_or_uncond"])))
        return sdpa_attention(q, k, v, eo["n_heads"])

    sep = OneLayerUNet(foreign)
    extra = {"patches_replace": {"attn1": {KEY: sep.patch}}}
    out_sep = reference_pass(sep, x, t, None, c, None, options(mrsa(refs), [1, 0], extra=extra))
    assert [call["x"].shape[0] for call in sep.calls] == [2, 2]
    assert all(b % len(lab) == 0 for b, lab in seen)
    torch.testing.assert_close(out_sep, out_joint)


def test_control_residuals_padded_and_not_mutated():
    refs = [make_reference(0)]
    unet = OneLayerUNet()
    x, c = torch.randn(2, 4, 4, 4), torch.randn(2, 77, 16)
    res = torch.ones(2, 8, 4, 4)
    control = {"input": [res, None], "middle": [res], "output": []}
    reference_pass(unet, x, torch.full((2,), 5.0), None, c, control, options(mrsa(refs), [1, 0]))
    seen = unet.calls[-1]["control"]
    assert seen["input"][0].shape[0] == 3 and float(seen["input"][0][2].abs().sum()) == 0
    assert seen["input"][1] is None and len(control["input"]) == 2 and control["input"][0] is res


def test_captions_and_extra_conds_for_reference_rows():
    cap = torch.randn(1, 154, 16)
    refs = [make_reference(0, caption=cap), make_reference(1)]
    unet = OneLayerUNet()
    x, c = torch.randn(2, 4, 4, 4), torch.randn(2, 77, 16)
    y = torch.arange(2.0)[:, None].expand(2, 5)
    reference_pass(unet, x, torch.full((2,), 5.0), None, c, None, options(mrsa(refs), [1, 0]), y=y)
    call = unet.calls[-1]
    assert call["c"].shape == (4, 154, 16)
    torch.testing.assert_close(call["c"][:2, :77], c)
    torch.testing.assert_close(call["c"][:2, 77:], c)       # repeated to the common length
    torch.testing.assert_close(call["c"][2], cap[0])
    torch.testing.assert_close(call["c"][3, :77], c[1])      # no caption: the cond row's prompt
    torch.testing.assert_close(call["kwargs"]["y"][2:], y[1:2].expand(2, 5))
    bad = [make_reference(0, caption=torch.randn(1, 77, 8))]
    with pytest.raises(ValueError, match="caption conditioning has width 8"):
        reference_pass(OneLayerUNet(), x, torch.full((2,), 5.0), None, c, None, options(mrsa(bad), [1, 0]))


def test_reference_of_another_size_is_letterboxed():
    mask = torch.ones(16, 32)
    ref = Reference(latent=torch.randn(1, 4, 2, 4), mask=mask)
    lat, m = ref.fitted(4, 4)
    assert lat.shape == (1, 4, 4, 4) and m.shape == (32, 32)
    assert float(m[:8].sum()) == 0 and float(m[24:].sum()) == 0 and float(m[8:24].min()) == 1
    assert float(lat[..., 0, :].abs().sum()) == 0
    unet = OneLayerUNet()
    x, c = torch.randn(1, 4, 4, 4), torch.randn(1, 77, 16)
    reference_pass(unet, x, torch.full((1,), 5.0), None, c, None, options(mrsa([ref]), [0], rows=1))
    assert unet.calls[-1]["x"].shape == (2, 4, 4, 4)


def test_technique_rejects_bad_settings():
    with pytest.raises(ValueError, match="weight 0"):
        mrsa([make_reference(0, weight=0.0), make_reference(1, weight=0.0)])
    with pytest.raises(ValueError, match="at least one reference"):
        mrsa([])
    with pytest.raises(ValueError, match="style_fidelity"):
        mrsa([make_reference(0)], sf=1.5)
