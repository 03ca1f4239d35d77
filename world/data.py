"""The world's scenes: one to three objects whose shape, colour and surface pattern vary
independently, on a plain pale background, with a caption from a small grammar, a mask per object
and its attribute labels. Deterministic from a seed (numpy's PCG64). Pure numpy and PIL.

Patterns repeat every 8 pixels in image coordinates (one latent cell of an SD-style VAE), so the
latent has to say only "striped here", not where the stripes lie."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

SIZE = 128                                    # image side in pixels (a 16 x 16 latent)
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
COLOURS = {"red": (220, 40, 40), "orange": (240, 140, 20), "yellow": (232, 212, 30), "green": (40, 165, 60),
           "teal": (20, 165, 170), "blue": (40, 80, 220), "purple": (140, 60, 200), "pink": (240, 110, 180)}
PATTERNS = ("plain", "striped", "dotted", "checkered")
BACKGROUNDS = {"white": (242, 242, 238), "grey": (206, 206, 206), "beige": (232, 220, 196),
               "mist": (208, 222, 236)}
DARK = 0.45                                   # a pattern's second tone: the colour times this
SIZE_RANGE = (34, 50)                         # an object's side in pixels
MARGIN = 4                                    # pixels kept free at the image border and between objects
ATTRIBUTES = ("shape", "colour", "pattern")


@dataclass(frozen=True)
class Thing:
    """One object of a scene: its attributes, its centre and side in pixels."""
    shape: str
    colour: str
    pattern: str
    cx: float
    cy: float
    size: float

    @property
    def appearance(self) -> tuple[str, str]:
        return self.colour, self.pattern

    def label(self, attribute: str) -> str:
        return getattr(self, attribute)


@dataclass
class Scene:
    things: list
    background: str
    caption: str = ""
    words: list = field(default_factory=list)     # per thing: the attribute names its caption names


def held_out(colour: str, pattern: str, shape: str) -> bool:
    """Whether a combination of attributes never appears in the training scenes: one triple in 8,
    spread so every colour, pattern and shape keeps most of its combinations."""
    c, p, s = list(COLOURS).index(colour), PATTERNS.index(pattern), SHAPES.index(shape)
    return (c + 3 * p + 5 * s) % 8 == 0


HELD_OUT = [(c, p, s) for c in COLOURS for p in PATTERNS for s in SHAPES if held_out(c, p, s)]


def _polygon(shape: str) -> list[tuple[float, float]] | None:
    """The shape's outline in unit coordinates ([-1, 1] square); None for the circle."""
    if shape == "circle":
        return None
    if shape == "square":
        return [(-0.82, -0.82), (0.82, -0.82), (0.82, 0.82), (-0.82, 0.82)]
    if shape == "triangle":
        return [(0.0, -1.0), (1.0, 0.85), (-1.0, 0.85)]
    if shape == "diamond":
        return [(0.0, -1.0), (0.78, 0.0), (0.0, 1.0), (-0.78, 0.0)]
    if shape == "cross":
        a = 0.36
        return [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a),
                (-a, -a)]
    if shape == "star":
        pts = []
        for k in range(10):
            r = 1.0 if k % 2 == 0 else 0.45
            ang = -math.pi / 2 + k * math.pi / 5
            pts.append((r * math.cos(ang), r * math.sin(ang) + 0.1))
        return pts
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def shape_mask(thing: Thing, size: int = SIZE) -> np.ndarray:
    """The object's silhouette as a bool array [size, size]."""
    im = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(im)
    h = thing.size / 2
    poly = _polygon(thing.shape)
    if poly is None:
        draw.ellipse([thing.cx - h, thing.cy - h, thing.cx + h - 1, thing.cy + h - 1], fill=255)
    else:
        draw.polygon([(thing.cx + x * h, thing.cy + y * h) for x, y in poly], fill=255)
    return np.asarray(im) > 127


