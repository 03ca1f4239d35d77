"""training/segmix.py: MuDI's Seg-Mix sampler (docs/algorithms.md §5.2) on top of the Subject
Composer geometry (references/compose.py, ``edges`` placement)."""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from personalize_pack.references.compose import EDGES, PLACEMENTS, compose_subjects, make_subject, mask_bbox
from personalize_pack.training.segmix import TEMPLATE, SegMixSampler, cover_resize, step_generator

from compose_checks import check_geometry, random_subject

PHRASES = {"a": "olis monster toy", "b": "hta corgi", "c": "sks can"}


def wide_subject(g, name, h=40, w=160):
    """A subject filling a wide image: width-limited, so two of them often overlap."""
    img = torch.rand(h, w, 3, generator=g) * 0.9
    m = torch.zeros(h, w)
    m[2:-2, 1:-1] = 1
    return make_subject(img, m, name)


def dataset(seed=0, wide=False, identifiers="abc"):
    g = torch.Generator().manual_seed(seed)
    subjects = {}
    for k in identifiers:
        rows = []
        for i in range(2):
            s = wide_subject(g, f"{k}{i}") if wide else random_subject(g, f"{k}{i}", size=(60 + 20 * i, 50 + 15 * i))
            rows.append((s.image, s.mask, f"a photo of {PHRASES[k]} number {i}"))
        subjects[k] = rows
    return subjects


def sampler(size=128, prob=0.3, start=0, seed=0, wide=False, identifiers="abc", **kw):
    return SegMixSampler(dataset(seed, wide, identifiers), {k: PHRASES[k] for k in identifiers}, segmix_prob=prob,
                         segmix_start_step=start, size=size, **kw)


def binomial_ok(count, n, p, z=5.0):
    return abs(count - n * p) <= z * math.sqrt(n * p * (1 - p))


def test_segmix_probability_and_start_step():
    s = sampler(size=64, prob=0.3, start=400)
    draws = [s.draw(seed=3, step=k) for k in range(1200)]
    assert not any(d.sample.is_segmix for d in draws[:400])
    hits = sum(d.sample.is_segmix for d in draws[400:])
    assert binomial_ok(hits, 800, 0.3), hits
    for d in draws[400:]:
        if d.sample.is_segmix:
            assert d.partner[0] != d.anchor[0]
    # the partner is any other identifier, uniformly (each of the 2 others ~ half the time)
    per_anchor = Counter((d.anchor[0], d.partner[0]) for d in draws if d.sample.is_segmix)
    for a in "abc":
        n = sum(v for (x, _), v in per_anchor.items() if x == a)
        for b in "abc":
            if b != a:
                assert binomial_ok(per_anchor[(a, b)], n, 0.5)
    # the anchor is uniform over the 6 images
    anchors = Counter(d.anchor for d in draws)
    assert len(anchors) == 6 and all(binomial_ok(v, 1200, 1 / 6) for v in anchors.values())
    assert not any(sampler(size=64, prob=0.0).sample(1, k).is_segmix for k in range(50))
    assert all(sampler(size=64, prob=1.0).sample(1, k).is_segmix for k in range(50))


def test_slots_of_one_step_are_independent_and_seg_mix_starts_by_the_step():
    """The samples of one optimizer step (batch items, accumulation micro-batches) are told apart by
    ``slot``: slot 0 is the step's own stream, other slots draw independently; Seg-Mix switches on by the
    optimizer step, whatever the slot (a slot number past segmix_start_step does not switch it on)."""
    s = sampler(size=64, prob=0.3, start=100)
    assert s.draw(3, 7).anchor == s.draw(3, 7, slot=0).anchor
    assert torch.equal(s.sample(3, 7).image, s.sample(3, 7, slot=0).image)
    anchors = Counter(s.draw(3, 7, slot=k).anchor for k in range(600))
    assert len(anchors) == 6 and all(binomial_ok(v, 600, 1 / 6) for v in anchors.values())
    assert not any(s.draw(3, 50, slot=k).sample.is_segmix for k in range(300))
    assert binomial_ok(sum(s.draw(3, 100, slot=k).sample.is_segmix for k in range(600)), 600, 0.3)


def pair_of(s, d):
    a = s.images[d.anchor[0]][d.anchor[1]][0]
    b = s.images[d.partner[0]][d.partner[1]][0]
    return [a, b] if d.anchor_left else [b, a]


