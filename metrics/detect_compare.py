"""MuDI's Detect-and-Compare (D&C) score, everything after detection and embedding
(docs/metrics.md §3.2, docs/algorithms.md §5.5). Pure torch.

Given the embeddings of the detected boxes and of every subject's reference images:

* ``A[b, i] = mean_k cos(e(box_b), e(ref_{i,k}))``: boxes against subjects;
* ``G[i, j] = mean_{k,l} cos(e(ref_{i,k}), e(ref_{j,l}))``: the references alone (self-pairs included);
* a detection count other than the subject count scores 0;
* otherwise the boxes are matched greedily, subject by subject in order, each taking the unused box
  most similar to it, and ``D&C = 1 - ||P - G||_2`` with ``P`` the matched rows and the *spectral*
  norm (largest singular value), as MuDI's demo computes it (numpy ``ord=2``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``cos(a_i, b_j)`` for ``a`` ``[n, d]`` and ``b`` ``[m, d]`` (float64)."""
    a = F.normalize(a.double(), dim=-1)
    b = F.normalize(b.double(), dim=-1)
    return a @ b.T


def ground_truth_matrix(references: list) -> torch.Tensor:
    """``G[i, j]``: the mean cosine between subject i's and subject j's reference embeddings
    (``references[i]`` ``[K_i, d]``), self-pairs included on the diagonal."""
    n = len(references)
    g = torch.empty(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            g[i, j] = cosine_matrix(references[i], references[j]).mean()
    return g


def box_subject_matrix(boxes: torch.Tensor, references: list) -> torch.Tensor:
    """``A[b, i]``: the mean cosine between box b's embedding (``boxes`` ``[B, d]``) and subject i's
    references."""
    return torch.stack([cosine_matrix(boxes, r).mean(dim=1) for r in references], dim=1)


def greedy_match(a: torch.Tensor) -> list[int]:
    """For subjects i = 0..N-1 in order, the unused box with the largest ``A[., i]``."""
    used: list[int] = []
    for i in range(a.shape[1]):
        col = a[:, i].clone()
        if used:
            col[used] = -float("inf")
        used.append(int(torch.argmax(col)))
    return used


@dataclass
class DetectCompareResult:
    score: float
    boxes_vs_subjects: torch.Tensor      # A [B, N]
    ground_truth: torch.Tensor           # G [N, N]
    matched: list                        # box index per subject ([] when the count gate failed)
    reason: str = ""


def detect_and_compare(box_embeddings: torch.Tensor, reference_embeddings: list) -> DetectCompareResult:
    """The D&C score of one image from its box embeddings ``[B, d]`` (B may be 0) and the subjects'
    reference embeddings (``[K_i, d]`` each)."""
    if not reference_embeddings:
        raise ValueError("references: no subjects given")
    d = reference_embeddings[0].shape[-1]
    for i, r in enumerate(reference_embeddings):
        if r.dim() != 2 or r.shape[0] == 0 or r.shape[1] != d:
            raise ValueError(f"references: subject {i + 1} needs a [K, {d}] embedding matrix with K >= 1, got "
                             f"{tuple(r.shape)}")
    g = ground_truth_matrix(reference_embeddings)
    n = len(reference_embeddings)
    boxes = box_embeddings.reshape(-1, d) if box_embeddings.numel() else torch.zeros(0, d)
    a = box_subject_matrix(boxes, reference_embeddings) if boxes.shape[0] else torch.zeros(0, n, dtype=torch.float64)
    if boxes.shape[0] != n:
        return DetectCompareResult(0.0, a, g, [], f"{boxes.shape[0]} boxes detected for {n} subjects")
    match = greedy_match(a)
    p = a[match]
    score = 1.0 - float(torch.linalg.matrix_norm(p - g, ord=2))
    return DetectCompareResult(score, a, g, match)


def pad_to_square(image: torch.Tensor, fill: float = 1.0) -> torch.Tensor:
    """A crop ``[H, W, C]`` centred on a square canvas of side max(H, W) filled with ``fill`` (white),
    as D&C prepares each detected box for the embedder."""
    h, w, c = image.shape
    s = max(h, w)
    out = torch.full((s, s, c), fill, dtype=image.dtype)
    top, left = (s - h) // 2, (s - w) // 2
    out[top:top + h, left:left + w] = image
    return out


def crop_boxes(image: torch.Tensor, boxes) -> list:
    """The white-padded square crops ``[S, S, C]`` of ``boxes`` (x0, y0, x1, y1 in pixels) from
    ``image`` ``[H, W, C]``, cut as MuDI's ``crop_and_pad_image`` cuts them with PIL's ``Image.crop``:
    the box rounded to whole pixels and kept whole, the part of it outside the picture black (a box
    that runs past the edge keeps its size and its subject stays off-centre, as in MuDI's scores),
    then centred on a white square. A box of zero size (where PIL's crop would give an empty image)
    becomes one pixel. Coordinates more than an image size outside the picture are clamped there
    (no detector gives them; it keeps a damaged box from asking for a huge crop)."""
    import math

    h, w, c = image.shape
    out = []
    for box in boxes:
        if len(box) != 4 or not all(math.isfinite(float(v)) for v in box):
            raise ValueError(f"boxes: expected finite (x0, y0, x1, y1), got {tuple(box)}")
        x0, y0, x1, y1 = (int(round(float(v))) for v in box)        # PIL rounds the box the same way
        x0, x1 = (min(max(v, -w), 2 * w) for v in (x0, x1))
        y0, y1 = (min(max(v, -h), 2 * h) for v in (y0, y1))
        x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)
        crop = torch.zeros((y1 - y0, x1 - x0, c), dtype=image.dtype)
        ix0, ix1, iy0, iy1 = max(x0, 0), min(x1, w), max(y0, 0), min(y1, h)
        if ix1 > ix0 and iy1 > iy0:
            crop[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0] = image[iy0:iy1, ix0:ix1]
        out.append(pad_to_square(crop))
    return out


