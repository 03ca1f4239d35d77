"""The world inside a real ComfyUI: the small UNet placed in SD1.5's width computes what it computed
in training, the checkpoint built from world/weights loads with ComfyUI's checkpoint loader as SD1.5
with the TAESD-format VAE, and the scorer reads the world's scenes. (The quality bar and the techniques' effects
are measured by ``tools/world.py quality`` and ``bench/effects.py``; the quality bar is asserted here on
the held-out prompts, the effects in ``test_world_effects.py``.)

The tests that need the trained weights (the ``world`` fixture) are skipped, saying so, without them."""
from __future__ import annotations

import numpy as np
import torch

from comfy_host import import_comfy


def test_the_small_unet_in_sd15_width_computes_the_same():
    import_comfy()
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from personalize_pack.world import unet
    small = unet.build_small(0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in small.parameters():            # every weight non-zero, the zero-initialised ones too
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    full = UNetModel(**unet.SD15_LAYOUT, operations=comfy.ops.disable_weight_init)
    full.load_state_dict(unet.embed(small.state_dict(), torch.float32))
    x, t, c = torch.randn(2, 4, 16, 16, generator=gen), torch.tensor([10.0, 700.0]), torch.randn(2, 77, 768, generator=gen)
    with torch.no_grad():
        a, b = small(x, t, context=c), full(x, t, context=c)
    assert float(a.abs().max()) > 0.5
    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


def test_the_checkpoint_loads_as_sd15_with_the_taesd_vae(world):
    import comfy.supported_models
    from comfy.taesd.taesd import TAESD
    from personalize_pack.world import data, vae
    assert isinstance(world.model.model.model_config, comfy.supported_models.SD15)
    assert isinstance(world.vae.first_stage_model, TAESD)
    img, _ = data.render(data.sample_scene(np.random.default_rng(3), n_things=2))
    z = world.vae.encode(torch.from_numpy(data.to_float(img))[None])
    assert tuple(z.shape) == (1, 4, 16, 16)
    # ComfyUI's encode + the SD1.5 latent format give the latents the UNet was trained on
    tae = vae.load_state(world.vae.first_stage_model.state_dict())
    ours = vae.encode(tae, vae.images_tensor([img]))
    torch.testing.assert_close(world.model.model.process_latent_in(z.float()), ours, atol=2e-2, rtol=2e-2)


def test_the_scorer_reads_the_world(world):
    from personalize_pack.world import checkpoint, train_scorer, vae
    tae = vae.load_state(checkpoint.read_part(checkpoint.VAE_FILE))
    rendered, through = train_scorer.scene_images(123, 60, tae, log=lambda *_: None)
    acc = train_scorer.validate(world.scorer, rendered)
    assert min(acc["shape"], acc["colour"], acc["pattern"]) >= 0.95, acc
    assert acc["count"] >= 0.95 and acc["place_error_px"] < 3.0, acc


def test_the_world_meets_its_quality_bar_on_held_out_prompts(world):
    """``tools/world.py quality --seeds 2``'s held-out row (world/README.md): two samples per prompt never
    seen in training, the default sampler settings; the prompted shape and colour both present in at least
    80% of them (the shipped weights give 40 of 48), and every prompted shape drawn, alone."""
    from personalize_pack.world import data, quality
    triples = quality.prompts(True)
    assert len(triples) == len(data.HELD_OUT) == 24
    assert all(data.held_out(c, p, s) for c, p, s in triples)
    r = quality.measure(world, triples, 2)
    assert r["samples"] == 48
    assert r["shape_colour"] >= 0.80, r
    assert r["shape"] >= 0.95 and r["one_object"] >= 0.95, r
