"""Mask handling and reference preparation (pure torch)."""
import pytest
import torch

from personalize_pack.references.masks import (as_mask_batch, fit_box, layer_mask, letterbox, threshold_mask,
                                               token_grid)
from personalize_pack.references.reference import Reference, check_image, fit_image, prepare_masks


def test_mask_layouts_are_normalised():
    m = torch.zeros(2, 6, 6)
    m[:, 2:4, 2:4] = 1
    assert torch.equal(as_mask_batch(m), m)
    assert torch.equal(as_mask_batch(m[0]), m[:1])
    rgb_last = m[..., None].expand(-1, -1, -1, 3)
    assert torch.equal(as_mask_batch(rgb_last), m)
    rgb_first = m[:, None].expand(-1, 3, -1, -1)
    assert torch.equal(as_mask_batch(rgb_first), m)
    assert torch.equal(as_mask_batch(m * 255), m)           # 0..255 masks


@pytest.mark.parametrize("bad,match", [
    (torch.zeros(2, 2, 2, 2, 2), "expected a mask of shape"),
    (torch.full((1, 4, 4), float("nan")), "NaN"),
    (torch.full((1, 4, 4), 300.0), "0..1"),
    (torch.full((1, 4, 4), -1.0), "negative"),
    ("mask.png", "expected a torch tensor"),
])
def test_bad_masks(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        as_mask_batch(bad)


def test_threshold_keeps_antialiased_subject():
    m = torch.tensor([0.0, 0.2, 0.6, 0.98, 1.0])
    assert threshold_mask(m, 0.5, soft=False).tolist() == [0, 0, 1, 1, 1]
    assert threshold_mask(m, 0.5, soft=True).tolist() == pytest.approx([0, 0, 0.6, 0.98, 1.0])
    assert threshold_mask(m, 0.0, soft=False).tolist() == [0, 1, 1, 1, 1]


def test_layer_mask_area_coverage():
    m = torch.zeros(16, 16)
    m[0:8, 0:8] = 1            # top-left quadrant
    m[8:12, 8:16] = 1          # half of the bottom-right quadrant
    assert layer_mask(m, 2, 2, soft=False).tolist() == [1, 0, 0, 1]
    assert layer_mask(m, 2, 2, soft=True).tolist() == pytest.approx([1, 0, 0, 0.5])
    # upsampling a coarse mask to a finer grid keeps its support
    assert layer_mask(torch.eye(2), 4, 4, soft=False).reshape(4, 4)[0, 0] == 1


@pytest.mark.parametrize("n,h,w,expected", [(64, 8, 8, (8, 8)), (16, 8, 8, (4, 4)), (1, 8, 8, (1, 1)),
                                            (20, 7, 9, (4, 5)), (6, 7, 9, (2, 3)), (12, 6, 8, (3, 4))])
def test_token_grid_follows_unet_halving(n, h, w, expected):
    assert token_grid(n, h, w) == expected


def test_token_grid_rejects_mismatch():
    with pytest.raises(ValueError, match="does not fit"):
        token_grid(30, 8, 8)


def test_letterbox_preserves_aspect_and_centres():
    assert fit_box(2, 4, 4, 4) == (1, 0, 2, 4)
    x = torch.ones(1, 2, 4)
    y = letterbox(x, 4, 4, fill=-1.0)
    assert y.shape == (1, 4, 4)
    assert y[0, 0].tolist() == [-1] * 4 and y[0, 1].tolist() == [1] * 4 and y[0, 3].tolist() == [-1] * 4
    assert letterbox(x, 2, 4) is x


def test_reference_fitting_is_cached_and_masks_border():
    ref = Reference(latent=torch.randn(1, 4, 4, 2), mask=torch.ones(32, 16))
    lat, m = ref.fitted(4, 4)
    assert ref.fitted(4, 4)[0] is lat
    assert m[:, :8].sum() == 0 and m[:, 24:].sum() == 0 and m[:, 8:24].min() == 1
    assert ref.fitted(4, 2)[0] is ref.latent or torch.equal(ref.fitted(4, 2)[0], ref.latent)


def test_prepare_masks():
    m = prepare_masks(torch.ones(1, 10, 10), 3, 8, 8, 0.5, False)
    assert m.shape == (3, 8, 8) and m.min() == 1
    assert prepare_masks(None, 2, 8, 8, 0.5, False).shape == (2, 8, 8)
    with pytest.raises(ValueError, match="mask: batch of 2 masks for 3 images"):
        prepare_masks(torch.ones(2, 8, 8), 3, 8, 8, 0.5, False)
    with pytest.raises(ValueError, match="empty after thresholding at 0.5"):
        prepare_masks(torch.full((1, 8, 8), 0.3), 1, 8, 8, 0.5, False)
    soft = prepare_masks(torch.full((1, 8, 8), 0.7), 1, 8, 8, 0.5, True)
    assert soft.max() == pytest.approx(0.7)


def test_fit_image_and_check_image():
    img = torch.rand(1, 703, 703, 3)
    out = fit_image(img, 512)
    assert out.shape == (1, 512, 512, 3)
    out = fit_image(torch.rand(1, 300, 203, 3), 0)
    assert out.shape == (1, 296, 200, 3)
    with pytest.raises(ValueError, match="smaller than 8 px"):
        fit_image(torch.rand(1, 4, 100, 3), 0)
    with pytest.raises(ValueError, match="expected a ComfyUI IMAGE"):
        check_image(torch.rand(3, 64, 64))
    with pytest.raises(ValueError, match="NaN"):
        check_image(torch.full((1, 8, 8, 3), float("inf")))
