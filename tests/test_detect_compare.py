"""Detect-and-Compare arithmetic (metrics/detect_compare.py) against the documented figures of
docs/algorithms.md §5.10(a) and an independent numpy computation."""
import numpy as np
import pytest
import torch

from personalize_pack.metrics.detect_compare import (crop_boxes, detect_and_compare, greedy_match,
                                                     ground_truth_matrix, pad_to_square)

C1 = torch.tensor([[1, 0, 0, 0], [0.9, 0.1, 0, 0], [0.8, 0.2, 0.1, 0]], dtype=torch.float64)
C2 = torch.tensor([[0, 1, 0, 0], [0, 0.9, 0.3, 0], [0.1, 0.8, 0, 0.2]], dtype=torch.float64)


def numpy_dc(boxes, refs):
    """The demo's computation written plainly: cosines, means, count gate, greedy rows, ord=2 norm."""
    cos = lambda a, b: float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))
    n = len(refs)
    G = np.array([[np.mean([cos(a, b) for a in refs[i] for b in refs[j]]) for j in range(n)] for i in range(n)])
    if len(boxes) != n:
        return 0.0
    A = np.array([[np.mean([cos(bx, r) for r in refs[i]]) for i in range(n)] for bx in boxes])
    rows, used = [], set()
    for i in range(n):
        order = np.argsort(-A[:, i])
        b = next(int(j) for j in order if int(j) not in used)
        used.add(b)
        rows.append(A[b])
    return 1.0 - np.linalg.norm(np.array(rows) - G, ord=2)


def test_documented_figures():
    g = ground_truth_matrix([C1, C2])
    np.testing.assert_allclose(g.numpy(), [[0.9868346, 0.1574078], [0.1574078, 0.9612077]], atol=1e-7)
    good = torch.tensor([[0.05, 1, 0.05, 0], [1, 0.1, 0, 0]], dtype=torch.float64)   # given in swapped order
    r = detect_and_compare(good, [C1, C2])
    assert r.score == pytest.approx(0.9746748, abs=1e-7) and r.matched == [1, 0]
    mixed = torch.tensor([[1, 1, 0, 0], [1, 0.9, 0, 0]], dtype=torch.float64)
    assert detect_and_compare(mixed, [C1, C2]).score == pytest.approx(0.2097730, abs=1e-7)
    one = detect_and_compare(good[:1], [C1, C2])
    assert one.score == 0.0 and "1 boxes detected for 2 subjects" in one.reason
    assert detect_and_compare(torch.zeros(0, 4), [C1, C2]).score == 0.0
    assert detect_and_compare(torch.cat([good, good[:1]]), [C1, C2]).score == 0.0        # three boxes


@pytest.mark.parametrize("seed", range(5))
def test_random_cases_match_numpy(seed):
    rng = np.random.default_rng(seed)
    n = 2 + seed % 3
    refs = [rng.standard_normal((rng.integers(1, 5), 8)) for _ in range(n)]
    boxes = rng.standard_normal((n, 8))
    got = detect_and_compare(torch.from_numpy(boxes), [torch.from_numpy(r) for r in refs]).score
    assert got == pytest.approx(numpy_dc(boxes, refs), abs=1e-10)


def test_greedy_is_not_the_optimal_assignment():
    # subject 0 grabs box 0 although the best total would give it box 1 (MuDI's demo is greedy)
    a = torch.tensor([[0.9, 0.85], [0.8, 0.1]])
    assert greedy_match(a) == [0, 1]


def test_spectral_not_frobenius():
    boxes = torch.tensor([[0.05, 1, 0.05, 0], [1, 0.1, 0, 0]], dtype=torch.float64)
    r = detect_and_compare(boxes, [C1, C2])
    diff = r.boxes_vs_subjects[r.matched] - r.ground_truth
    assert r.score == pytest.approx(1 - float(torch.linalg.svdvals(diff)[0]))
    assert abs(r.score - (1 - float(diff.norm()))) > 1e-6


