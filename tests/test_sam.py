"""Segment Anything masks (references/sam.py): the pre/post-processing against independent computations,
prompt parsing and checking, and end-to-end masks from a tiny randomly initialised SAM built with
segment_anything's own classes (no download). The checkpoint side is in test_sam_checkpoint.py.
Skipped, saying why, when segment_anything or torchvision cannot be imported."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pack_paths import PACK_ROOT
from tiny_sam import require_segment_anything

require_segment_anything()

from segment_anything.utils.transforms import ResizeLongestSide

from personalize_pack.references import sam as S
from personalize_pack.references import sam_checkpoint as SC

DOG = PACK_ROOT / "workflows" / "inputs" / "personalize_dog6_02.jpg"


def load_rgb(path):
    from PIL import Image
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).astype("float32") / 255.0)


# --- pre-processing ---------------------------------------------------------------------------

@pytest.mark.parametrize("H,W", [(48, 80), (100, 60), (64, 64), (300, 200)])
def test_preprocess_geometry_and_values(H, W):
    from PIL import Image
    torch.manual_seed(H + W)
    img = torch.rand(1, H, W, 3)
    x, (h, w) = S.preprocess(img, 64)
    # size: the longer side becomes 64, the other scales with it, rounded half up
    long_ = max(H, W)
    assert (h, w) == (math.floor(H * 64 / long_ + 0.5), math.floor(W * 64 / long_ + 0.5))
    assert x.shape == (1, 3, 64, 64)
    assert torch.all(x[..., h:, :] == 0) and torch.all(x[..., :, w:] == 0)      # zero padding after normalising
    # values: PIL's bilinear resize of each channel (antialiased when shrinking), then SAM's mean/std
    for c in range(3):
        chan = (img[0, ..., c] * 255).numpy()
        want = np.asarray(Image.fromarray(chan, mode="F").resize((w, h), Image.BILINEAR)) \
            if (h, w) != (H, W) else chan
        want = (want - SC.PIXEL_MEAN[c]) / SC.PIXEL_STD[c]
        np.testing.assert_allclose(x[0, c, :h, :w].numpy(), want, atol=2e-5 * 255 / SC.PIXEL_STD[c] * 10)


def test_preprocess_constant_image_is_exact():
    img = torch.full((2, 30, 20, 3), 0.5)
    img[1] = torch.tensor([1.0, 0.0, 0.25])
    x, (h, w) = S.preprocess(img, 64)
    assert (h, w) == (64, 43)                                  # 20 * 64 / 30 = 42.67 -> 43
    for b, rgb in enumerate(([0.5] * 3, [1.0, 0.0, 0.25])):
        for c in range(3):
            want = (rgb[c] * 255 - SC.PIXEL_MEAN[c]) / SC.PIXEL_STD[c]
            torch.testing.assert_close(x[b, c, :h, :w], torch.full((h, w), want), atol=1e-4, rtol=0)


def test_preprocess_matches_segment_anythings_own_normalise_and_pad(tiny_sam):
    img = load_rgb(DOG)[None]
    x, (h, w) = S.preprocess(img, 64)
    resized = F.interpolate(img.permute(0, 3, 1, 2) * 255, size=(h, w), mode="bilinear", align_corners=False,
                            antialias=True)
    torch.testing.assert_close(x[0], tiny_sam.net.preprocess(resized[0]), atol=1e-5, rtol=0)


# --- prompts ----------------------------------------------------------------------------------

def test_coordinate_transform():
    pts = torch.tensor([[0.0, 0.0], [100.0, 50.0], [200.0, 300.0]])
    got = S.transform_coords(pts, (300, 200), 1024)            # H=300, W=200 -> 1024 x 683
    assert S.preprocess_shape(300, 200, 1024) == (1024, 683)
    torch.testing.assert_close(got, torch.tensor([[0.0, 0.0], [100 * 683 / 200, 50 * 1024 / 300],
                                                  [200 * 683 / 200, 300 * 1024 / 300]]))
    # the same as segment_anything's ResizeLongestSide (numpy path)
    np.testing.assert_allclose(got.numpy(), ResizeLongestSide(1024).apply_coords(pts.numpy(), (300, 200)), rtol=1e-6)
    box = torch.tensor([[10.0, 20.0, 150.0, 280.0]])
    np.testing.assert_allclose(S.transform_boxes(box, (300, 200), 1024).numpy(),
                               ResizeLongestSide(1024).apply_boxes(box.numpy(), (300, 200)), rtol=1e-6)


def test_parse_points_and_box():
    assert S.parse_points("10,20; 30.5, 40\n 1e1,2") == [(10, 20), (30.5, 40), (10, 2)]
    assert S.parse_points("  ") == [] and S.parse_points(None) == []
    assert S.parse_points("(10, 20); [3,4];") == [(10, 20), (3, 4)]
    assert S.parse_box("1, 2, 30, 40") == (1, 2, 30, 40) and S.parse_box("") is None
    with pytest.raises(ValueError, match="points: could not read 'a,b'"):
        S.parse_points("a,b")
    with pytest.raises(ValueError, match=r"points: '1,2,3' has 3 numbers; a point is 'x,y'"):
        S.parse_points("1,2,3")
    with pytest.raises(ValueError, match="negative_points: could not read"):
        S.parse_points("10 20", "negative_points")
    with pytest.raises(ValueError, match=r"box: '1,2,3' has 3 numbers; a box is 'x0,y0,x1,y1'"):
        S.parse_box("1,2,3")
    with pytest.raises(ValueError, match="box: '30,2,10,40' is not a box .* x0 < x1"):
        S.parse_box("30,2,10,40")
    with pytest.raises(ValueError, match="box: could not read"):
        S.parse_box("1,2,3,x")


def test_make_prompts_checks_the_mode_and_the_image():
    p = S.make_prompts("points + box", "10,20", "5,5", "0,0,64,48", height=48, width=64)
    assert p.points == ((10, 20), (5, 5)) and p.labels == (1, 0) and p.box == (0, 0, 64, 48)
    assert S.make_prompts("box", "junk that is ignored", "", "1,1,5,5", 48, 64).points == ()
    assert S.make_prompts("largest object", "junk", "junk", "junk", 48, 64) == S.Prompts("largest object")
    f = S.make_prompts("points + box", "0.5,0.5", "", "0.1,0.2,0.9,1", 48, 64, units="fractions")
    assert f.points == ((32, 24),) and f.box == pytest.approx((6.4, 9.6, 57.6, 48))
    with pytest.raises(ValueError, match=r"box: \(0, 0, 65, 48\) lies outside the 64x48 image; x must be in 0..64"):
        S.make_prompts("box", "", "", "0,0,65,48", 48, 64)
    with pytest.raises(ValueError, match="box: .* lies outside the 64x48 image"):
        S.make_prompts("points + box", "1,1", "", "-1,0,10,10", 48, 64)
    with pytest.raises(ValueError, match=r"points: point \(70, 5\) lies outside the 64x48 image"):
        S.make_prompts("points", "70,5", "", "", 48, 64)
    with pytest.raises(ValueError, match=r"negative_points: point \(5, 49\) lies outside"):
        S.make_prompts("points", "1,1", "5,49", "", 48, 64)
    with pytest.raises(ValueError, match="points: mode 'points' needs at least one positive point"):
        S.make_prompts("points", "", "3,3", "", 48, 64)
    with pytest.raises(ValueError, match="box: mode 'box' needs a box"):
        S.make_prompts("box", "1,1", "", " ", 48, 64)
    with pytest.raises(ValueError, match="points: mode 'points \\+ box' needs at least one point"):
        S.make_prompts("points + box", "", "", "1,1,5,5", 48, 64)
    with pytest.raises(ValueError, match="box: 2 is not a fraction in 0..1"):
        S.make_prompts("box", "", "", "0,0,2,1", 48, 64, units="fractions")
    with pytest.raises(ValueError, match="mode: unknown 'lasso'"):
        S.make_prompts("lasso", height=48, width=64)
    with pytest.raises(ValueError, match="units: unknown"):
        S.make_prompts("box", box="1,1,2,2", height=48, width=64, units="inches")


def test_multimask_rule():
    one = S.make_prompts("points", "1,1", "", "", 8, 8)
    two = S.make_prompts("points", "1,1; 2,2", "", "", 8, 8)
    box = S.make_prompts("box", "", "", "0,0,4,4", 8, 8)
    assert S.use_multimask("auto", one) and not S.use_multimask("auto", two) and not S.use_multimask("auto", box)
    assert S.use_multimask("best of 3", box) and not S.use_multimask("single", one)
    with pytest.raises(ValueError, match="multimask: unknown"):
        S.use_multimask("many", one)


# --- post-processing --------------------------------------------------------------------------

@pytest.mark.parametrize("H,W,img_size,low", [(512, 384, 1024, 256), (480, 640, 1024, 256), (48, 36, 64, 16)])
def test_postprocess_geometry_is_exact(H, W, img_size, low):
    """A low-res rectangle of +1 logits on -1: after upscaling x(img_size/low), un-padding and resizing
    to the original size, the mask is the rectangle scaled by exactly original/low-res, up to its four
    corner pixels, where the bilinear value of the corner cell dips below 0. (Bilinear
    upscaling of a +-1 step by an integer factor crosses 0 exactly between two output pixels; the
    sizes and the even cell indices are chosen so that the second resize keeps every edge between
    pixel centres as well.)"""
    h, w = S.preprocess_shape(H, W, img_size)
    f = img_size // low
    logits = -torch.ones(1, 3, low, low)
    r0, r1, c0, c1 = low // 8, low // 2, low // 4, low // 2 + 2       # even, inside the image part
    logits[0, 1, r0:r1, c0:c1] = 1.0
    logits[0, 1, h // f + 1:, :] = 5.0           # the padding below or right of the image: must be cut off
    logits[0, 1, :, w // f + 1:] = 5.0
    out = S.postprocess_masks(logits, (h, w), (H, W), img_size)
    assert out.shape == (1, 3, H, W)
    mask = out[0, 1] > 0
    sy, sx = f * H / h, f * W / w                 # original pixels per low-res cell
    want = torch.zeros(H, W, dtype=torch.bool)
    y0, y1, x0, x1 = round(r0 * sy), round(r1 * sy), round(c0 * sx), round(c1 * sx)
    want[y0:y1, x0:x1] = True
    assert not (mask & ~want).any()
    # bilinear interpolation may round off the rectangle's four corner pixels, nothing else
    lost = {tuple(p) for p in torch.nonzero(want & ~mask).tolist()}
    assert lost <= {(y0, x0), (y0, x1 - 1), (y1 - 1, x0), (y1 - 1, x1 - 1)}
    assert not (out[0, 0] > 0).any()


def test_postprocess_matches_segment_anythings_own(tiny_sam):
    torch.manual_seed(0)
    low = torch.randn(2, 3, 16, 16)
    ours = S.postprocess_masks(low, (64, 43), (300, 200), 64)
    theirs = tiny_sam.net.postprocess_masks(low, (64, 43), (300, 200))
    torch.testing.assert_close(ours, theirs)


def test_stability_and_borders():
    x = torch.tensor([[[2.0, 0.5], [-0.5, -2.0]]])
    assert float(S.stability_score(x)[0]) == pytest.approx(1 / 3)     # > 1: one pixel; > -1: three
    from segment_anything.utils.amg import calculate_stability_score
    y = torch.randn(4, 3, 16, 16) * 2
    torch.testing.assert_close(S.stability_score(y, 0.5), calculate_stability_score(y, 0.5, 1.0))
    m = torch.zeros(3, 6, 6)
    m[0, 2:4, 2:4] = 1
    m[1, 3:, 0:3] = 1
    m[2] = 1
    m[2, 2:4, 2:4] = 0
    assert S.borders_touched(m).tolist() == [0, 2, 4]
    assert S.low_res_valid_size(256, (1024, 683), 1024) == (256, 171)


def test_pick_largest_object_rule():
    low = -torch.ones(3, 3, 16, 16) * 5
    iou = torch.full((3, 3), 0.95)
    low[0, 0, 4:8, 4:8] = 5                       # small object
    low[1, 2, 2:14, 3:12] = 5                     # the largest object (touches no border)
    low[2, 1, :, :] = 5                           # the background (all four borders)
    low[2, 1, 4:9, 4:9] = -5
    low[0, 2, 0:15, 0:15] = 5                     # bigger, but not confident
    iou[0, 2] = 0.5
    low[1, 0, 8:16, 0:10] = 5                     # 2 borders, bigger than the small one, smaller than the largest
    n, c, area = S.pick_largest_object(low, iou, (16, 16))
    assert (n, c) == (1, 2) and area == pytest.approx(12 * 9 / 256)
    # an unstable mask (logits near the threshold) is dropped
    low[1, 2, 2:14, 3:12] = 0.5
    assert S.pick_largest_object(low, iou, (16, 16))[:2] == (1, 0)
    # only the image part counts: a mask in the padding is not seen
    pad = -torch.ones(1, 1, 16, 16) * 5
    pad[0, 0, 12:, 2:6] = 5
    assert S.pick_largest_object(pad, torch.ones(1, 1), (10, 16)) is None
    assert S.pick_largest_object(pad, torch.ones(1, 1), (16, 16))[:2] == (0, 0)


def test_grid_points():
    g = S.grid_points(2, 100, 200)
    assert g.tolist() == [[50, 25], [150, 25], [50, 75], [150, 75]]


# --- end to end with the tiny SAM -------------------------------------------------------------

def test_end_to_end_masks_on_a_shipped_image(tiny_sam):
    img = load_rgb(DOG)
    H, W = img.shape[:2]
    for mode, kw in (("points", dict(points="250,300")), ("box", dict(box="78,0,420,512")),
                     ("points + box", dict(points="250,300", negative_points="20,20", box="78,0,420,512"))):
        m = S.segment_image(tiny_sam, img, S.make_prompts(mode, height=H, width=W, **kw))
        assert m.shape == (H, W) and m.dtype == torch.float32
        assert set(m.unique().tolist()) <= {0.0, 1.0}
    # the same as segment_anything's own end-to-end Sam.forward on the same resized image and prompts
    prompts = S.make_prompts("points + box", "250,300", "20,20", "78,0,420,512", H, W)
    ours = S.segment_image(tiny_sam, img, prompts, multimask="single")
    h, w = S.preprocess_shape(H, W, 64)
    resized = F.interpolate(img.permute(2, 0, 1)[None] * 255, size=(h, w), mode="bilinear", align_corners=False,
                            antialias=True)[0]
    t = ResizeLongestSide(64)
    with torch.no_grad():
        theirs = tiny_sam.net([{"image": resized, "original_size": (H, W),
                            "point_coords": t.apply_coords_torch(torch.tensor([[[250.0, 300.0], [20.0, 20.0]]]), (H, W)),
                            "point_labels": torch.tensor([[1, 0]]),
                            "boxes": t.apply_boxes_torch(torch.tensor([[78.0, 0.0, 420.0, 512.0]]), (H, W))}],
                          multimask_output=False)[0]["masks"][0, 0]
    assert torch.equal(ours.bool(), theirs)


def test_best_of_three_takes_the_highest_predicted_iou(tiny_sam):
    img = load_rgb(DOG)
    H, W = img.shape[:2]
    prompts = S.make_prompts("points", "250,300", "", "", H, W)
    emb, size = S.encode_image(tiny_sam, img)
    low, iou = S.decode(tiny_sam, emb, S.transform_coords(torch.tensor([[[250.0, 300.0]]]), (H, W), 64),
                        torch.tensor([[1]]), None, True)
    k = int(iou[0].argmax())
    want = S.postprocess_masks(low[:, k:k + 1], size, (H, W), 64)[0, 0] > 0
    assert torch.equal(S.segment_image(tiny_sam, img, prompts, multimask="best of 3").bool(), want)
    # threshold: a higher logit threshold never grows the mask
    loose = S.segment_image(tiny_sam, img, prompts, threshold=-1.0)
    tight = S.segment_image(tiny_sam, img, prompts, threshold=1.0)
    assert bool((tight <= loose).all())


def test_largest_object_mode(tiny_sam):
    img = load_rgb(DOG)[::4, ::4].contiguous()        # 128 px
    prompts = S.make_prompts("largest object")
    # a random SAM has no confident object: a clear error
    with pytest.raises(ValueError, match="mode 'largest object': SAM found no confident object"):
        S.segment_image(tiny_sam, img, prompts, grid=4)
    calls = []
    m = S.segment_image(tiny_sam, img, prompts, grid=4, min_iou=-1e9, min_stability=0.0, chunk=5,
                        check_interrupt=lambda: calls.append(1), max_borders=4)
    assert m.shape == (128, 128) and set(m.unique().tolist()) <= {0.0, 1.0} and m.sum() > 0
    assert len(calls) == math.ceil(16 / 5)


# --- prompts connected from other nodes -------------------------------------------------------------

def test_connected_prompts_replace_the_text_and_must_fit_the_mode():
    p = S.make_prompts("points + box", "1,1", "2,2", "0,0,5,5", 48, 64, given_points=[(10.0, 20.0)],
                       given_boxes=[(1.0, 2.0, 30.0, 40.0), (5.0, 5.0, 9.0, 9.0)])
    # connected points replace the points text, the negative_points text stays; boxes replace the box text
    assert p.points == ((10.0, 20.0), (2.0, 2.0)) and p.labels == (1, 0)
    assert p.box == (1.0, 2.0, 30.0, 40.0) and p.boxes == ((1.0, 2.0, 30.0, 40.0), (5.0, 5.0, 9.0, 9.0))
    # units does not apply to connected pixels
    f = S.make_prompts("points", "0.5,0.5", "", "", 48, 64, units="fractions", given_points=[(40.0, 30.0)])
    assert f.points == ((40.0, 30.0),)
    with pytest.raises(ValueError, match="bboxes: boxes are connected but mode 'points' uses no box"):
        S.make_prompts("points", "1,1", "", "", 48, 64, given_boxes=[(0, 0, 4, 4)])
    with pytest.raises(ValueError, match="negative_coords: points are connected but mode 'box' uses no points"):
        S.make_prompts("box", "", "", "0,0,4,4", 48, 64, given_negative=[(1, 1)])
    with pytest.raises(ValueError, match="positive_coords: mode 'points' needs at least one positive point"):
        S.make_prompts("points", "1,1", "", "", 48, 64, given_points=[])
    with pytest.raises(ValueError, match="bboxes: mode 'box' needs a box; the connected boxes are empty"):
        S.make_prompts("box", "", "", "0,0,4,4", 48, 64, given_boxes=[])


def test_several_boxes_give_the_union_of_their_masks(tiny_sam):
    img = load_rgb(DOG)
    H, W = img.shape[:2]
    one, two = (78.0, 0.0, 300.0, 300.0), (200.0, 250.0, 420.0, 512.0)
    a = S.segment_image(tiny_sam, img, S.make_prompts("box", box="78,0,300,300", height=H, width=W))
    b = S.segment_image(tiny_sam, img, S.make_prompts("box", box="200,250,420,512", height=H, width=W))
    both = S.segment_image(tiny_sam, img, S.make_prompts("box", height=H, width=W, given_boxes=[one, two]))
    assert not torch.equal(a, b)                      # the two boxes steer the mask differently
    assert torch.equal(both, torch.maximum(a, b))
    # with points, each box's row carries the same points, as each box alone would
    pb = S.make_prompts("points + box", "250,300", "", "", H, W, given_boxes=[one, two])
    pa = S.segment_image(tiny_sam, img, S.make_prompts("points + box", "250,300", "", "78,0,300,300", H, W))
    pbb = S.segment_image(tiny_sam, img, S.make_prompts("points + box", "250,300", "", "200,250,420,512", H, W))
    assert torch.equal(S.segment_image(tiny_sam, img, pb), torch.maximum(pa, pbb))
