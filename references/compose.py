"""Subject composition for MuDI: segmented subjects pasted on a plain canvas (the Seg-Mix collage,
``docs/algorithms.md`` §5.2, generalised to N subjects and any canvas). The same function serves the
Subject Composer node (the image behind mean-shifted noise, §5.4) and Seg-Mix training. Pure torch.

Geometry of one subject (``W x H`` canvas, N subjects, margin ``m``):

* crop the image and mask to the bounding box of ``mask > 0.5`` (``w x h`` pixels);
* ``f_max = min((W / N - m) / w, (H - m) / h)``: the largest scale that fits one of N equal
  columns (for N = 2 at 1024 this is Seg-Mix's ``min((512 - 32) / w, (1024 - 32) / h)``);
* ``f ~ U(scale_min * f_max, scale_max * f_max)``; image and mask resized (area when shrinking,
  bilinear when growing), the mask made hard again at 0.5 and the subject's background dropped.

Placement: ``left to right`` puts subject i inside the i-th of N equal columns (x uniform over the
column's free width, y uniform over the canvas height), so the subjects never overlap and appear in
their input order from left to right. ``random`` puts each box anywhere inside the canvas and rejects
positions where the subject's mask overlaps an already placed subject's mask by more than
``max_overlap`` of the smaller subject's area; after ``TRIES_PER_SUBJECT`` rejections the whole layout
is drawn again, and after ``LAYOUT_ATTEMPTS`` layouts it is an error (subjects are never shrunk below
the requested scale range). A random paste order decides who is on top (later on top); every pixel
that no subject covers is the background colour (white, like Seg-Mix).

``edges`` (Seg-Mix training only, not offered by the Subject Composer node; exactly two subjects):
MuDI's collage layout. Subject 0 is left-aligned at ``x = U{1..edge_margin}``, subject 1
right-aligned with a right margin ``U{1..edge_margin}`` (``edge_margin`` default ``width // 4``, 256
at 1024), each at its own uniform y. The boxes may overlap; the random paste order decides who is
on top there.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from .masks import as_mask_batch, resize_plane

PLACEMENTS = ("random", "left to right")
EDGES = "edges"     # Seg-Mix training's two-subject layout (module docstring); not in the node's list
BACKGROUNDS = {"white": 1.0, "black": 0.0}
TRIES_PER_SUBJECT = 100
LAYOUT_ATTEMPTS = 20


@dataclass(frozen=True, eq=False)
class Subject:
    """One segmented subject: ``image`` ``[H, W, 3]`` float 0..1, ``mask`` ``[H, W]`` 0..1 (the
    subject is where it is above 0.5), ``name`` for messages and the layout."""
    image: torch.Tensor
    mask: torch.Tensor
    name: str = "subject"


def make_subject(image: torch.Tensor, mask: torch.Tensor, name: str = "subject") -> Subject:
    """Check and normalise one subject. ``image``: ``[H, W, C]`` or ``[1, H, W, C]`` with C = 1, 3 or
    4 (alpha ignored, grey repeated); ``mask``: any ComfyUI MASK of one plane with the image's size."""
    name = str(name or "subject")
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"{name}: image must be a torch tensor, got {type(image).__name__}")
    img = image.detach()
    if img.dim() == 4 and img.shape[0] == 1:
        img = img[0]
    if img.dim() != 3 or img.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{name}: expected one image [H,W,3] (or a batch of one), got shape {tuple(image.shape)}")
    if img.shape[0] < 1 or img.shape[1] < 1:
        raise ValueError(f"{name}: the image is empty, shape {tuple(image.shape)}")
    img = img.float().cpu()
    if not torch.isfinite(img).all():
        raise ValueError(f"{name}: the image contains NaN or infinite values")
    img = img[..., :3] if img.shape[-1] >= 3 else img.expand(-1, -1, 3)
    m = as_mask_batch(mask, f"{name}: mask").cpu()
    if m.shape[0] != 1:
        raise ValueError(f"{name}: expected one mask, got a batch of {m.shape[0]}")
    m = m[0]
    if tuple(m.shape) != tuple(img.shape[:2]):
        raise ValueError(f"{name}: the mask is {m.shape[1]}x{m.shape[0]} px but the image is "
                         f"{img.shape[1]}x{img.shape[0]} px (width x height); give the mask of this image "
                         f"(e.g. resize it with the image)")
    if not bool((m > 0.5).any()):
        raise ValueError(f"{name}: the mask is empty (no pixel above 0.5); draw or segment the subject")
    return Subject(image=img.clamp(0, 1).contiguous(), mask=m.clamp(0, 1).contiguous(), name=name)


