"""Seg-Mix: MuDI's data augmentation for multi-subject LoRA training (``docs/algorithms.md`` §5.2,
``agwmon/MuDI`` ``train_segmix_lora_sdxl.py``). Pure torch (+ numpy for seeding).

Each training draw takes an anchor image of one identifier. With probability ``segmix_prob`` (only
from ``segmix_start_step`` on) it is replaced by a two-subject collage: the anchor's segmented subject
and a random image of another identifier, each cropped to its mask's box and scaled by
``f ~ U(0.75 f_max, f_max)``, ``f_max = min((S/2 - m) / w, (S - m) / h)``, pasted on a white ``S x S``
canvas (the anchor on the left or the right by a coin, the left one at ``x = U{1..S/4}``, the right one
right-aligned with a margin ``U{1..S/4}``, each at a uniform y, a random paste order deciding who is
on top where they overlap), captioned ``"a photo of a {A} and a {B}, simple background."`` (the
anchor's phrase first), with the union of the visible subject masks as loss mask. Otherwise the plain
image with its own caption and an all-ones mask. The geometry is ``references/compose.py``'s
``compose_subjects`` with the ``edges`` placement (the same code as the Subject Composer node).

Differences from MuDI's code:

* the canvas is ``size`` (default 1024) and the margins scale with it (``m = 32 S/1024``, edge margin
  ``S/4``); MuDI always builds a 1024 canvas and resizes it to ``--resolution`` afterwards. At 1024
  the numbers are MuDI's.
* resizing: ``round(w f)`` pixels, area averaging when shrinking and bilinear when growing, the
  subject mask re-thresholded at 0.5 after resizing; MuDI truncates (``int(w f)``), uses PIL's
  default filter and thresholds the resized mask at 122/255. The mask box is that of ``mask > 0.5``
  (MuDI: ``> 128/255``) and keeps its last row/column (MuDI's crop drops the last row and column).
* MuDI switches Seg-Mix on when ``global_step == segmix_start_step`` (a run resumed past that step
  never switches it on); here it is on whenever ``step >= segmix_start_step``.
* plain images are resized (shorter side to ``size``) and centre-cropped to ``size x size`` (MuDI's
  ``--center_crop``; its default is a random crop).
* the anchor is drawn uniformly at random for every step (or given by ``index``); MuDI walks a
  shuffled data loader (each image once per epoch).
* all randomness comes from a generator seeded with ``(seed, step)`` (reproducible, independent of
  worker processes); MuDI uses the global ``random``/``numpy`` state and a flag on the dataset
  object to start Seg-Mix (§5.8 pitfall 9).
* not supported: ``relative_scale`` (fixed sizes) and prior-preservation collages (DCO replaces
  prior preservation in MuDI's recipe); the soft mask and the resize to the latent are the caller's
  (``losses.mask_to_latent``, ``losses.soft_mask``), as MuDI does them after the collage.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from ..references.compose import EDGES, Composition, check_compose_args, compose_subjects, make_subject
from ..references.masks import resize_plane

TEMPLATE = "a photo of a {} and a {}, simple background."
MUDI_CANVAS = 1024
MUDI_MARGIN = 32          # f_max margin at 1024
MUDI_EDGE_MARGIN = 256    # left/right margin U{1..256} at 1024


class SegMixSample(NamedTuple):
    image: torch.Tensor      # [size, size, 3] float 0..1
    mask: torch.Tensor       # [size, size] float: union of the subjects (Seg-Mix) or ones
    caption: str
    is_segmix: bool


@dataclass(frozen=True, eq=False)
class SegMixDraw:
    """One draw with its bookkeeping: ``anchor``/``partner`` are ``(identifier, image index)``
    (``partner`` None without Seg-Mix), ``anchor_left`` whether the anchor is the left subject,
    ``composition`` the collage (None without Seg-Mix)."""
    sample: SegMixSample
    anchor: tuple
    partner: tuple | None = None
    anchor_left: bool | None = None
    composition: Composition | None = None


def step_generator(seed: int, step: int, slot: int = 0) -> torch.Generator:
    """A CPU generator for one ``(seed, step, slot)`` (statistically independent streams; ``slot`` 0
    is the stream of ``(seed, step)`` alone)."""
    key = [int(seed) & 0xFFFFFFFFFFFFFFFF, int(step)] + ([int(slot)] if int(slot) else [])
    state = np.random.SeedSequence(key).generate_state(2, np.uint32)
    return torch.Generator().manual_seed((int(state[0]) << 31) ^ int(state[1]))


def cover_resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """``[H, W, C]`` -> ``[size, size, C]``: shorter side to ``size`` (aspect kept), centre crop."""
    h, w = image.shape[:2]
    s = size / min(h, w)
    nh, nw = max(size, round(h * s)), max(size, round(w * s))
    out = resize_plane(image.movedim(-1, 0), nh, nw).movedim(0, -1)
    y0, x0 = (nh - size) // 2, (nw - size) // 2
    return out[y0:y0 + size, x0:x0 + size].clamp(0, 1).contiguous()


class SegMixSampler:
    """Seg-Mix training samples (module docstring).

    ``subjects``: ``{identifier: [(image [H,W,3] 0..1, mask [H,W] 0..1, caption), ...]}``;
    ``phrases``: ``{identifier: placeholder phrase}`` (e.g. ``"olis monster toy"``), one per identifier.
    """

    def __init__(self, subjects: dict, phrases: dict, segmix_prob: float = 0.3, segmix_start_step: int = 0,
                 size: int = MUDI_CANVAS, scale_min: float = 0.75, scale_max: float = 1.0,
                 template: str = TEMPLATE, background: str = "white"):
        if not isinstance(subjects, dict) or not subjects:
            raise ValueError("subjects: give {identifier: [(image, mask, caption), ...]} with at least one identifier")
        self.segmix_prob = float(segmix_prob)
        if not 0.0 <= self.segmix_prob <= 1.0:
            raise ValueError(f"segmix_prob: must lie in 0..1, got {segmix_prob}")
        self.segmix_start_step = int(segmix_start_step)
        if self.segmix_start_step < 0:
            raise ValueError(f"segmix_start_step: must not be negative, got {segmix_start_step}")
        self.size = int(size)
        if self.size < 16:
            raise ValueError(f"size: the canvas must be at least 16 px, got {size}")
        self.scale_min, self.scale_max = float(scale_min), float(scale_max)
        self.template = str(template)
        if self.template.count("{}") != 2:
            raise ValueError(f"template: needs two '{{}}' places (subject A, subject B), got {template!r}")
        self.background = background
        self.margin = MUDI_MARGIN * self.size / MUDI_CANVAS
        self.edge_margin = max(1, round(MUDI_EDGE_MARGIN * self.size / MUDI_CANVAS))
        self.identifiers = [str(k) for k in subjects]
        missing = [k for k in self.identifiers if not str(phrases.get(k, "")).strip()]
        if missing:
            raise ValueError(f"phrases: no phrase for identifier(s) {', '.join(missing)} (e.g. 'olis monster toy')")
        self.phrases = {k: str(phrases[k]).strip() for k in self.identifiers}
        self.images, self.items = {}, []
        self._plain = {}        # (identifier, index) -> the resized plain image (computed once)
        for ident, entries in subjects.items():
            ident = str(ident)
            entries = list(entries or ())
            if not entries:
                raise ValueError(f"subjects: identifier {ident!r} has no images")
            rows = []
            for i, entry in enumerate(entries):
                if len(entry) != 3:
                    raise ValueError(f"subjects[{ident!r}][{i}]: expected (image, mask, caption)")
                image, mask, caption = entry
                subj = make_subject(image, mask, f"{ident} image {i}")
                rows.append((subj, str(caption)))
                self.items.append((ident, i))
            self.images[ident] = rows
        if self.segmix_prob > 0 and len(self.identifiers) < 2:
            raise ValueError("Seg-Mix composes two different subjects: give at least two identifiers, or set "
                             "segmix_prob to 0 to train a single subject")
        # check the canvas once (the same checks as the composer's)
        check_compose_args(2, self.size, self.size, EDGES, self.scale_min, self.scale_max, 0.0, background, self.margin)

    def __len__(self) -> int:
        return len(self.items)

    def caption(self, a: str, b: str) -> str:
        return self.template.format(self.phrases[a], self.phrases[b])

    def draw(self, seed: int, step: int, index: int | None = None, slot: int = 0) -> SegMixDraw:
        """The sample for ``(seed, step)`` with its bookkeeping. ``step`` is the optimizer step (it
        decides whether Seg-Mix is on yet); ``slot`` tells apart the samples of one step (the batch
        items of each gradient-accumulation micro-batch). ``index`` picks the anchor from
        :attr:`items` (modulo their number); None draws it uniformly."""
        g = step_generator(seed, step, slot)
        if index is None:
            index = int(torch.randint(len(self.items), (), generator=g))
        ident, i = self.items[int(index) % len(self.items)]
        subject, caption = self.images[ident][i]
        u = float(torch.rand((), generator=g, dtype=torch.float64))
        if not (int(step) >= self.segmix_start_step and u < self.segmix_prob):
            if (ident, i) not in self._plain:
                self._plain[(ident, i)] = cover_resize(subject.image, self.size)
            image = self._plain[(ident, i)].clone()
            mask = torch.ones(self.size, self.size)
            return SegMixDraw(SegMixSample(image, mask, caption, False), anchor=(ident, i))
        others = [k for k in self.identifiers if k != ident]
        other = others[int(torch.randint(len(others), (), generator=g))]
        j = int(torch.randint(len(self.images[other]), (), generator=g))
        anchor_left = bool(torch.rand((), generator=g) < 0.5)
        comp_seed = int(torch.randint(2 ** 62, (), generator=g))
        pair = [subject, self.images[other][j][0]]
        if not anchor_left:
            pair.reverse()
        comp = compose_subjects(pair, self.size, self.size, EDGES, self.scale_min, self.scale_max, 1.0,
                                self.background, comp_seed, self.margin, edge_margin=self.edge_margin)
        mask = comp.masks.amax(0)
        sample = SegMixSample(comp.image[0], mask, self.caption(ident, other), True)
        return SegMixDraw(sample, anchor=(ident, i), partner=(other, j), anchor_left=anchor_left, composition=comp)

    def sample(self, seed: int, step: int, index: int | None = None, slot: int = 0) -> SegMixSample:
        """``(image, mask, caption, is_segmix)`` for ``(seed, step)`` (see :meth:`draw`)."""
        return self.draw(seed, step, index, slot).sample
