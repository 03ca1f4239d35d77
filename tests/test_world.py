"""The world's pieces that need no ComfyUI: the scene generator (deterministic, held-out combinations
never in training), the scorer's segmentation on rendered scenes, the padded norms the small UNet is
trained with (equal to the ordinary norms over zero-padded tensors), the placement of the small UNet's
channels in SD1.5's width, and the statistics."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from personalize_pack.world import data, measures, scorer, unet


def test_scenes_are_deterministic_and_described_by_their_caption():
    a = data.realise(data.caption_pool(0)[-1], np.random.default_rng(5))
    b = data.realise(data.caption_pool(0)[-1], np.random.default_rng(5))
    assert a == b
    img_a, masks_a = data.render(a)
    img_b, _ = data.render(b)
    assert np.array_equal(img_a, img_b)
    for thing, words in zip(a.things, a.words):
        assert thing.shape in a.caption
        if "colour" in words:
            assert f"{thing.colour} " in a.caption
    # each object is drawn in its colour (and its dark tone for patterns) inside its own mask
    for thing, m in zip(a.things, masks_a):
        colours = {tuple(c) for c in img_a[m]}
        base = tuple(int(v) for v in data.COLOURS[thing.colour])
        assert base in colours
        assert len(colours) == (1 if thing.pattern == "plain" else 2)


def test_held_out_combinations_never_reach_training():
    assert len(data.HELD_OUT) == 24
    for attr in ("colour", "pattern", "shape"):     # every value keeps most of its combinations
        idx = {"colour": 0, "pattern": 1, "shape": 2}[attr]
        values = {t[idx] for t in data.HELD_OUT}
        assert len(values) == len({"colour": data.COLOURS, "pattern": data.PATTERNS, "shape": data.SHAPES}[attr])
    pool = data.caption_pool(0)
    rng = np.random.default_rng(0)
    for k in range(300):
        scene = data.realise(pool[data.pick_plan(rng, pool)], rng)
        assert not any(data.held_out(t.colour, t.pattern, t.shape) for t in scene.things)
    full = [(c, p, s) for plan in pool for c, p, s in plan if c and p]
    assert not any(data.held_out(*t) for t in full)


def test_objects_do_not_overlap_and_stay_inside():
    rng = np.random.default_rng(1)
    for _ in range(50):
        scene = data.sample_scene(rng, n_things=3, allow_held_out=True)
        _, masks = data.render(scene)
        total = np.sum(masks, axis=0)
        assert total.max() <= 1
        for m in masks:
            assert not m[0].any() and not m[-1].any() and not m[:, 0].any() and not m[:, -1].any()


def test_segmentation_finds_every_rendered_object_and_its_place():
    rng = np.random.default_rng(2)
    for _ in range(40):
        scene = data.sample_scene(rng, allow_held_out=True)
        img, masks = data.render(scene)
        found = scorer.segment(data.to_float(img))
        assert len(found) == len(scene.things)
        for m in masks:
            i = scorer.match([type("F", (), {"mask": f})() for f in found], m)
            assert i is not None and np.array_equal(found[i], m)


def test_components_labels_separate_regions():
    fg = np.zeros((9, 9), bool)
    fg[1:3, 1:3] = True
    fg[5:8, 5] = True
    fg[5, 5:8] = True
    fg[0, 8] = True
    lab = scorer.components(fg)
    assert lab.max() == 3
    assert len({lab[1, 1], lab[6, 5], lab[0, 8]}) == 3
    assert (lab[~fg] == 0).all()


def test_padded_norms_equal_the_ordinary_norms_of_zero_padded_tensors():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 5, 5, generator=g)
    w, b = torch.randn(64, generator=g), torch.randn(64, generator=g)
    big = torch.zeros(2, 320, 5, 5)
    idx = unet.index_map("norm.weight", 0, 64)[0]
    big[:, idx] = x
    wb, bb = torch.zeros(320), torch.zeros(320)
    wb[idx], bb[idx] = w, b
    ref = torch.nn.functional.group_norm(big, 32, wb, bb, 1e-5)[:, idx]
    torch.testing.assert_close(unet.padded_group_norm(x, 32, w, b, 1e-5), ref, atol=1e-5, rtol=1e-5)
    y = torch.randn(3, 7, 64, generator=g)
    bigy = torch.zeros(3, 7, 320)
    bigy[..., idx] = y
    ref = torch.nn.functional.layer_norm(bigy, (320,), wb, bb, 1e-5)[..., idx]
    torch.testing.assert_close(unet.padded_layer_norm(y, w, b, 1e-5), ref, atol=1e-5, rtol=1e-5)


def test_channel_placement_keeps_groups_and_heads():
    idx = unet.index_map("x.weight", 0, 64)[0]
    assert len(set(idx.tolist())) == 64 and idx.max() < 320
    # two small channels per norm group of ten, eight per attention head of forty
    assert all((idx // 10 == torch.arange(64) // 2).tolist())
    assert all((idx // 40 == torch.arange(64) // 8).tolist())
    cat = unet.index_map("x.weight", 1, 128)[0]
    assert cat[:64].max() < 320 <= cat[64:].min()
    sin = unet.index_map("time_embed.0.weight", 1, 64)[0]
    half = torch.arange(32)
    # frequency i of a 64-wide sinusoid is frequency 5i of the 320-wide one
    f_small = torch.exp(-np.log(10000) * half / 32)
    f_big = torch.exp(-np.log(10000) * torch.arange(160) / 160)
    torch.testing.assert_close(f_big[sin[:32]], f_small)
    assert (sin[32:] == 160 + sin[:32]).all()


def test_embedding_scales_queries_and_fills_zeros():
    sd = {"input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": torch.ones(64, 64),
          "input_blocks.1.1.transformer_blocks.0.attn1.to_k.weight": torch.ones(64, 64),
          "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.ones(64, 768)}
    big = unet.embed(sd, torch.float32)
    q = big["input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"]
    assert q.shape == (320, 320) and float(q.max()) == pytest.approx(5 ** 0.5)
    assert int((q != 0).sum()) == 64 * 64
    assert big["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape == (320, 768)


def test_paired_test_is_the_exact_sign_flip_test():
    a, b = [1, 1, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0]
    # five positive differences: P(|sum| >= 5) over 2^5 sign flips = 2/32
    assert measures.paired_test(a, b) == pytest.approx(2 / 32)
    assert measures.paired_test([0.5, 0.5], [0.5, 0.5]) == 1.0
    d = [0.3, -0.1, 0.2, 0.4]
    brute = np.mean([abs(sum(s * x for s, x in zip(signs, d))) >= sum(d) - 1e-12
                     for signs in itertools.product([-1, 1], repeat=4)])
    assert measures.paired_test(d, [0] * 4) == pytest.approx(brute)


def _found(shape, colour, pattern, cx=10.0, cy=10.0, area=100):
    m = np.zeros((20, 20), bool)
    return scorer.Found(shape, colour, pattern, cx, cy, area, m, torch.ones(4), 1.0)


def test_world_metrics_read_the_found_objects():
    found = [_found("circle", "red", "striped", area=300), _found("square", "blue", "plain", cx=3, cy=4)]
    assert measures.prompt_fidelity(found, [("red", None, "circle")]) == 1.0
    assert measures.prompt_fidelity(found, [("red", "dotted", "circle"), (None, None, "star")]) == pytest.approx(2 / 4)
    assert measures.appearance_match(found, "circle", "red", "plain") == 0.5
    assert measures.appearance_match(found, "star", "red", "striped") == 0.0
    region = np.zeros((20, 20), bool)
    region[2:6, 1:5] = True
    assert measures.placed(found, "square", region) and not measures.placed(found, "circle", region)
    assert measures.has_thing(found, appearance=("blue", "plain")) and not measures.has_thing(found, shape="star")


def test_training_phases_schedule_the_learning_rate():
    from personalize_pack.world import train
    phases = (dict(steps=100, lr=1e-3, warmup=10, low_freq=0.0), dict(steps=50, lr=4e-4, warmup=5, low_freq=0.05))
    assert train.lr_at(0, phases) == (pytest.approx(1e-4), 0)           # warm-up: (s + 1) / warmup
    assert train.lr_at(10, phases) == (pytest.approx(1e-3), 0)          # cosine starts at the peak
    assert train.lr_at(99, phases)[0] == pytest.approx(1e-3 * (0.1 + 0.45 * (1 + np.cos(np.pi * 89 / 90))))
    assert train.lr_at(100, phases) == (pytest.approx(4e-4 / 5), 1)     # phase 2 warms up again from its own rate
    assert train.lr_at(149, phases)[1] == 1
    assert train.lr_at(149, phases)[0] == pytest.approx(4e-4 * (0.1 + 0.45 * (1 + np.cos(np.pi * 44 / 45))))
    with pytest.raises(ValueError, match="past the last phase"):
        train.lr_at(150, phases)
    # the shipped recipe's first phase is the first world run: 1,800 steps, 5e-4, 200 warm-up, no extra term
    assert train.PHASES[0] == dict(steps=1800, lr=5e-4, warmup=200, low_freq=0.0)


def test_low_frequency_term_is_the_clean_latent_error_over_4x4_cells():
    x0 = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    acp = unet.alphas_cumprod()
    offset = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(1)) * 0.1

    def fake(xt, t, context):                   # a "network" whose noise estimate is off by ``offset``
        fake.t = t
        fake.xt = xt
        return fake.eps + offset

    def run(low_freq):
        gen = torch.Generator().manual_seed(7)
        # draw what diffusion_loss draws, in its order, to know eps
        t = torch.randint(0, len(acp), (3,), generator=gen)
        fake.eps = torch.randn(x0.shape, generator=gen)
        return unet.diffusion_loss(fake, x0, None, torch.Generator().manual_seed(7), acp, low_freq=low_freq), t

    plain, t = run(0.0)
    with_term, _ = run(0.5)
    a = acp[t].view(3, 1, 1, 1)
    snr = (a / (1 - a)).view(3)
    expected_plain = ((snr.clamp(max=5.0) / snr) * offset.square().mean(dim=(1, 2, 3))).mean()
    # the implied clean latent is off by -sqrt((1 - a) / a) * offset; averaged over 4x4 cells of 4x4 pixels
    x0_err = -((1 - a) / a).sqrt() * offset
    cells = x0_err.reshape(3, 4, 4, 4, 4, 4).mean(dim=(3, 5))
    torch.testing.assert_close(plain, expected_plain)
    torch.testing.assert_close(with_term - plain, 0.5 * cells.square().mean())
    assert float(with_term - plain) > 0


def test_a_world_checkpoint_older_than_its_parts_is_stale(tmp_path):
    import os
    from personalize_pack.world import checkpoint
    parts = tmp_path / "weights"
    parts.mkdir()
    for name in (checkpoint.UNET_FILE, checkpoint.VAE_FILE):
        (parts / name).write_bytes(b"x")
    built = tmp_path / "personalize_world.safetensors"
    built.write_bytes(b"y")
    os.utime(parts / checkpoint.UNET_FILE, (1_000, 1_000))
    os.utime(parts / checkpoint.VAE_FILE, (1_000, 1_000))
    os.utime(built, (2_000, 2_000))
    assert not checkpoint.stale(built, parts) and not checkpoint.needs_build(built, parts)
    os.utime(parts / checkpoint.UNET_FILE, (3_000, 3_000))          # new UNet weights since the build
    assert checkpoint.stale(built, parts) and checkpoint.needs_build(built, parts)
    assert checkpoint.needs_build(tmp_path / "missing.safetensors", parts)


def test_unet_training_refuses_a_stop_before_the_first_step():
    from personalize_pack.world import train
    with pytest.raises(ValueError, match="stop: expected a step of at least 1"):
        train.train_unet(torch.zeros(1, 4, 16, 16), torch.zeros(1, dtype=torch.long), torch.zeros(1, 77, 768), stop=0)


def test_training_effect_subjects_are_new_and_alike():
    """The Seg-Mix experiment's subject pairs: one shape, two combinations the world model never saw
    (held out), different in colour and in pattern; the renders show each alone, its mask its pixels."""
    from personalize_pack.world import training_effects as te
    for shape in ("square", "circle", "star"):
        a, b = te.subject_pair(shape)
        assert a[2] == b[2] == shape and data.held_out(*a) and data.held_out(*b)
        assert a[0] != b[0] and a[1] != b[1] and "plain" not in (a[1], b[1])
    assert data.held_out(*te.INFUSION_CONCEPT)
    imgs, masks = te.subject_renders(("red", "striped", "square"), 3, np.random.default_rng(0))
    assert imgs.shape == (3, data.SIZE, data.SIZE, 3) and masks.shape == (3, data.SIZE, data.SIZE)
    for img, m in zip(imgs, masks):
        inside = img[m > 0.5]
        assert 34 ** 2 * 0.5 < int((m > 0.5).sum()) <= 50 ** 2       # one object of 34-50 px
        red = np.array(data.COLOURS["red"]) / 255
        # the object's pixels are red or its dark tone, the rest the background
        assert torch.isclose(inside, torch.tensor(red, dtype=inside.dtype), atol=0.02).all(1).float().mean() > 0.3
        assert not torch.isclose(img[m < 0.5], torch.tensor(red, dtype=img.dtype), atol=0.02).all(1).any()
