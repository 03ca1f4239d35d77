"""The world's versions of the papers' metrics, from what ``scorer.Scorer.read`` finds, and the
statistics the effects are reported with.

* prompt fidelity (the world's CLIP-T): the share of the prompt's attributes present, an object
  counting for its attributes only when an object of its shape is found;
* reference fidelity (the world's CLIP-I / DINO): on the object of the subject's shape, the share of the
  reference subject's appearance (colour, pattern) it has, and the cosine of the scorer's embeddings;
* Detect-and-Compare: MuDI's formula (``metrics/detect_compare.py``) with the world's detector and
  embedder;
* placement: whether an object of the subject's shape has its centre inside the place it was given.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..metrics.detect_compare import detect_and_compare


def of_shape(found: list, shape: str):
    """The largest found object of ``shape`` (None when there is none)."""
    hits = [f for f in found if f.shape == shape]
    return max(hits, key=lambda f: f.area) if hits else None


def prompt_fidelity(found: list, plan) -> float:
    """Share of the prompted attributes present; ``plan`` as in ``data`` (colour or None, pattern or
    None, shape) per object."""
    total = present = 0
    for colour, pattern, shape in plan:
        named = [("shape", shape)] + [(a, v) for a, v in (("colour", colour), ("pattern", pattern)) if v]
        total += len(named)
        f = of_shape(found, shape)
        if f is not None:
            present += sum(f.label(a) == v for a, v in named)
    return present / total


def shape_and_colour(found: list, colour: str, shape: str) -> bool:
    """The quality bar's test: an object of this shape in this colour is present."""
    return any(f.shape == shape and f.colour == colour for f in found)


def appearance_match(found: list, shape: str, colour: str, pattern: str) -> float:
    """Reference fidelity by attributes: on the object of ``shape`` (0 when none), the share of the
    subject's (colour, pattern) it has."""
    f = of_shape(found, shape)
    if f is None:
        return 0.0
    return ((f.colour == colour) + (f.pattern == pattern)) / 2


def embedding_match(found: list, shape: str, reference: torch.Tensor) -> float:
    """Reference fidelity by embedding: cosine between the object of ``shape`` and the reference
    subject's embedding (0 when no object of that shape is found)."""
    f = of_shape(found, shape)
    if f is None:
        return 0.0
    return float(torch.nn.functional.cosine_similarity(f.embedding, reference, dim=0))


def has_thing(found: list, shape: str | None = None, appearance: tuple | None = None) -> bool:
    """Whether an object of this shape, or with this (colour, pattern), is present."""
    return any((shape is not None and f.shape == shape) or (appearance is not None and f.appearance == appearance)
               for f in found)


def detect_compare(found: list, references: list) -> float:
    """MuDI's D&C with the world's objects as detections and the scorer's embedding; ``references``:
    per subject, a [K, D] tensor of its reference embeddings."""
    if not found:
        return 0.0
    boxes = torch.stack([f.embedding for f in found])
    return float(detect_and_compare(boxes, references).score)


def placed(found: list, shape: str, region: np.ndarray) -> bool:
    """An object of ``shape`` has its centre inside ``region`` (bool [H, W])."""
    for f in found:
        if f.shape == shape:
            y, x = int(round(f.cy)), int(round(f.cx))
            if 0 <= y < region.shape[0] and 0 <= x < region.shape[1] and region[y, x]:
                return True
    return False


# ------------------------------------------------------------------------------------ statistics
def paired_test(with_: list, without: list) -> float:
    """Two-sided p-value of the paired differences (exact sign-flip permutation test for up to 20
    pairs, a normal approximation of the same statistic beyond): no distribution assumed."""
    d = np.asarray(with_, float) - np.asarray(without, float)
    d = d[d != 0]
    n = len(d)
    if n == 0:
        return 1.0
    obs = abs(d.sum())
    if n <= 20:
        signs = ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1) * 2 - 1
        return float(np.mean(np.abs(signs @ d) >= obs - 1e-12))
    z = obs / math.sqrt((d ** 2).sum())
    return float(math.erfc(z / math.sqrt(2)))


def summary(values: list) -> dict:
    """Mean, standard deviation and n of one condition's per-seed values."""
    v = np.asarray(values, float)
    return {"mean": round(float(v.mean()), 4), "sd": round(float(v.std(ddof=1)) if len(v) > 1 else 0.0, 4),
            "n": len(v)}
