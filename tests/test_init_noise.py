"""MuDI's mean-shifted noise (references/init_noise.py): gamma 0 is plain noise, the shift sits where
the subjects are, shapes and dtypes of SD1.5 / SDXL / FLUX latents, bad input."""
import pytest
import torch

from personalize_pack.references.init_noise import MeanShiftedNoise, shift_latent


def base(latent_dict, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(latent_dict["samples"].shape, generator=g)


def subject_mask(h=64, w=64):
    m = torch.zeros(1, h * 8, w * 8)
    m[:, h * 2:h * 6, w * 1:w * 4] = 1                 # one subject on the left
    return m


def test_gamma_zero_is_plain_noise():
    z = torch.randn(1, 4, 64, 64)
    n = MeanShiftedNoise(7, shift_latent(z, subject_mask()), 0.0, 14.6, base)
    lat = {"samples": torch.zeros(2, 4, 64, 64)}
    assert torch.equal(n.generate_noise(lat), base(lat, 7))


def test_shift_is_where_the_subject_is():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, 64, 64, generator=g) * 0.3
    z[:, :, 16:48, 8:32] += torch.tensor([1.0, -0.5, 0.25, 2.0]).view(1, 4, 1, 1)   # the subject differs
    s = shift_latent(z, subject_mask())
    gamma, sigma = 2.0, 14.6
    n = MeanShiftedNoise(3, s, gamma, sigma, base)
    lat = {"samples": torch.zeros(1, 4, 64, 64)}
    d = n.generate_noise(lat) - base(lat, 3)
    assert torch.all(d[..., :, 40:] == 0) and torch.all(d[..., :8, :] == 0)          # background: plain noise
    background = torch.ones(64, 64, dtype=torch.bool)
    background[16:48, 8:32] = False
    mu_bg = z[..., background].mean(-1)
    inside = d[..., 16:48, 8:32]
    torch.testing.assert_close(inside, gamma / sigma * (z[..., 16:48, 8:32] - mu_bg.view(1, 4, 1, 1)))
    # the mean of the noise is shifted by gamma/sigma * (subject - background) per channel
    shift_mean = inside.mean(dim=(-2, -1)).flatten() / (gamma / sigma)
    torch.testing.assert_close(shift_mean, torch.tensor([1.0, -0.5, 0.25, 2.0]), atol=0.05, rtol=0)


def test_large_latent_statistics():
    z = torch.randn(1, 4, 128, 128)
    s = shift_latent(z, subject_mask(128, 128))
    n = MeanShiftedNoise(11, s, 1.0, 14.6, base)
    lat = {"samples": torch.zeros(1, 4, 128, 128)}
    out = n.generate_noise(lat)
    rest = out - s / 14.6
    assert abs(float(rest.mean())) < 0.02 and abs(float(rest.std()) - 1.0) < 0.02


def test_without_masks_the_latent_loses_its_mean():
    z = torch.randn(2, 4, 8, 8) + 3.0
    s = shift_latent(z)
    torch.testing.assert_close(s.mean(dim=(-2, -1)), torch.zeros(2, 4), atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape,dtype", [((1, 4, 64, 64), torch.float32), ((2, 4, 128, 128), torch.float32),
                                         ((1, 16, 128, 128), torch.float32), ((1, 16, 64, 96), torch.float16)])
def test_shapes_and_dtypes(shape, dtype):
    b, c, h, w = shape
    z = torch.randn(1, c, h, w)
    n = MeanShiftedNoise(1, shift_latent(z, subject_mask(h, w)[..., :h * 8, :w * 8]), 1.5, 1.0,
                         lambda lat, seed: torch.randn(lat["samples"].shape, dtype=dtype))
    out = n.generate_noise({"samples": torch.zeros(shape)})
    assert out.shape == shape and out.dtype == dtype


def test_resized_to_a_latent_of_the_same_aspect_and_errors():
    z = torch.randn(1, 4, 32, 32)
    n = MeanShiftedNoise(1, shift_latent(z), 1.0, 14.6, base)
    assert n.generate_noise({"samples": torch.zeros(1, 4, 64, 64)}).shape == (1, 4, 64, 64)
    with pytest.raises(ValueError, match="aspect ratio"):
        n.generate_noise({"samples": torch.zeros(1, 4, 64, 32)})
    with pytest.raises(ValueError, match="4 channels but the sampled latent has 16"):
        n.generate_noise({"samples": torch.zeros(1, 16, 32, 32)})
    with pytest.raises(ValueError, match="video latent"):
        n.generate_noise({"samples": torch.zeros(1, 4, 3, 32, 32)})
    with pytest.raises(ValueError, match="aspect ratio"):
        shift_latent(z, torch.ones(1, 64, 128))
    with pytest.raises(ValueError, match="sigma_max"):
        MeanShiftedNoise(1, shift_latent(z), 1.0, 0.0)
