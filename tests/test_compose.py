"""MuDI's Subject Composer geometry (Seg-Mix collage generalised to N subjects; pure torch)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from personalize_pack.references.compose import (Subject, compose_subjects, make_subject, mask_bbox,
                                                 max_scale)

from compose_checks import check_geometry, random_subject, subject_pixels
from pack_paths import PACK_ROOT

INPUTS = PACK_ROOT / "workflows" / "inputs"


def photo_subject(stem, name):
    img = torch.from_numpy(np.asarray(Image.open(INPUTS / f"{stem}.jpg").convert("RGB")).astype("float32") / 255)
    msk = torch.from_numpy(np.asarray(Image.open(INPUTS / f"{stem}_mask.jpg").convert("L")).astype("float32") / 255)
    return make_subject(img, msk, name)


@pytest.fixture(scope="module")
def photos():
    return [photo_subject("personalize_cat_04", "cat"), photo_subject("personalize_dog6_02", "dog")]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("placement", ["random", "left to right"])
def test_geometry_random_subjects(n, placement):
    g = torch.Generator().manual_seed(n)
    subjects = [random_subject(g, f"s{i}", size=(int(torch.randint(40, 160, (), generator=g)),
                                               int(torch.randint(40, 160, (), generator=g)))) for i in range(n)]
    comp = compose_subjects(subjects, 320, 256, placement, 0.6, 0.9, 0.1, "black", seed=5, margin=8)
    check_geometry(comp, subjects, 320, 256, 0.6, 0.9, 8, "black")


@pytest.mark.parametrize("seed", range(4))
def test_geometry_shipped_photos_seg_mix_defaults(photos, seed):
    comp = compose_subjects(photos, 1024, 1024, seed=seed)
    check_geometry(comp, photos, 1024, 1024, 0.75, 1.0, 32)
    for i in range(2):     # max_overlap 0: masks never touch
        for j in range(i):
            assert not (comp.masks[i].bool() & comp.masks[j].bool()).any()
    lay = json.loads(comp.layout_json())
    assert lay["canvas"] == {"width": 1024, "height": 1024, "background": "white"}
    assert [s["name"] for s in lay["subjects"]] == ["cat", "dog"] and lay["order"] == list(comp.order)
    assert [tuple(s["box"]) for s in lay["subjects"]] == list(comp.boxes)


def test_seg_mix_numbers_of_the_spec():
    """§5.10(b): a 300x600 crop on the 1024 canvas with two subjects: f_max = min(480/300, 992/600) = 1.6,
    f in [1.2, 1.6]."""
    assert max_scale(300, 600, 1024, 1024, 2, 32) == pytest.approx(1.6)
    m = torch.zeros(700, 400)
    m[50:650, 40:340] = 1
    s = make_subject(torch.rand(700, 400, 3), m, "tall")
    scales = []
    for seed in range(20):
        comp = compose_subjects([s, s], 1024, 1024, seed=seed)
        assert comp.max_scales == pytest.approx((1.6, 1.6))
        scales += list(comp.scales)
        for (x0, y0, x1, y1), f in zip(comp.boxes, comp.scales):
            assert (x1 - x0, y1 - y0) == (round(300 * f), round(600 * f))
    assert all(1.2 <= f <= 1.6 for f in scales) and max(scales) - min(scales) > 0.2


def test_overlap_bound_is_respected(photos):
    subjects = photos * 2
    for max_overlap in (0.0, 0.05, 0.3):
        for seed in range(3):
            comp = compose_subjects(subjects, 768, 768, scale_min=0.9, max_overlap=max_overlap, seed=seed)
            check_geometry(comp, subjects, 768, 768, 0.9, 1.0, 32)
            full = []
            for i, s in enumerate(subjects):
                _, msk = subject_pixels(s, comp.boxes[i])
                plane = torch.zeros(768, 768, dtype=torch.bool)
                x0, y0, x1, y1 = comp.boxes[i]
                plane[y0:y1, x0:x1] = msk
                full.append(plane)
            for i in range(4):
                for j in range(i):
                    inter = int((full[i] & full[j]).sum())
                    assert inter <= max_overlap * min(int(full[i].sum()), int(full[j].sum()))


def test_left_to_right_keeps_input_order_and_columns(photos):
    subjects = [photos[0], photos[1], photos[0]]
    for seed in range(5):
        comp = compose_subjects(subjects, 900, 600, "left to right", seed=seed)
        check_geometry(comp, subjects, 900, 600, 0.75, 1.0, 32)
        for i, (x0, _, x1, _) in enumerate(comp.boxes):
            assert 300 * i <= x0 and x1 <= 300 * (i + 1)
        assert [b[0] for b in comp.boxes] == sorted(b[0] for b in comp.boxes)


def test_seeded_reproducibility(photos):
    state = torch.get_rng_state()
    a = compose_subjects(photos, 512, 512, seed=7)
    b = compose_subjects(photos, 512, 512, seed=7)
    assert torch.equal(torch.get_rng_state(), state)          # the global RNG is never used
    assert torch.equal(a.image, b.image) and torch.equal(a.masks, b.masks)
    assert a.layout() == b.layout()
    layouts = {json.dumps(compose_subjects(photos, 512, 512, seed=s).layout()["subjects"]) for s in range(6)}
    assert len(layouts) == 6


def test_white_and_black_backgrounds(photos):
    w = compose_subjects(photos[:1], 256, 256, background="white", seed=1)
    k = compose_subjects(photos[:1], 256, 256, background="black", seed=1)
    assert torch.equal(w.masks, k.masks)
    out = ~w.masks[0].bool()
    assert (w.image[0][out] == 1).all() and (k.image[0][out] == 0).all()


def test_subject_normalisation():
    img = torch.rand(1, 10, 12, 4)
    m = torch.zeros(10, 12)
    m[2:5, 3:9] = 255
    s = make_subject(img, m, "x")
    assert isinstance(s, Subject) and s.image.shape == (10, 12, 3) and s.mask.max() == 1
    assert mask_bbox(s.mask) == (3, 2, 9, 5)
    grey = make_subject(torch.rand(10, 12, 1), m[None], "")
    assert grey.image.shape == (10, 12, 3) and grey.name == "subject"


# ----------------------------------------------------------------------------------- bad input

def _subject():
    m = torch.zeros(32, 32)
    m[8:24, 8:24] = 1
    return make_subject(torch.rand(32, 32, 3), m, "cube")


@pytest.mark.parametrize("kwargs,match", [
    (dict(width=60, margin=32), "no room for 2 subjects"),            # canvas narrower than the margins allow
    (dict(height=20, margin=32), "no room"),
    (dict(scale_min=0.9, scale_max=0.5), "scale_min/scale_max"),
    (dict(scale_min=0.0), "scale_min/scale_max"),
    (dict(scale_max=1.5), "scale_min/scale_max"),
    (dict(max_overlap=1.5), "max_overlap"),
    (dict(placement="grid"), "placement"),
    (dict(background="red"), "background"),
    (dict(margin=-1), "margin"),
])
def test_bad_arguments(kwargs, match):
    args = dict(width=256, height=256)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        compose_subjects([_subject(), _subject()], **args)


def test_no_subjects():
    with pytest.raises(ValueError, match="no subjects"):
        compose_subjects([], 256, 256)
    with pytest.raises(TypeError, match="Subject objects"):
        compose_subjects([torch.rand(4, 4, 3)], 256, 256)


def test_bad_subjects():
    with pytest.raises(ValueError, match="dog: the mask is empty"):
        make_subject(torch.rand(16, 16, 3), torch.full((16, 16), 0.4), "dog")
    with pytest.raises(ValueError, match=r"cat: the mask is 8x16 px but the image is 16x16 px"):
        make_subject(torch.rand(16, 16, 3), torch.ones(16, 8), "cat")
    with pytest.raises(ValueError, match="expected one mask"):
        make_subject(torch.rand(16, 16, 3), torch.ones(2, 16, 16), "cat")
    with pytest.raises(ValueError, match="expected one image"):
        make_subject(torch.rand(2, 16, 16, 3), torch.ones(16, 16), "cat")
    with pytest.raises(ValueError, match="NaN"):
        make_subject(torch.full((16, 16, 3), float("nan")), torch.ones(16, 16), "cat")


def test_impossible_overlap_is_a_clear_error():
    # five tall subjects that only fit side by side (5 x 40 px in a 200 px canvas): random placement
    # without overlap gives up with a clear error instead of shrinking them; left to right always fits
    m = torch.zeros(40, 12)
    m[4:36, 2:10] = 1                                            # 8 x 32 px -> f_max 5 -> 40 x 160 px
    subjects = [make_subject(torch.rand(40, 12, 3), m, f"bar {i}") for i in range(5)]
    with pytest.raises(ValueError, match="could not place bar .* raise max_overlap"):
        compose_subjects(subjects, 200, 200, "random", 1.0, 1.0, 0.0, seed=3, margin=0)
    comp = compose_subjects(subjects, 200, 200, "left to right", 1.0, 1.0, 0.0, seed=3, margin=0)
    assert comp.masks.sum() == 5 * 40 * 160