@dataclass(frozen=True, eq=False)
class Composition:
    """A composed canvas. ``image`` ``[1, H, W, 3]``; ``masks`` ``[N, H, W]`` 0/1, each subject's
    visible pixels (occluded parts belong to the subject on top); ``boxes`` ``(x0, y0, x1, y1)`` of
    each pasted subject in pixels (x1, y1 exclusive); ``scales`` the resize factors, ``max_scales``
    their ``f_max``; ``order`` the subject indices in paste order (the last is on top)."""
    image: torch.Tensor
    masks: torch.Tensor
    boxes: tuple
    scales: tuple
    max_scales: tuple
    order: tuple
    names: tuple
    placement: str
    background: str
    seed: int
    extras: dict = field(default_factory=dict)

    def layout(self) -> dict:
        h, w = self.image.shape[1:3]
        return {
            "canvas": {"width": int(w), "height": int(h), "background": self.background},
            "placement": self.placement,
            "seed": int(self.seed),
            "order": [int(i) for i in self.order],
            "subjects": [{"name": self.names[i], "box": [int(v) for v in self.boxes[i]],
                          "scale": round(float(self.scales[i]), 6), "max_scale": round(float(self.max_scales[i]), 6),
                          "visible_pixels": int(self.masks[i].sum())}
                         for i in range(len(self.names))],
        }

    def layout_json(self) -> str:
        return json.dumps(self.layout())


def mask_bbox(mask: torch.Tensor) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)`` of ``mask > 0.5`` (x1, y1 exclusive)."""
    ys = torch.nonzero((mask > 0.5).any(1)).flatten()
    xs = torch.nonzero((mask > 0.5).any(0)).flatten()
    return int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1


def max_scale(w: int, h: int, width: int, height: int, n: int, margin: float) -> float:
    """Seg-Mix's ``f_max`` for a ``w x h`` crop: the largest scale fitting one of ``n`` columns."""
    return min((width / n - margin) / w, (height - margin) / h)


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g, dtype=torch.float64))


def _randint(g: torch.Generator, lo: int, hi: int) -> int:
    """Uniform integer in ``[lo, hi]`` (inclusive)."""
    return int(torch.randint(lo, hi + 1, (), generator=g)) if hi > lo else lo


def _overlap(ma: torch.Tensor, pa: tuple, mb: torch.Tensor, pb: tuple) -> int:
    """Pixels where two hard masks placed at ``(x, y)`` positions ``pa``/``pb`` are both on."""
    (xa, ya), (xb, yb) = pa, pb
    x0, y0 = max(xa, xb), max(ya, yb)
    x1, y1 = min(xa + ma.shape[1], xb + mb.shape[1]), min(ya + ma.shape[0], yb + mb.shape[0])
    if x1 <= x0 or y1 <= y0:
        return 0
    a = ma[y0 - ya:y1 - ya, x0 - xa:x1 - xa]
    b = mb[y0 - yb:y1 - yb, x0 - xb:x1 - xb]
    return int((a & b).sum())


def check_compose_args(n: int, width: int, height: int, placement: str, scale_min: float, scale_max: float,
                       max_overlap: float, background: str, margin: float) -> None:
    if n < 1:
        raise ValueError("subjects: no subjects to compose; connect at least one Subject node")
    if int(width) < 1 or int(height) < 1:
        raise ValueError(f"width/height: the canvas must be at least 1x1 px, got {width}x{height}")
    if placement not in PLACEMENTS and placement != EDGES:
        raise ValueError(f"placement: expected one of {', '.join(PLACEMENTS)}, got {placement!r}")
    if placement == EDGES and n != 2:
        raise ValueError(f"placement: '{EDGES}' composes exactly two subjects, got {n}")
    if background not in BACKGROUNDS:
        raise ValueError(f"background: expected one of {', '.join(BACKGROUNDS)}, got {background!r}")
    if not (0.0 < scale_min <= scale_max <= 1.0):
        raise ValueError(f"scale_min/scale_max: need 0 < scale_min <= scale_max <= 1 (fractions of the largest "
                         f"scale that fits), got {scale_min} and {scale_max}")
    if not (0.0 <= max_overlap <= 1.0):
        raise ValueError(f"max_overlap: must lie in 0..1 (fraction of the smaller subject), got {max_overlap}")
    if margin < 0:
        raise ValueError(f"margin: must not be negative, got {margin}")
    if width / n - margin < 1 or height - margin < 1:
        raise ValueError(f"width/height: a {width}x{height} canvas has no room for {n} subjects with a margin of "
                         f"{margin} px (each of the {n} columns is {width / n:.0f} px wide); use a larger canvas, "
                         f"fewer subjects or a smaller margin")


