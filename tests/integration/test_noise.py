"""MuDI's Mean-Shifted Noise node inside a real ComfyUI: it drives SamplerCustomAdvanced, gamma 0 is
RandomNoise of the same seed, the shift is the documented one. Skipped without ComfyUI."""
from __future__ import annotations

import pytest
import torch

from comfy_sampling import encode, load_image, load_mask



@pytest.fixture(scope="module")
def core():
    import comfy_host
    comfy_host.init_nodes_with_pack()
    import nodes
    return nodes.NODE_CLASS_MAPPINGS


@pytest.fixture(scope="module")
def composed(data_dir):
    from personalize_pack.nodes import mudi
    subjects = None
    for stem in ("personalize_cat_04", "personalize_dog6_02"):
        subjects = mudi.PersonalizeSubject.execute(load_image(data_dir / f"{stem}.jpg", 64),
                                                   load_mask(data_dir / f"{stem}_mask.jpg", 64), stem.split("_")[1],
                                                   subjects).result[0]
    image, masks, _ = mudi.PersonalizeSubjectComposer.execute(subjects, 64, 64, "left to right", 0.75, 1.0, 0.0,
                                                              "white", 0, 4).result
    return image, masks


def noise_node():
    from personalize_pack.nodes.mudi import MeanShiftedNoiseNode
    return MeanShiftedNoiseNode


def run(core, model, noise, positive, negative, steps=3, size=64):
    def result(out):
        return out.result if hasattr(out, "result") else out
    guider = result(core["CFGGuider"].execute(model, positive, negative, 5.0))[0]
    sampler = result(core["KSamplerSelect"].execute("euler"))[0]
    sigmas = result(core["BasicScheduler"].execute(model, "normal", steps, 1.0))[0]
    latent = {"samples": torch.zeros(1, 4, size // 8, size // 8)}
    return result(core["SamplerCustomAdvanced"].execute(noise, guider, sampler, sigmas, latent))[0]["samples"]


def test_gamma_zero_is_random_noise_and_gamma_changes_the_sample(sd15, core, composed):
    model, clip, vae = sd15
    image, masks = composed
    pos, neg = encode(clip, "a cat and a dog"), encode(clip, "blurry")
    random = core["RandomNoise"].execute(5)
    random = (random.result if hasattr(random, "result") else random)[0]
    zero = noise_node().execute(model, 0.0, 5, image, vae, None, masks).result[0]
    lat = {"samples": torch.zeros(1, 4, 8, 8)}
    assert torch.equal(zero.generate_noise(lat), random.generate_noise(lat))
    plain = run(core, model, random, pos, neg)
    assert torch.equal(run(core, model, zero, pos, neg), plain)
    shifted = noise_node().execute(model, 1.0, 5, image, vae, None, masks).result[0]
    out = run(core, model, shifted, pos, neg)
    assert torch.isfinite(out).all() and (out - plain).abs().max() > 1e-3


def test_shift_is_the_documented_one(sd15, composed):
    from personalize_pack.references.init_noise import shift_latent
    model, _, vae = sd15
    image, masks = composed
    gamma = 2.0
    n = noise_node().execute(model, gamma, 9, image, vae, None, masks).result[0]
    z = model.model.process_latent_in(vae.encode(image).float())
    lat = {"samples": torch.zeros(2, 4, 8, 8)}
    import comfy.sample
    want = comfy.sample.prepare_noise(lat["samples"], 9) + gamma / float(
        model.get_model_object("model_sampling").sigma_max) * shift_latent(z, masks)
    torch.testing.assert_close(n.generate_noise(lat), want)
    # the same from a LATENT input
    m = noise_node().execute(model, gamma, 9, None, None, {"samples": vae.encode(image)}, masks).result[0]
    torch.testing.assert_close(m.generate_noise(lat), want)


def test_bad_inputs(sd15, composed):
    model, _, vae = sd15
    image, masks = composed
    with pytest.raises(ValueError, match="image: connect"):
        noise_node().execute(model, 1.0, 0)
    with pytest.raises(ValueError, match="vae: the composed image needs a VAE"):
        noise_node().execute(model, 1.0, 0, image)
    with pytest.raises(ValueError, match="not both"):
        noise_node().execute(model, 1.0, 0, image, vae, {"samples": torch.zeros(1, 4, 8, 8)})
    with pytest.raises(ValueError, match="16 channels but this model works on 4"):
        noise_node().execute(model, 1.0, 0, None, None, {"samples": torch.zeros(1, 16, 8, 8)})
    n = noise_node().execute(model, 1.0, 0, image, vae, None, masks).result[0]
    with pytest.raises(ValueError, match="aspect ratio"):
        n.generate_noise({"samples": torch.zeros(1, 4, 8, 16)})
