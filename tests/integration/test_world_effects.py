"""Each inference technique's effect in the world, asserted at the values ``bench/effects.py`` reported
(world/README.md, "Effects"): the same experiments (``world.effects``) on the first seeds of the bench's
16, which sample the same images (every seed draws its subjects from its own generator). Where the
paper's claim reproduces the test asserts it with a margin; where it did not reproduce, the test asserts
the measured finding with a margin, so a change that alters it fails here and the table is measured again.

Skipped, saying why, without the world's weights (the ``world`` fixture)."""
from __future__ import annotations

import numpy as np


def _run(name: str, world, seeds: int) -> dict:
    from personalize_pack.world import effects
    return {e.metric: e for e in effects.EXPERIMENTS[name](world, seeds)}


def test_mrsa_weight_zero_mask_and_the_papers_weight(world):
    """One reference beside a distractor, prompt naming the subject's shape only (6 seeds). A weight-0
    reference changes nothing; the masked reference never brings the distractor in. At the paper's
    weight (3) the subject's appearance is not transferred: the object of the prompted shape is mostly
    lost (the bench: embedding match 0.19 with MRSA vs 0.73 plain over 16 seeds; 0.00 vs 0.64 here)."""
    r = _run("mrsa", world, 6)
    zero = r["weight_zero_max_diff"]
    assert len(zero.with_) == 2 and max(zero.with_) <= 1e-3, zero.with_
    leak = r["distractor_leak"]
    assert sum(leak.with_) == 0, leak.with_
    emb = r["reference_embedding"]
    assert np.mean(emb.without) >= 0.5, emb.without                 # the plain model draws the shape
    assert np.mean(emb.without) - np.mean(emb.with_) >= 0.3, (emb.with_, emb.without)
    fid = r["reference_fidelity"]
    assert np.mean(fid.with_) <= np.mean(fid.without), (fid.with_, fid.without)


def test_mrsa_two_references_compose_no_better_than_the_prompt(world):
    """Two references, a prompt naming both shapes (4 seeds): the subjects in their own appearance no
    more often than from the prompt alone (the bench: 1 of 32 both ways)."""
    both = _run("mrsa_two", world, 4)["two_subjects_own_appearance"]
    assert len(both.with_) == 4
    assert np.mean(both.with_) <= np.mean(both.without), (both.with_, both.without)


def test_dmsa_does_not_mix_structure_and_appearance_in_the_world(world):
    """Structure from one reference, appearance from another (4 seeds): DMSA succeeds no more often
    than MRSA with both references or the prompt alone (the bench: 0 of 16 for all three)."""
    r = _run("dmsa", world, 4)
    for metric in ("structure_and_appearance_vs_mrsa", "structure_and_appearance_vs_prompt"):
        e = r[metric]
        assert len(e.with_) == 4
        assert np.mean(e.with_) <= np.mean(e.without), (metric, e.with_, e.without)


def test_once_per_run_clean_references_act_like_every_step_ones(world):
    """MRSA's references once per run, clean, against FreeCustom's every-step re-noising on the MRSA
    experiment's scenes (8 seeds): the prompted shape is drawn as rarely, and both far below the plain
    model (the bench: 4 of 16 both ways, 16 of 16 plain; 1 of 8 both ways here)."""
    r = _run("mrsa_once", world, 8)
    drawn = r["once_clean_shape_drawn"]
    assert len(drawn.with_) == 8
    assert abs(np.mean(drawn.with_) - np.mean(drawn.without)) <= 0.25, (drawn.with_, drawn.without)
    assert drawn.extra["plain"] - max(np.mean(drawn.with_), np.mean(drawn.without)) >= 0.5, drawn.extra
    emb = r["once_clean_embedding"]
    assert abs(np.mean(emb.with_) - np.mean(emb.without)) <= 0.2, (emb.with_, emb.without)


def test_mean_shifted_noise_places_the_composed_subjects(world):
    """Two subjects composed on a canvas, mean-shifted noise (gamma 1) vs plain noise of the same seed
    (12 seeds): more subjects found where the composer placed them (the bench: 0.38 vs 0.16 over 16
    seeds; 0.38 vs 0.17 here), and gamma 0 is exactly RandomNoise."""
    r = _run("composer", world, 12)
    zero = r["gamma_zero_max_diff"]
    assert len(zero.with_) == 2 and max(zero.with_) == 0.0, zero.with_
    placed = r["placement"]
    assert np.mean(placed.with_) - np.mean(placed.without) >= 0.1, (placed.with_, placed.without)
    assert sum(w >= wo for w, wo in zip(placed.with_, placed.without)) >= 10, (placed.with_, placed.without)