def compose_subjects(subjects, width: int = 1024, height: int = 1024, placement: str = "random",
                     scale_min: float = 0.75, scale_max: float = 1.0, max_overlap: float = 0.0,
                     background: str = "white", seed: int = 0, margin: float = 32,
                     edge_margin: int | None = None) -> Composition:
    """Paste ``subjects`` (a sequence of :class:`Subject`) on a ``width x height`` canvas (module
    docstring: geometry, placement, overlap). Deterministic for a given seed (a local generator;
    the global RNG is never touched). ``edge_margin``: only for the ``edges`` placement."""
    subjects = tuple(subjects or ())
    n = len(subjects)
    width, height = int(width), int(height)
    scale_min, scale_max, max_overlap = float(scale_min), float(scale_max), float(max_overlap)
    check_compose_args(n, width, height, placement, scale_min, scale_max, max_overlap, background, float(margin))
    for s in subjects:
        if not isinstance(s, Subject):
            raise TypeError(f"subjects: expected Subject objects (from the Subject node), got {type(s).__name__}")
    g = torch.Generator().manual_seed(int(seed) & 0xFFFFFFFFFFFFFFFF)
    col_w = width / n

    # scale every subject (the random draws happen in subject order, before any placement)
    pieces, scales, fmaxes = [], [], []
    for s in subjects:
        x0, y0, x1, y1 = mask_bbox(s.mask)
        w, h = x1 - x0, y1 - y0
        fmax = max_scale(w, h, width, height, n, float(margin))
        f = _uniform(g, scale_min * fmax, scale_max * fmax)
        # rounding never pushes the subject out of its column / the canvas
        nw = max(1, min(int(col_w - margin), round(w * f)))
        nh = max(1, min(int(height - margin), round(h * f)))
        img = resize_plane(s.image[y0:y1, x0:x1].movedim(-1, 0), nh, nw).movedim(0, -1).clamp(0, 1)
        msk = resize_plane(s.mask[y0:y1, x0:x1], nh, nw) > 0.5
        if not bool(msk.any()):
            raise ValueError(f"{s.name}: the subject vanishes at {nw}x{nh} px (its mask is too thin); use a larger "
                             f"canvas or fewer subjects")
        pieces.append((img, msk))
        scales.append(f)
        fmaxes.append(fmax)

    areas = [int(m.sum()) for _, m in pieces]
    positions = None
    for _attempt in range(LAYOUT_ATTEMPTS if placement == "random" else 1):
        positions = []
        for i, (img, msk) in enumerate(pieces):
            nh, nw = msk.shape
            if placement == EDGES:
                em = max(1, int(width // 4 if edge_margin is None else edge_margin))
                x = _randint(g, 1, em) if i == 0 else width - _randint(g, 1, em) - nw
                positions.append((max(0, min(x, width - nw)), _randint(g, 0, height - nh)))
                continue
            if placement == "left to right":
                c0 = round(i * col_w)
                c1 = round((i + 1) * col_w)
                positions.append((_randint(g, c0, max(c0, c1 - nw)), _randint(g, 0, height - nh)))
                continue
            for _try in range(TRIES_PER_SUBJECT):
                pos = (_randint(g, 0, width - nw), _randint(g, 0, height - nh))
                if all(_overlap(msk, pos, pieces[j][1], positions[j]) <= max_overlap * min(areas[i], areas[j])
                       for j in range(i)):
                    positions.append(pos)
                    break
            else:
                break
        if len(positions) == n:
            break
    if len(positions) != n:
        raise ValueError(f"placement: could not place {subjects[len(positions)].name} with at most "
                         f"{max_overlap:.0%} overlap after {LAYOUT_ATTEMPTS} layouts of {TRIES_PER_SUBJECT} tries; "
                         f"raise max_overlap, lower scale_max, use a larger canvas or 'left to right'")

    order = tuple(int(i) for i in torch.randperm(n, generator=g))
    fill = BACKGROUNDS[background]
    canvas = torch.full((height, width, 3), fill, dtype=torch.float32)
    owner = torch.full((height, width), -1, dtype=torch.long)
    for i in order:
        img, msk = pieces[i]
        x, y = positions[i]
        nh, nw = msk.shape
        region = canvas[y:y + nh, x:x + nw]
        region[msk] = img[msk].float()
        owner[y:y + nh, x:x + nw][msk] = i
    masks = torch.stack([(owner == i).float() for i in range(n)])
    boxes = tuple((x, y, x + m.shape[1], y + m.shape[0]) for (x, y), (_, m) in zip(positions, pieces))
    return Composition(image=canvas[None], masks=masks, boxes=boxes, scales=tuple(scales),
                       max_scales=tuple(fmaxes), order=order, names=tuple(s.name for s in subjects),
                       placement=placement, background=background, seed=int(seed))