@functools.lru_cache(maxsize=32)
def pattern_mask(pattern: str, size: int = SIZE) -> np.ndarray:
    """Where a pattern takes its dark tone, in image coordinates (period 8 pixels)."""
    y, x = np.mgrid[0:size, 0:size]
    if pattern == "plain":
        return np.zeros((size, size), bool)
    if pattern == "striped":
        return (x + y) % 8 < 4
    if pattern == "dotted":
        return (x % 8 - 3.5) ** 2 + (y % 8 - 3.5) ** 2 < 2.3 ** 2
    if pattern == "checkered":
        return (x // 4 + y // 4) % 2 == 1
    raise ValueError(f"unknown pattern {pattern!r}; expected one of {PATTERNS}")


def render(scene: Scene, size: int = SIZE) -> tuple[np.ndarray, list]:
    """The scene as a uint8 image [size, size, 3] and one bool mask per object (later objects on top,
    though scenes from ``sample_scene`` never overlap)."""
    img = np.empty((size, size, 3), np.uint8)
    img[:] = BACKGROUNDS[scene.background]
    masks = []
    for t in scene.things:
        m = shape_mask(t, size)
        base = np.array(COLOURS[t.colour], np.float64)
        dark = pattern_mask(t.pattern, size)
        img[m & ~dark] = base.astype(np.uint8)
        img[m & dark] = (base * DARK).astype(np.uint8)
        masks.append(m)
    return img, masks


def _place(rng: np.random.Generator, sizes: list, size: int) -> list | None:
    centres: list = []
    for s in sizes:
        for _ in range(200):
            lo, hi = MARGIN + s / 2, size - MARGIN - s / 2
            c = (float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)))
            if all(max(abs(c[0] - o[0]), abs(c[1] - o[1])) > (s + so) / 2 + MARGIN
                   for o, so in zip(centres, sizes)):
                centres.append(c)
                break
        else:
            return None
    return centres


def random_attributes(rng: np.random.Generator, allow_held_out: bool = False) -> tuple[str, str, str]:
    while True:
        c = list(COLOURS)[rng.integers(len(COLOURS))]
        p = PATTERNS[rng.integers(len(PATTERNS))]
        s = SHAPES[rng.integers(len(SHAPES))]
        if allow_held_out or not held_out(c, p, s):
            return c, p, s


def sample_scene(rng: np.random.Generator, n_things: int | None = None, allow_held_out: bool = False,
                 size: int = SIZE, attributes: list | None = None) -> Scene:
    """A random scene: 1-3 objects (1: half, 2: a third, 3: a sixth) with distinct shapes, none of a
    held-out combination unless ``allow_held_out``; ``attributes`` fixes (colour, pattern, shape)
    per object."""
    if attributes is not None:
        n_things = len(attributes)
    elif n_things is None:
        n_things = int(rng.choice([1, 2, 3], p=[0.5, 1 / 3, 1 / 6]))
    while True:
        if attributes is None:
            attrs: list = []
            while len(attrs) < n_things:
                a = random_attributes(rng, allow_held_out)
                if all(a[2] != b[2] for b in attrs):
                    attrs.append(a)
        else:
            attrs = list(attributes)
        sizes = [float(rng.uniform(*SIZE_RANGE)) for _ in attrs]
        centres = _place(rng, sizes, size)
        if centres is not None:
            break
    things = [Thing(shape=s, colour=c, pattern=p, cx=x, cy=y, size=sz)
              for (c, p, s), (x, y), sz in zip(attrs, centres, sizes)]
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    return Scene(things=things, background=background)


def describe(thing: Thing, words: tuple) -> str:
    """"a red striped circle", "an orange star": the article, then the named attributes in the grammar's order."""
    parts = [thing.label(a) for a in ("colour", "pattern") if a in words] + [thing.shape]
    return ("an " if parts[0][0] in "aeiou" else "a ") + " ".join(parts)


