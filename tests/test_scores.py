"""CLIP-T / CLIP-I / DINO arithmetic and preprocessing (metrics/scores.py) on hand-made values."""
import math

import pytest
import torch

from personalize_pack.metrics.scores import (CLIP_MEAN, CLIP_STD, clip_preprocess, clip_t, dino_preprocess,
                                             pairwise_mean_cosine)


def test_clip_t_is_clipped_and_scaled():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    txt = torch.tensor([[1.0, 1.0], [0.0, -1.0], [2.0, 2.0]])
    got = clip_t(img, txt)
    torch.testing.assert_close(got, torch.tensor([2.5 / math.sqrt(2), 0.0, 2.5], dtype=torch.float64))
    one = clip_t(img, torch.tensor([[1.0, 0.0]]))                  # one prompt for every image
    torch.testing.assert_close(one, torch.tensor([2.5, 0.0, 2.5 / math.sqrt(2)], dtype=torch.float64))
    with pytest.raises(ValueError, match="2 prompt embeddings for 3 images"):
        clip_t(img, txt[:2])


def test_pairwise_mean():
    g = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    r = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, -3.0]])
    want = (1 + 1 / math.sqrt(2) + 0 + 0 + 1 / math.sqrt(2) - 1) / 6
    assert float(pairwise_mean_cosine(g, r)) == pytest.approx(want)
    with pytest.raises(ValueError, match="at least one"):
        pairwise_mean_cosine(g[:0], r)


def test_preprocessing_shapes_and_normalisation():
    img = torch.full((2, 300, 400, 3), 0.5)
    x = clip_preprocess(img)
    assert x.shape == (2, 3, 224, 224)
    torch.testing.assert_close(x[0, :, 0, 0], (0.5 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD))
    assert dino_preprocess(img).shape == (2, 3, 224, 224)
    # the centre crop keeps the centre: a bright vertical band in the middle survives, the sides go
    band = torch.zeros(1, 224, 448, 3)
    band[:, :, 200:248] = 1.0
    y = clip_preprocess(band)
    assert float(y[0, 0, 112, 112]) > 1.0 and float(y[0, 0, 112, 0]) < -1.0
    with pytest.raises(ValueError, match="IMAGE"):
        clip_preprocess(torch.zeros(3, 224, 224))