def image_to_pil(image: torch.Tensor):
    """A ComfyUI image ``[H, W, 3]`` or ``[1, H, W, 3]`` (float, 0..1) as a uint8 RGB PIL image, rounded
    to the nearest level as diffusers' ``numpy_to_pil`` saves the images MuDI scores."""
    import numpy as np
    from PIL import Image

    if not isinstance(image, torch.Tensor):
        raise ValueError(f"image: expected a torch tensor [H, W, 3], got {type(image).__name__}")
    if image.dim() == 4 and image.shape[0] == 1:
        image = image[0]
    if image.dim() != 3 or image.shape[-1] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image: expected one RGB image [H, W, 3] or [1, H, W, 3], got {tuple(image.shape)}")
    if not image.is_floating_point():
        raise ValueError(f"image: expected float values in 0..1, got {image.dtype}")
    image = image.detach().float()
    if not bool(torch.isfinite(image).all()):
        raise ValueError("image: contains NaN or infinite values")
    pixels = (image.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(pixels))


@dataclass
class Detection:
    """One detector box: ``box`` (x0, y0, x1, y1) in pixels of the scored image, the detector's
    ``score`` and the index of the text query it answers (``label``)."""
    box: tuple
    score: float
    label: int


def score_image(image: torch.Tensor, queries: list, reference_embeddings: list, detector, embedder,
                threshold: float = 0.4) -> tuple:
    """D&C of one generated image ``[H, W, 3]`` (0..1): every box ``detector.detect(image, queries,
    threshold)`` returns (no NMS, duplicates count), cropped and white-padded to a square, embedded with
    ``embedder.embed(crops)`` (``[B, d]``), then ``detect_and_compare`` against the subjects' reference
    embeddings (``reference_embeddings[i]`` ``[K_i, d]``, in the order of ``queries``). Returns
    ``(DetectCompareResult, detections)``."""
    if len(queries) != len(reference_embeddings):
        raise ValueError(f"subjects: {len(queries)} names for {len(reference_embeddings)} reference sets")
    detections = list(detector.detect(image, list(queries), threshold))
    if detections:
        boxes = embedder.embed(crop_boxes(image, [d.box for d in detections]))
    else:
        boxes = torch.zeros(0, reference_embeddings[0].shape[-1])
    return detect_and_compare(boxes, reference_embeddings), detections


PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60))


def annotate(image: torch.Tensor, detections: list, names: list, matched: list, caption: str = "") -> torch.Tensor:
    """``image`` ``[H, W, 3]`` with every detected box drawn in its query's colour and labelled with the
    query name and detector score; boxes the greedy match assigned to a subject are drawn thick and
    labelled with that subject; ``caption`` (e.g. the score) is written in the top-left corner."""
    import numpy as np
    from PIL import ImageDraw, ImageFont

    pil = image_to_pil(image[..., :3])
    draw = ImageDraw.Draw(pil)
    w, h = pil.size
    thick = max(2, round(min(h, w) / 160))
    try:
        font = ImageFont.load_default(size=max(10, min(h, w) // 40))
    except TypeError:                                   # Pillow < 10.1: the fixed bitmap font
        font = ImageFont.load_default()
    line = font.getbbox("Ag")[3] + 2
    owner = {box: subject for subject, box in enumerate(matched)}
    for b, d in enumerate(detections):
        colour = PALETTE[d.label % len(PALETTE)]
        x0, y0, x1, y1 = (float(v) for v in d.box)
        width = 2 * thick if b in owner else thick
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=width)
        label = f"{names[d.label]} {d.score:.2f}"
        if b in owner:
            label += f" -> {names[owner[b]]}"
        tx, ty = x0 + width, (y0 - line if y0 >= line else y0 + width)
        draw.rectangle(draw.textbbox((tx, ty), label, font=font), fill=colour)
        draw.text((tx, ty), label, fill=(255, 255, 255), font=font)
    if caption:
        draw.rectangle(draw.textbbox((4, 4), caption, font=font), fill=(0, 0, 0))
        draw.text((4, 4), caption, fill=(255, 255, 255), font=font)
    return torch.from_numpy(np.asarray(pil).copy()).float() / 255.0