def join_phrases(phrases: list) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def caption_scene(scene: Scene, rng: np.random.Generator, p_colour: float = 0.8, p_pattern: float = 0.6) -> Scene:
    """Give the scene a caption: each object's phrase names its shape always, its colour and pattern
    each by chance; objects in random order."""
    words = []
    for _ in scene.things:
        w = ["shape"]
        if rng.random() < p_colour:
            w.append("colour")
        if rng.random() < p_pattern:
            w.append("pattern")
        words.append(tuple(w))
    order = rng.permutation(len(scene.things))
    scene.words = words
    scene.caption = join_phrases([describe(scene.things[i], words[i]) for i in order])
    return scene


def training_scene(rng: np.random.Generator) -> Scene:
    return caption_scene(sample_scene(rng), rng)


def to_float(img: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [H, W, 3] in [0, 1] (ComfyUI's IMAGE layout, unbatched)."""
    return img.astype(np.float32) / 255.0


# ------------------------------------------------------------------ captions first: the training pool
# A plan is a tuple of (colour or None, pattern or None, shape) per object, in caption order; None is an
# attribute the caption leaves out, which each scene drawn for the plan fills at random.

def plan_caption(plan) -> str:
    return join_phrases([describe(Thing(shape=s, colour=c or "", pattern=p or "", cx=0, cy=0, size=0),
                                  tuple(["shape"] + (["colour"] if c else []) + (["pattern"] if p else [])))
                         for c, p, s in plan])


def _random_plan(rng: np.random.Generator, n: int, p_colour: float = 0.8, p_pattern: float = 0.6) -> tuple:
    shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))[:n]]
    plan = []
    for s in shapes:
        while True:
            c = list(COLOURS)[rng.integers(len(COLOURS))] if rng.random() < p_colour else None
            p = PATTERNS[rng.integers(len(PATTERNS))] if rng.random() < p_pattern else None
            if not (c and p and held_out(c, p, s)):
                break
        plan.append((c, p, s))
    return tuple(plan)


def caption_pool(seed: int, n_pairs: int = 1200, n_triples: int = 500) -> list:
    """The training captions as plans: every one-object plan (each attribute named or not) whose full
    description is not held out, every shape-only pair and triple, and random two- and three-object
    plans. Deterministic from ``seed``; the order is fixed."""
    rng = np.random.default_rng(seed)
    plans: list = []
    for s in SHAPES:
        for c in [None, *COLOURS]:
            for p in [None, *PATTERNS]:
                if not (c and p and held_out(c, p, s)):
                    plans.append(((c, p, s),))
    for a in SHAPES:
        for b in SHAPES:
            if a != b:
                plans.append(((None, None, a), (None, None, b)))
    seen = set(plans)
    for n, count in ((2, n_pairs), (3, n_triples)):
        added = 0
        while added < count:
            plan = _random_plan(rng, n)
            if plan not in seen:
                seen.add(plan)
                plans.append(plan)
                added += 1
    return plans


def realise(plan, rng: np.random.Generator) -> Scene:
    """A scene for a plan: the named attributes as named, the others at random (never a held-out
    combination), random sizes, places and background; the caption is the plan's."""
    attrs = []
    for c, p, s in plan:
        while True:
            cc = c or list(COLOURS)[rng.integers(len(COLOURS))]
            pp = p or PATTERNS[rng.integers(len(PATTERNS))]
            if not held_out(cc, pp, s):
                break
        attrs.append((cc, pp, s))
    scene = sample_scene(rng, attributes=attrs)
    scene.caption = plan_caption(plan)
    scene.words = [tuple(["shape"] + (["colour"] if c else []) + (["pattern"] if p else [])) for c, p, s in plan]
    return scene


def pick_plan(rng: np.random.Generator, pool: list) -> int:
    """A pool index: one object half the time, two a third, three a sixth."""
    n = int(rng.choice([1, 2, 3], p=[0.5, 1 / 3, 1 / 6]))
    idx = [i for i, plan in enumerate(pool) if len(plan) == n]
    return idx[rng.integers(len(idx))]