@pytest.mark.parametrize("wide", [False, True])
def test_collage_geometry_masks_and_pixels(wide):
    S = 256
    s = sampler(size=S, prob=1.0, seed=2, wide=wide)
    assert s.margin == 8 and s.edge_margin == 64
    overlaps, lefts = 0, Counter()
    for step in range(24):
        d = s.draw(seed=5, step=step)
        img, mask, caption, is_segmix = d.sample
        comp = d.composition
        assert is_segmix and comp.placement == EDGES
        pair = pair_of(s, d)
        # scales in U(0.75 f_max, f_max) with f_max = min((S/2 - m)/w, (S - m)/h), pixels, disjoint visible
        # masks, white elsewhere (the composer's own checks)
        check_geometry(comp, pair, S, S, 0.75, 1.0, 8)
        for i, subj in enumerate(pair):
            x0, y0, x1, y1 = mask_bbox(subj.mask)
            assert comp.max_scales[i] == pytest.approx(min((S / 2 - 8) / (x1 - x0), (S - 8) / (y1 - y0)))
        # MuDI's layout: left subject at x = U{1..S/4}, right one right-aligned with a margin U{1..S/4}
        (lx0, _, lx1, _), (rx0, _, rx1, _) = comp.boxes
        assert 1 <= lx0 <= 64 and S - 64 <= rx1 <= S - 1
        overlaps += lx1 > rx0
        lefts[d.anchor_left] += 1
        # the loss mask is the union of the visible subjects; outside it the canvas is white, inside not
        assert img.shape == (S, S, 3) and mask.shape == (S, S)
        assert torch.equal(mask, comp.masks.amax(0))
        on = mask.bool()
        assert (img[~on] == 1.0).all() and not (img[on] == 1.0).all(-1).any()
        assert torch.equal(img, comp.image[0])
        assert caption == f"a photo of a {PHRASES[d.anchor[0]]} and a {PHRASES[d.partner[0]]}, simple background."
    assert lefts[True] >= 4 and lefts[False] >= 4        # the anchor on both sides
    if wide:
        assert overlaps >= 4                               # MuDI's layout lets wide subjects overlap


def test_spec_scale_numbers_at_1024():
    """§5.10(b): a 300x600 crop on the 1024 canvas: f_max = min(480/300, 992/600) = 1.6, f in [1.2, 1.6]."""
    m = torch.zeros(700, 400)
    m[50:650, 40:340] = 1
    img = torch.rand(700, 400, 3) * 0.9
    s = SegMixSampler({"a": [(img, m, "x")], "b": [(img, m, "y")]}, {"a": "olis toy", "b": "hta corgi"},
                      segmix_prob=1.0)
    assert s.size == 1024 and s.margin == 32 and s.edge_margin == 256
    scales = []
    for step in range(3):
        d = s.draw(seed=0, step=step)
        assert d.composition.max_scales == pytest.approx((1.6, 1.6))
        scales += d.composition.scales
        for (x0, y0, x1, y1), f in zip(d.composition.boxes, d.composition.scales):
            assert (x1 - x0, y1 - y0) == (round(300 * f), round(600 * f))
    assert all(1.2 <= f <= 1.6 for f in scales)


def test_plain_sample_caption_mask_and_resize():
    s = sampler(size=50, prob=0.3)
    plain = [(k, s.draw(seed=1, step=k)) for k in range(40)]
    plain = [(k, d) for k, d in plain if not d.sample.is_segmix]
    assert plain
    for _k, d in plain:
        img, mask, caption, is_segmix = d.sample
        ident, i = d.anchor
        assert caption == f"a photo of {PHRASES[ident]} number {i}" and d.partner is None and d.composition is None
        assert torch.equal(mask, torch.ones(50, 50)) and img.shape == (50, 50, 3)
        assert torch.equal(img, cover_resize(s.images[ident][i][0].image, 50))
    # cover resize: shorter side to the size, centre crop (here an exact 2x2 average)
    x = torch.rand(100, 200, 3)
    expect = x[:, 50:150].reshape(50, 2, 50, 2, 3).mean((1, 3))
    torch.testing.assert_close(cover_resize(x, 50), expect)
    assert cover_resize(x, 100).shape == (100, 100, 3)