def mudi_crop(image_u8, box):
    """MuDI's crop_and_pad_image, written with PIL as its code does (owl_dreamsim_utils.py):
    ``Image.crop(box)``, then centred on a white square of the longer side."""
    from PIL import Image
    img = Image.fromarray(image_u8)
    cropped = img.crop(tuple(box))
    side = max(cropped.size)
    padded = Image.new("RGB", (side, side), (255, 255, 255))
    padded.paste(cropped, ((side - cropped.size[0]) // 2, (side - cropped.size[1]) // 2))
    return torch.from_numpy(np.asarray(padded).copy())


def test_crops_are_mudis_pil_crops():
    g = torch.Generator().manual_seed(3)
    u8 = (torch.rand(40, 60, 3, generator=g) * 255).round().to(torch.uint8)
    img = u8.float() / 255
    boxes = [(10, 5, 30, 35), (0, 0, 60, 10), (-5, -5, 70, 50), (12.4, 3.6, 40.5, 21.49), (50, -8, 75, 30),
             (-20, 30, 10, 60), (70, -9, 90, -2)]
    for box, crop in zip(boxes, crop_boxes(img, boxes)):
        want = mudi_crop(u8.numpy(), box)
        assert crop.shape == want.shape, box
        assert torch.equal((crop * 255).round().to(torch.uint8), want), box
    # kept whole: a box running past the left edge is black there and its content stays where it was
    (edge,) = crop_boxes(img, [(-10, 0, 20, 30)])
    assert edge.shape == (30, 30, 3) and torch.all(edge[:, :10] == 0) and torch.equal(edge[:, 10:], img[:30, :20])
    assert pad_to_square(torch.zeros(3, 3, 3)).shape == (3, 3, 3)
    # a zero-width box (PIL would give an empty image) becomes one pixel wide; far-out coordinates clamp
    zero, far = crop_boxes(img, [(10, 10, 10, 20), (-1e9, 0, 5, 4)])
    assert zero.shape == (10, 10, 3) and torch.equal(zero[:, 4:5], img[10:20, 10:11])
    assert far.shape == (65, 65, 3)
    with pytest.raises(ValueError, match="finite"):
        crop_boxes(img, [(0, 0, float("nan"), 5)])


def test_bad_references():
    with pytest.raises(ValueError, match="no subjects"):
        detect_and_compare(torch.zeros(1, 4), [])
    with pytest.raises(ValueError, match="subject 2"):
        detect_and_compare(torch.zeros(2, 4), [C1, torch.zeros(0, 4)])


class BoxDetector:
    """Stand-in detector: fixed boxes, recording what it was asked."""

    def __init__(self, boxes):
        self.boxes, self.calls = boxes, []

    def detect(self, image, queries, threshold):
        from personalize_pack.metrics.detect_compare import Detection
        self.calls.append((tuple(image.shape), list(queries), threshold))
        return [Detection(tuple(b), 0.9, i % len(queries)) for i, b in enumerate(self.boxes)]


class MeanColour:
    """Stand-in embedder: the crop's mean colour and its size, so crops can be told apart."""

    def __init__(self):
        self.sizes = []

    def embed(self, crops):
        self.sizes += [tuple(c.shape) for c in crops]
        return torch.stack([torch.cat([c.mean(dim=(0, 1)), torch.tensor([c.shape[0] / 100.0])]) for c in crops]).double()


def test_score_image_crops_every_box_and_scores_them():
    from personalize_pack.metrics.detect_compare import score_image
    img = torch.zeros(60, 80, 3)
    img[:, :40, 0] = 1.0          # red left half
    img[:, 40:, 2] = 1.0          # blue right half
    refs = [torch.tensor([[1.0, 0, 0, 0.3]], dtype=torch.float64), torch.tensor([[0, 0, 1.0, 0.3]], dtype=torch.float64)]
    det = BoxDetector([(45, 10, 75, 40), (5, 10, 35, 40)])      # blue box first
    emb = MeanColour()
    result, dets = score_image(img, ["red thing", "blue thing"], refs, det, emb, threshold=0.3)
    assert det.calls == [((60, 80, 3), ["red thing", "blue thing"], 0.3)]
    assert emb.sizes == [(30, 30, 3), (30, 30, 3)] and len(dets) == 2
    crops = crop_boxes(img, [d.box for d in dets])
    want = detect_and_compare(MeanColour().embed(crops), refs)
    assert result.matched == [1, 0] and result.score == pytest.approx(want.score, abs=1e-12)
    # one box for two subjects: 0, and the embedder still sees the crop
    assert score_image(img, ["red thing", "blue thing"], refs, BoxDetector([(5, 10, 35, 40)]), MeanColour())[0].score == 0.0
    # no box: 0 without calling the embedder
    empty = MeanColour()
    r, d = score_image(img, ["red thing", "blue thing"], refs, BoxDetector([]), empty)
    assert r.score == 0.0 and d == [] and empty.sizes == []
    with pytest.raises(ValueError, match="2 names for 1 reference sets"):
        score_image(img, ["a", "b"], refs[:1], det, emb)


def test_annotate_draws_boxes_in_their_querys_colour():
    from personalize_pack.metrics.detect_compare import PALETTE, Detection, annotate
    img = torch.full((200, 200, 3), 0.5)
    dets = [Detection((40, 60, 120, 150), 0.7, 0), Detection((130, 100, 190, 190), 0.5, 1)]
    out = annotate(img, dets, ["cat", "dog"], matched=[0], caption="")
    assert out.shape == img.shape and out.dtype == torch.float32
    px = (out * 255).round().to(torch.uint8)
    assert tuple(px[100, 40].tolist()) == PALETTE[0] and tuple(px[100, 43].tolist()) == PALETTE[0]   # thick: matched
    assert tuple(px[150, 130].tolist()) == PALETTE[1] and tuple(px[150, 133].tolist()) == (128, 128, 128)  # thin
    assert tuple(px[100, 80].tolist()) == (128, 128, 128)            # inside a box: untouched
    assert torch.equal(px[195:, :30], torch.full((5, 30, 3), 128, dtype=torch.uint8))
