"""The world's scorer: it finds the objects in an image and reads each one's shape, colour, pattern
and place. Finding is by colour against the background (the border's median colour) and connected
components; reading is a small CNN trained on the world's own scenes, raw and passed through the
world's VAE so that it reads decoded images as well as rendered ones. Its penultimate features are the
world's image embedding (the world's DINO: appearance and shape in one vector)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import data

WINDOW = 56                   # the crop around an object's centre the classifier reads (objects <= 50 px)
MIN_AREA = 150                # smaller components are noise, not objects
THRESHOLD = 0.16              # Euclidean RGB distance (0-1 scale) from the background that marks an object


@dataclass
class Found:
    shape: str
    colour: str
    pattern: str
    cx: float                 # centre in pixels
    cy: float
    area: int
    mask: np.ndarray          # bool [H, W]
    embedding: torch.Tensor   # [D]
    confidence: float         # the product of the three top probabilities

    def label(self, attribute: str) -> str:
        return getattr(self, attribute)

    @property
    def appearance(self) -> tuple[str, str]:
        return self.colour, self.pattern


def background_colour(img: np.ndarray) -> np.ndarray:
    """The median colour of a 3-pixel frame (float [3], 0-1)."""
    frame = np.concatenate([img[:3].reshape(-1, 3), img[-3:].reshape(-1, 3), img[:, :3].reshape(-1, 3),
                            img[:, -3:].reshape(-1, 3)])
    return np.median(frame, axis=0)


def components(fg: np.ndarray) -> np.ndarray:
    """4-connected component labels of a bool mask (0 = background, 1.. = components), by repeated
    min-propagation of pixel indices."""
    h, w = fg.shape
    big = h * w + 1
    lab = torch.where(torch.from_numpy(fg), torch.arange(1, h * w + 1).view(h, w), torch.full((h, w), big))
    mask = torch.from_numpy(fg)
    while True:
        p = F.pad(lab[None, None].float(), (1, 1, 1, 1), value=float(big))[0, 0]
        nb = torch.stack([p[1:-1, 1:-1], p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]]).amin(0).long()
        new = torch.where(mask, nb, lab)
        if torch.equal(new, lab):
            break
        lab = new
    out = np.zeros((h, w), np.int64)
    for i, v in enumerate(torch.unique(lab[mask]).tolist()):
        out[(lab == v).numpy()] = i + 1
    return out


def segment(img: np.ndarray) -> list[np.ndarray]:
    """The objects' masks in a float image [H, W, 3] in [0, 1], largest first."""
    bg = background_colour(img)
    fg = np.sqrt(((img - bg) ** 2).sum(-1)) > THRESHOLD
    lab = components(fg)
    masks = [lab == i for i in range(1, lab.max() + 1)]
    masks = [m for m in masks if m.sum() >= MIN_AREA]
    return sorted(masks, key=lambda m: -int(m.sum()))


def window(img: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, float, float]:
    """The classifier's input for one object: a WINDOW-pixel crop centred on the mask's centroid, RGB
    with everything outside the mask set to the background colour, plus the mask [4, W, W]."""
    ys, xs = np.nonzero(mask)
    cy, cx = float(ys.mean()), float(xs.mean())
    bg = background_colour(img)
    clean = np.where(mask[..., None], img, bg)
    h = WINDOW // 2
    pad = np.pad(np.concatenate([clean, mask[..., None].astype(np.float32)], -1), ((h, h), (h, h), (0, 0)))
    y0, x0 = int(round(cy)), int(round(cx))
    crop = pad[y0:y0 + WINDOW, x0:x0 + WINDOW]
    return torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1).float(), cx, cy


class Reader(torch.nn.Module):
    """Three heads (shape, colour, pattern) on a small CNN; ``features`` is the embedding."""

    def __init__(self, width: int = 32, dim: int = 64):
        super().__init__()
        w = width
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(4, w, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(w, w, 3, padding=1), torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(w, 2 * w, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(2 * w, 2 * w, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(2 * w, 2 * w, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(), torch.nn.Linear(2 * w, dim), torch.nn.ReLU())
        self.shape = torch.nn.Linear(dim, len(data.SHAPES))
        self.colour = torch.nn.Linear(dim, len(data.COLOURS))
        self.pattern = torch.nn.Linear(dim, len(data.PATTERNS))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor):
        f = self.features(x)
        return self.shape(f), self.colour(f), self.pattern(f)


NAMES = {"shape": list(data.SHAPES), "colour": list(data.COLOURS), "pattern": list(data.PATTERNS)}


class Scorer:
    """Finds and reads objects with a trained ``Reader``."""

    def __init__(self, reader: Reader):
        self.reader = reader.eval()

    @classmethod
    def from_state(cls, sd: dict) -> Scorer:
        r = Reader()
        r.load_state_dict({k: v.float() for k, v in sd.items()})
        return cls(r)

    @torch.no_grad()
    def read(self, img: np.ndarray) -> list[Found]:
        """The objects in one image (float [H, W, 3] in [0, 1], or uint8), largest first."""
        if img.dtype == np.uint8:
            img = data.to_float(img)
        masks = segment(img)
        if not masks:
            return []
        wins = [window(img, m) for m in masks]
        x = torch.stack([w[0] for w in wins])
        f = self.reader.features(x)
        probs = [F.softmax(head(f), -1) for head in (self.reader.shape, self.reader.colour, self.reader.pattern)]
        out = []
        for i, (m, (_, cx, cy)) in enumerate(zip(masks, wins)):
            top = [int(p[i].argmax()) for p in probs]
            conf = float(np.prod([float(p[i, t]) for p, t in zip(probs, top)]))
            out.append(Found(shape=NAMES["shape"][top[0]], colour=NAMES["colour"][top[1]],
                             pattern=NAMES["pattern"][top[2]], cx=cx, cy=cy, area=int(m.sum()), mask=m,
                             embedding=f[i].clone(), confidence=conf))
        return out

    @torch.no_grad()
    def embed_thing(self, img: np.ndarray, mask: np.ndarray) -> torch.Tensor:
        """The embedding of the object under ``mask`` (a reference subject)."""
        if img.dtype == np.uint8:
            img = data.to_float(img)
        return self.reader.features(window(img, mask)[0][None])[0]


def match(found: list, mask: np.ndarray) -> int | None:
    """The found object overlapping ``mask`` most (None when none overlaps)."""
    best, idx = 0, None
    for i, f in enumerate(found):
        o = int((f.mask & mask).sum())
        if o > best:
            best, idx = o, i
    return idx