def test_determinism_and_index():
    s = sampler(size=64, prob=0.5)
    for step in range(20):
        a, b = s.sample(seed=9, step=step), s.sample(seed=9, step=step)
        assert torch.equal(a.image, b.image) and torch.equal(a.mask, b.mask) and a[2:] == b[2:]
    other = [s.sample(seed=10, step=k) for k in range(20)]
    assert any(not torch.equal(o.image, s.sample(seed=9, step=k).image) for k, o in enumerate(other))
    # the same data built again gives the same draws (no global RNG involved)
    torch.manual_seed(1234)
    t = sampler(size=64, prob=0.5)
    assert all(torch.equal(t.sample(9, k).image, s.sample(9, k).image) for k in range(10))
    for idx in range(len(s)):
        assert s.draw(seed=0, step=0, index=idx).anchor == s.items[idx]
        assert s.draw(seed=0, step=0, index=idx + len(s)).anchor == s.items[idx]
    assert s.items == [(k, i) for k in "abc" for i in range(2)]
    # step generators: distinct streams for distinct (seed, step)
    firsts = {float(torch.rand((), generator=step_generator(sd, st))) for sd in range(5) for st in range(5)}
    assert len(firsts) == 25


def test_inputs_and_errors():
    g = torch.Generator().manual_seed(0)
    subj = random_subject(g, "x", size=(40, 30))
    img, m = subj.image, subj.mask
    # ComfyUI-style batch-of-one image and mask are accepted
    s = SegMixSampler({"a": [(img[None], m[None], "c1")], "b": [(img, m, "c2")]}, PHRASES, segmix_prob=1.0, size=64)
    assert s.sample(0, 0).is_segmix and s.caption("b", "a") == TEMPLATE.format("hta corgi", "olis monster toy")
    custom = SegMixSampler({"a": [(img, m, "c1")], "b": [(img, m, "c2")]}, PHRASES, segmix_prob=1.0, size=64,
                           template="{} with {}", background="black")
    out = custom.sample(0, 0, index=0)
    assert out.caption == "olis monster toy with hta corgi" and (out.image[~out.mask.bool()] == 0).all()
    with pytest.raises(ValueError, match="two identifiers"):
        SegMixSampler({"a": [(img, m, "c")]}, PHRASES, segmix_prob=0.3)
    single = SegMixSampler({"a": [(img, m, "c")]}, PHRASES, segmix_prob=0.0, size=32)
    assert not single.sample(0, 5).is_segmix
    with pytest.raises(ValueError, match="no phrase"):
        SegMixSampler({"a": [(img, m, "c")], "z": [(img, m, "c")]}, PHRASES)
    with pytest.raises(ValueError, match="mask is empty"):
        SegMixSampler({"a": [(img, torch.zeros_like(m), "c")], "b": [(img, m, "c")]}, PHRASES)
    with pytest.raises(ValueError, match="no images"):
        SegMixSampler({"a": [], "b": [(img, m, "c")]}, PHRASES)
    with pytest.raises(ValueError, match="segmix_prob"):
        SegMixSampler({"a": [(img, m, "c")], "b": [(img, m, "c")]}, PHRASES, segmix_prob=1.5)
    with pytest.raises(ValueError, match="template"):
        SegMixSampler({"a": [(img, m, "c")], "b": [(img, m, "c")]}, PHRASES, template="{} only")
    with pytest.raises(ValueError, match="scale_min"):
        SegMixSampler({"a": [(img, m, "c")], "b": [(img, m, "c")]}, PHRASES, scale_min=0.0)


def test_edges_placement_in_the_composer_is_training_only():
    g = torch.Generator().manual_seed(4)
    a, b = random_subject(g, "a"), random_subject(g, "b")
    assert EDGES not in PLACEMENTS                      # the Subject Composer node's list is unchanged
    comp = compose_subjects([a, b], 300, 200, EDGES, seed=3, margin=8, edge_margin=10)
    check_geometry(comp, [a, b], 300, 200, 0.75, 1.0, 8)
    assert 1 <= comp.boxes[0][0] <= 10 and 290 <= comp.boxes[1][2] <= 299
    with pytest.raises(ValueError, match="exactly two"):
        compose_subjects([a, b, a], 300, 200, EDGES)
    with pytest.raises(ValueError, match="exactly two"):
        compose_subjects([a], 300, 200, EDGES)
