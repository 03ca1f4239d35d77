"""Face attribute masks for FreeCure: a binary mask of the facial attributes named in a prompt (hair,
eyes, glasses, ...) on the foundation image, from one of two providers.

* **mediapipe** (default): MediaPipe Face Mesh (legacy ``mp.solutions.face_mesh``, 478 landmarks with
  the refined eyes, irises and lips). Its models are inside the ``mediapipe==0.10.21`` wheel, so it
  works offline with no model file. The attribute regions are polygons through the landmarks of
  mediapipe's own connection sets (``mp.solutions.face_mesh_connections``), rasterised at the image
  size. Landmarks cover the face only: hair, hat, glasses, ears, earrings, neck, necklace and clothes
  cannot be drawn from them.
* **bisenet**: the 19-class CelebAMask-HQ face parser used by FreeCure (BiSeNet with a ResNet-18
  context path, ``zllrunning/face-parsing.PyTorch``, file ``79999_iter.pth``). The network is written
  here with the parameter names of the official file, which loads exactly. Pre-processing as FreeCure:
  the image resized to 512x512 (bilinear, antialiased when shrinking, like PIL's), ImageNet mean/std,
  argmax of the main head's logits; the labels are resized back to the image size (nearest).

Pure torch / numpy / PIL. ``mediapipe`` is imported inside the functions that need it, with an
error that says what to install; nothing here imports ComfyUI.
"""
from __future__ import annotations

import importlib
import logging
import math
import os
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..files.checkpoints import flat_state_dict, read_checkpoint

log = logging.getLogger(__name__)

PROVIDERS = ("mediapipe", "bisenet")
FACES = ("largest", "all")
IF_NO_FACE = ("error", "empty mask")
FROM_PROMPT = "from prompt"

# ---------------------------------------------------------------------------------------------
# Attributes
# ---------------------------------------------------------------------------------------------

# CelebAMask-HQ's label order (face-parsing.PyTorch, prepropess_data.py: 0 is the background)
BISENET_LABELS = ("background", "skin", "l_brow", "r_brow", "l_eye", "r_eye", "eye_g", "l_ear", "r_ear",
                  "ear_r", "nose", "mouth", "u_lip", "l_lip", "neck", "neck_l", "cloth", "hair", "hat")
# labels that make up a face: skin, brows, eyes, glasses, nose, mouth, lips
FACE_LABELS = (1, 2, 3, 4, 5, 6, 10, 11, 12, 13)

BISENET_ATTRIBUTES: dict[str, tuple[int, ...]] = {
    "face": FACE_LABELS,
    "skin": (1,),
    "brows": (2, 3),
    "eyes": (4, 5),
    "glasses": (6,),
    "ears": (7, 8),
    "earrings": (9,),
    "nose": (10,),
    "mouth": (11, 12, 13),      # the lips and what lies between them
    "lips": (12, 13),
    "neck": (14,),
    "necklace": (15,),
    "cloth": (16,),
    "hair": (17,),
    "hat": (18,),
}
MEDIAPIPE_ATTRIBUTES = ("face", "skin", "eyes", "left eye", "right eye", "irises", "brows", "nose", "mouth",
                        "lips")
ATTRIBUTES = tuple(dict.fromkeys([*MEDIAPIPE_ATTRIBUTES, *BISENET_ATTRIBUTES]))
SUPPORTED = {"mediapipe": MEDIAPIPE_ATTRIBUTES, "bisenet": tuple(BISENET_ATTRIBUTES)}

# other spellings accepted in the attributes list
ALIASES = {
    "eye": "eyes", "brow": "brows", "eyebrow": "brows", "eyebrows": "brows", "lip": "lips",
    "ear": "ears", "earring": "earrings", "eyeglasses": "glasses", "spectacles": "glasses",
    "sunglasses": "glasses", "iris": "irises", "pupils": "irises", "clothes": "cloth", "clothing": "cloth",
    "hats": "hat", "left eyes": "left eye", "right eyes": "right eye", "face oval": "face",
}

# words of a prompt that name an attribute (whole words, case-insensitive; "t-shirt" is "t" + "shirt").
# Unlike FreeCure's substring test, "eyeglasses" names the glasses only, not the eyes.
PROMPT_WORDS: dict[str, tuple[str, ...]] = {
    "hair": ("hair", "hairs", "haired", "hairstyle", "hairstyles", "haircut", "hairdo", "ponytail", "ponytails",
             "braid", "braids", "braided", "curls", "curly"),
    "eyes": ("eye", "eyes", "eyed"),
    "glasses": ("glasses", "eyeglasses", "spectacles", "sunglasses"),
    "brows": ("brow", "brows", "eyebrow", "eyebrows"),
    "lips": ("lip", "lips", "lipstick"),
    "mouth": ("mouth", "teeth"),
    "nose": ("nose",),
    "ears": ("ear", "ears"),
    "earrings": ("earring", "earrings"),
    "hat": ("hat", "hats", "cap", "beanie", "beret"),
    "neck": ("neck",),
    "necklace": ("necklace", "necklaces"),
    "cloth": ("clothes", "clothing", "shirt", "tshirt", "jacket", "coat", "sweater", "hoodie", "dress", "suit",
              "blouse", "uniform"),
    "skin": ("skin", "skinned"),
}
_WORD_TO_ATTRIBUTE = {w: a for a, words in PROMPT_WORDS.items() for w in words}


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


def attributes_from_prompt(prompt: str) -> tuple[str, ...]:
    """The attributes a prompt names, like FreeCure's keyword test (``"hair"``, ``"eye"``,
    ``"glasses"``) with more words (``PROMPT_WORDS``): brows, lips, mouth, nose, ears, earrings, hat,
    neck, necklace, clothes and skin. Whole words are matched, so "eyeglasses" gives glasses (not
    the eyes) and "necklace" is not the neck. In ``ATTRIBUTES`` order, each once."""
    found = {_WORD_TO_ATTRIBUTE[w] for w in re.findall(r"[a-z]+", (prompt or "").lower()) if w in _WORD_TO_ATTRIBUTE}
    return tuple(a for a in ATTRIBUTES if a in found)


def parse_attributes(text: str, prompt: str = "") -> tuple[str, ...]:
    """The attribute list of the node: names separated by commas (``"hair, eyes"``; other spellings
    of ``ALIASES`` accepted), where ``from prompt`` stands for the attributes the prompt names.
    Errors name the input and list the known names."""
    names = [n for n in (_norm(t) for t in re.split(r"[,;\n]", text or "")) if n]
    if not names:
        raise ValueError(f"attributes: empty; name the face attributes to mask (e.g. 'hair, eyes'), or write "
                         f"'{FROM_PROMPT}'. Known: {', '.join(ATTRIBUTES)}")
    out: list[str] = []
    for n in names:
        if n == FROM_PROMPT:
            if not (prompt or "").strip():
                raise ValueError(f"prompt: attributes says '{FROM_PROMPT}' but the prompt is empty; connect or type "
                                 f"the prompt whose attribute words should be masked")
            found = attributes_from_prompt(prompt)
            if not found:
                raise ValueError(f"prompt: no face attribute word in {prompt[:120]!r} (words recognised: hair, eye(s), "
                                 f"glasses, eyebrows, lips, mouth, nose, ears, earrings, hat, neck, necklace, "
                                 f"clothes, skin, ...); name the attributes in 'attributes' instead")
            out.extend(found)
            continue
        n = ALIASES.get(n, n)
        if n not in ATTRIBUTES:
            raise ValueError(f"attributes: unknown {n!r}; known: {', '.join(ATTRIBUTES)} (or '{FROM_PROMPT}')")
        out.append(n)
    return tuple(dict.fromkeys(out))


def check_supported(attributes, provider: str) -> None:
    """An error naming the provider when it cannot draw one of ``attributes``."""
    if provider not in SUPPORTED:
        raise ValueError(f"provider: unknown {provider!r}; use one of {', '.join(PROVIDERS)}")
    bad = [a for a in attributes if a not in SUPPORTED[provider]]
    if not bad:
        return
    if provider == "mediapipe":
        hint = ("MediaPipe finds face landmarks only, so it cannot mask " + ", ".join(bad)
                + ". Use the bisenet provider (a face parser from Face Parsing Loader (BiSeNet), file 79999_iter.pth), "
                  f"or ask for what mediapipe can do: {', '.join(MEDIAPIPE_ATTRIBUTES)}")
    else:
        hint = (f"BiSeNet's 19 classes have no {', '.join(bad)} (the two eyes are one attribute, 'eyes', and "
                f"there is no iris class); it can do: {', '.join(BISENET_ATTRIBUTES)}. The mediapipe provider "
                f"draws {', '.join(a for a in bad if a in MEDIAPIPE_ATTRIBUTES) or 'none of them'}")
    raise ValueError(f"attributes: provider {provider!r} cannot mask {', '.join(map(repr, bad))}. {hint}")


def bisenet_labels_for(attributes) -> tuple[int, ...]:
    return tuple(sorted({lab for a in attributes for lab in BISENET_ATTRIBUTES[a]}))


# ---------------------------------------------------------------------------------------------
# Mask helpers
# ---------------------------------------------------------------------------------------------

def grow_mask(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """Grow a 0/1 mask ``[B, H, W]`` by ``pixels`` in every direction (negative: shrink). Each pixel
    step is a 3x3 neighbourhood, alternately the square and the cross, so the grown outline is an
    octagon (close to a circle, no diagonal bias)."""
    pixels = int(pixels)
    if pixels == 0 or mask.numel() == 0:
        return mask
    x = mask[:, None].float()
    if pixels < 0:
        x = 1.0 - x
    for i in range(abs(pixels)):
        if i % 2 == 0:
            x = F.max_pool2d(x, 3, stride=1, padding=1)
        else:   # cross: the maximum of the vertical and the horizontal 3-neighbourhoods
            x = torch.maximum(F.max_pool2d(x, (3, 1), stride=1, padding=(1, 0)),
                              F.max_pool2d(x, (1, 3), stride=1, padding=(0, 1)))
    if pixels < 0:
        x = 1.0 - x
    return x[:, 0].to(mask.dtype)


def overlay(image: torch.Tensor, mask: torch.Tensor, color=(1.0, 0.15, 0.1), alpha: float = 0.55) -> torch.Tensor:
    """The image ``[B, H, W, C]`` with the mask ``[B, H, W]`` tinted in ``color`` (a preview)."""
    rgb = image[..., :3].float()
    if rgb.shape[-1] == 1:
        rgb = rgb.expand(*rgb.shape[:-1], 3)
    tint = torch.tensor(color, dtype=rgb.dtype, device=rgb.device)
    a = (mask.to(rgb.device, rgb.dtype) * alpha)[..., None]
    return rgb * (1 - a) + tint * a


def to_uint8_rgb(image: torch.Tensor) -> np.ndarray:
    """One ComfyUI image ``[H, W, C]`` (0..1) as a contiguous uint8 RGB array."""
    x = image.detach().float().cpu()
    if x.shape[-1] == 1:
        x = x.expand(*x.shape[:-1], 3)
    x = (x[..., :3].clamp(0, 1) * 255.0).round().to(torch.uint8)
    return np.ascontiguousarray(x.numpy())


def check_image(image) -> tuple[int, int, int]:
    if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[-1] not in (1, 3, 4) \
            or min(image.shape[:3]) < 1:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"image: expected a ComfyUI IMAGE [B,H,W,3], got {shape}")
    return int(image.shape[0]), int(image.shape[1]), int(image.shape[2])


class NoFaceError(ValueError):
    """No face was found in an image (and the node was asked to stop)."""


def no_face_message(index: int, count: int, provider: str) -> str:
    which = f"image {index + 1} of {count}" if count > 1 else "the image"
    how = ("MediaPipe's face detector found none with confidence >= 0.5, or Face Mesh could not place its "
           "landmarks" if provider == "mediapipe" else
           f"BiSeNet parsed less than {MIN_FACE_FRACTION:.1%} of it as face (skin, brows, eyes, nose, mouth)")
    return (f"image: no face was found in {which} ({how}). Set if_no_face to 'empty mask' to get an empty mask "
            f"for such images instead of this error")


# ---------------------------------------------------------------------------------------------
# MediaPipe Face Mesh
# ---------------------------------------------------------------------------------------------

MEDIAPIPE_VERSION = "0.10.21"      # the last release whose wheel ships the models and mp.solutions
DETECTION_CONFIDENCE = 0.5         # of the full-range face detector
CROP_SCALE = 2.0                   # Face Mesh runs on a square this many face-box sizes wide around each face
MEDIAPIPE_DEPS = 'absl-py attrs flatbuffers "protobuf>=4.25.3,<5" matplotlib opencv-python-headless'


def mediapipe_install_hint() -> str:
    exe = sys.executable or "python"
    return (f"install it into ComfyUI's Python environment without its dependency pins (they would pull jax and "
            f"downgrade numpy): `\"{exe}\" -m pip install --no-deps mediapipe=={MEDIAPIPE_VERSION}` and "
            f"`\"{exe}\" -m pip install {MEDIAPIPE_DEPS}` (ComfyUI portable: python_embeded\\python.exe -m pip "
            f"...), then restart ComfyUI")


def import_solutions():
    """mediapipe's legacy ``solutions`` module (face detection, face mesh and its connection sets),
    or an ImportError that says what to install."""
    try:
        import mediapipe as mp
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] == "mediapipe":
            raise ImportError("The mediapipe provider needs the mediapipe package, which is not installed; "
                              + mediapipe_install_hint()) from None
        raise ImportError(f"mediapipe is installed but one of its dependencies is missing ({exc}); "
                          + mediapipe_install_hint()) from exc
    except Exception as exc:  # noqa: BLE001 - e.g. a protobuf or numpy it was not built for
        raise ImportError(f"mediapipe is installed but could not be imported ({type(exc).__name__}: {exc}); "
                          + mediapipe_install_hint()) from exc
    version = getattr(mp, "__version__", "?")
    try:
        for name in ("face_detection", "face_mesh", "face_mesh_connections"):
            importlib.import_module(f"mediapipe.python.solutions.{name}")
        from mediapipe.python import solutions
    except Exception as exc:  # noqa: BLE001
        raise ImportError(f"mediapipe {version} has no legacy solutions (mp.solutions.face_mesh; releases after "
                          f"{MEDIAPIPE_VERSION} ship neither them nor their models): {type(exc).__name__}: {exc}. "
                          + mediapipe_install_hint()) from None
    return solutions


def _protobuf_version() -> str:
    try:
        import google.protobuf
        return google.protobuf.__version__
    except Exception:  # noqa: BLE001
        return "not installed"


class FaceLandmarker:
    """MediaPipe's full-range face detector, then Face Mesh (478 landmarks, refined eyes, irises and
    lips) on a square crop around each detected face. The full-range detector finds small faces in
    wide images and, at its default confidence, none in the pack's face-free photos (the short-range
    detector inside Face Mesh takes dice pips and a dog for faces); the crop gives Face Mesh the face
    at a size it handles well. Close it (or use it in a ``with``) when done."""

    def __init__(self, confidence: float = DETECTION_CONFIDENCE):
        sol = import_solutions()
        self.detector = self.mesh = None
        try:
            self.detector = sol.face_detection.FaceDetection(model_selection=1, min_detection_confidence=confidence)
            self.mesh = sol.face_mesh.FaceMesh(static_image_mode=True, refine_landmarks=True, max_num_faces=2,
                                               min_detection_confidence=0.3)
        except Exception as exc:  # noqa: BLE001 - graph set-up fails like this with a protobuf it does not support
            self.close()
            raise RuntimeError(f"mediapipe could not start ({type(exc).__name__}: "
                               f"{(str(exc).splitlines() or [''])[0][:160]}). mediapipe "
                               f"{MEDIAPIPE_VERSION} needs protobuf 4.x (installed: {_protobuf_version()}); "
                               f"`python -m pip install \"protobuf>=4.25.3,<5\"` in ComfyUI's Python environment") from exc

    def close(self):
        for solution in (self.detector, self.mesh):
            if solution is not None:
                solution.close()
        self.detector = self.mesh = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def boxes(self, image_rgb: np.ndarray) -> list[tuple[float, float, float, float, float]]:
        """Detected faces as ``(x0, y0, x1, y1, score)`` in pixels, the largest first."""
        H, W = image_rgb.shape[:2]
        out = []
        for d in self.detector.process(image_rgb).detections or ():
            b = d.location_data.relative_bounding_box
            out.append((b.xmin * W, b.ymin * H, (b.xmin + b.width) * W, (b.ymin + b.height) * H, float(d.score[0])))
        return sorted(out, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]), reverse=True)

    def _mesh(self, image_rgb: np.ndarray) -> list[np.ndarray]:
        H, W = image_rgb.shape[:2]
        faces = []
        for face in self.mesh.process(np.ascontiguousarray(image_rgb)).multi_face_landmarks or ():
            pts = np.array([(p.x, p.y) for p in face.landmark], dtype=np.float64)
            faces.append(pts * np.array([W, H], dtype=np.float64))
        return faces

    def landmarks(self, image_rgb: np.ndarray, box) -> np.ndarray | None:
        """The ``[478, 2]`` landmarks (pixels of the image) of the face in ``box``, or None when Face
        Mesh finds no face there. Of two faces in the crop, the one centred nearer the box is kept."""
        H, W = image_rgb.shape[:2]
        x0, y0, x1, y1 = box[:4]
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        half = CROP_SCALE * max(x1 - x0, y1 - y0) / 2
        l, t = max(0, int(math.floor(cx - half))), max(0, int(math.floor(cy - half)))
        r, b = min(W, int(math.ceil(cx + half))), min(H, int(math.ceil(cy + half)))
        if r - l < 8 or b - t < 8:
            return None
        faces = [f + np.array([l, t], dtype=np.float64) for f in self._mesh(image_rgb[t:b, l:r])]
        if not faces:
            return None
        return min(faces, key=lambda f: float(np.hypot(*(f.mean(0) - (cx, cy)))))

    def faces(self, image_rgb: np.ndarray, largest_only: bool = False) -> list[np.ndarray]:
        """Landmarks of the faces of one uint8 RGB image, each ``[478, 2]`` (x, y) in pixels (x right, y
        down from the top-left corner). ``largest_only``: the largest detected face that Face Mesh
        confirms (at most one)."""
        out = []
        for box in self.boxes(image_rgb):
            pts = self.landmarks(image_rgb, box)
            if pts is not None:
                out.append(pts)
                if largest_only:
                    break
        return out


# --- turning mediapipe's connection sets into polygons ----------------------------------------

def edge_paths(edges) -> list[tuple[tuple[int, ...], str]]:
    """Split an edge set (pairs of landmark ids) into its connected parts, each as an ordered vertex
    list and its kind: ``"loop"`` (a simple cycle; the first vertex is not repeated), ``"path"`` (a
    simple open chain) or ``"graph"`` (anything else; its vertices sorted)."""
    adj: dict[int, set[int]] = defaultdict(set)
    for a, b in edges:
        if a != b:
            adj[int(a)].add(int(b))
            adj[int(b)].add(int(a))
    seen: set[int] = set()
    parts = []
    for start in sorted(adj):
        if start in seen:
            continue
        comp, todo = {start}, [start]
        while todo:
            for n in adj[todo.pop()]:
                if n not in comp:
                    comp.add(n)
                    todo.append(n)
        seen |= comp
        degrees = [len(adj[v]) for v in comp]
        ends = sorted(v for v in comp if len(adj[v]) == 1)
        if all(d == 2 for d in degrees):
            kind, first = "loop", min(comp)
        elif len(ends) == 2 and all(d in (1, 2) for d in degrees):
            kind, first = "path", ends[0]
        else:
            parts.append((tuple(sorted(comp)), "graph"))
            continue
        order, prev = [first], None
        while True:
            nxt = sorted(n for n in adj[order[-1]] if n != prev)
            if not nxt or nxt[0] == first:
                break
            prev = order[-1]
            order.append(nxt[0])
        parts.append((tuple(order), kind))
    return parts


def polygon_area(pts: np.ndarray) -> float:
    """Area of a simple polygon ``[N, 2]`` (shoelace formula, absolute)."""
    if len(pts) < 3:
        return 0.0
    x, y = pts[:, 0], pts[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def convex_hull(pts: np.ndarray) -> np.ndarray:
    """The convex hull of points ``[N, 2]`` in order (Andrew's monotone chain)."""
    p = sorted({(float(a), float(b)) for a, b in pts})
    if len(p) < 3:
        return np.array(p, dtype=np.float64).reshape(-1, 2)

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower, upper = [], []
    for q in p:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], q) <= 0:
            lower.pop()
        lower.append(q)
    for q in reversed(p):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], q) <= 0:
            upper.pop()
        upper.append(q)
    return np.array(lower[:-1] + upper[:-1], dtype=np.float64)


def stitch_paths(paths, pts: np.ndarray) -> list[int]:
    """Join open chains into one outline: start with the first, then repeatedly append the remaining
    chain whose nearer end lies closest to the outline's current end (reversed when that is its far
    end). An eyebrow is an upper and a lower chain; joined this way they enclose the brow."""
    left = [list(p) for p in paths]
    out = left.pop(0)
    while left:
        end = pts[out[-1]]
        best = min([(float(np.hypot(*(pts[c[0]] - end))), i, False) for i, c in enumerate(left)]
                   + [(float(np.hypot(*(pts[c[-1]] - end))), i, True) for i, c in enumerate(left)])
        chain = left.pop(best[1])
        out.extend(reversed(chain) if best[2] else chain)
    return out


@dataclass(frozen=True)
class Region:
    """One region of the face mesh: its parts from ``edge_paths``."""
    parts: tuple[tuple[tuple[int, ...], str], ...]

    @classmethod
    def of(cls, edges) -> "Region":
        return cls(tuple(edge_paths(edges)))

    def polygons(self, pts: np.ndarray) -> list[np.ndarray]:
        """The region's outlines in pixels: each loop as it is, all open chains stitched into one,
        other graphs as their convex hull."""
        polys = [pts[list(ids)] for ids, kind in self.parts if kind == "loop"]
        chains = [ids for ids, kind in self.parts if kind == "path"]
        if chains:
            polys.append(pts[stitch_paths(chains, pts)])
        for ids, kind in self.parts:
            if kind == "graph":
                polys.append(convex_hull(pts[list(ids)]))
        return [p for p in polys if len(p) >= 3]

    def outline(self, pts: np.ndarray) -> np.ndarray:
        """One outline: the region's single polygon, or the convex hull of all of its landmarks when
        it has several parts."""
        polys = self.polygons(pts)
        if len(polys) == 1:
            return polys[0]
        return convex_hull(pts[sorted({i for ids, _ in self.parts for i in ids})])

    @property
    def ids(self) -> tuple[int, ...]:
        return tuple(sorted({i for ids, _ in self.parts for i in ids}))


@dataclass(frozen=True)
class FaceMeshRegions:
    """The regions of the 478-landmark face mesh, from mediapipe's own connection sets. Left and
    right are the person's own (MediaPipe's naming): the left eye appears on the image's right in a
    frontal photo."""
    oval: Region
    eye: dict
    iris: dict
    brow: dict
    lips: Region
    nose: Region

    @classmethod
    def from_connections(cls, c) -> "FaceMeshRegions":
        needed = ("FACEMESH_FACE_OVAL", "FACEMESH_LEFT_EYE", "FACEMESH_RIGHT_EYE", "FACEMESH_LEFT_EYEBROW",
                  "FACEMESH_RIGHT_EYEBROW", "FACEMESH_LIPS", "FACEMESH_LEFT_IRIS", "FACEMESH_RIGHT_IRIS",
                  "FACEMESH_NOSE")
        missing = [n for n in needed if not hasattr(c, n)]
        if missing:
            raise ImportError(f"this mediapipe's face_mesh_connections lacks {', '.join(missing)}; install "
                              f"mediapipe=={MEDIAPIPE_VERSION}")
        return cls(oval=Region.of(c.FACEMESH_FACE_OVAL),
                   eye={"left": Region.of(c.FACEMESH_LEFT_EYE), "right": Region.of(c.FACEMESH_RIGHT_EYE)},
                   iris={"left": Region.of(c.FACEMESH_LEFT_IRIS), "right": Region.of(c.FACEMESH_RIGHT_IRIS)},
                   brow={"left": Region.of(c.FACEMESH_LEFT_EYEBROW), "right": Region.of(c.FACEMESH_RIGHT_EYEBROW)},
                   lips=Region.of(c.FACEMESH_LIPS), nose=Region.of(c.FACEMESH_NOSE))


_REGIONS: FaceMeshRegions | None = None


def face_mesh_regions() -> FaceMeshRegions:
    global _REGIONS
    if _REGIONS is None:
        _REGIONS = FaceMeshRegions.from_connections(import_solutions().face_mesh_connections)
    return _REGIONS


def fill_polygons(polys, height: int, width: int) -> np.ndarray:
    """A boolean ``[H, W]`` mask of the union of the polygons (each ``[N, 2]``, x/y in pixels, pixel
    ``(i, j)`` spanning ``i..i+1`` by ``j..j+1``): a pixel is inside a polygon when its centre is
    (even-odd rule, scanlines through the pixel centres)."""
    out = np.zeros((height, width), dtype=bool)
    for poly in polys:
        poly = np.asarray(poly, dtype=np.float64)
        if len(poly) < 3:
            continue
        x1, y1 = poly[:, 0], poly[:, 1]
        x2, y2 = np.roll(x1, -1), np.roll(y1, -1)
        r0 = max(0, int(math.floor(y1.min() - 0.5)))
        r1 = min(height, int(math.ceil(y1.max() + 0.5)))
        if r1 <= r0:
            continue
        cy = np.arange(r0, r1, dtype=np.float64)[:, None] + 0.5
        crosses = (y1 <= cy) != (y2 <= cy)                       # the edge spans the scanline (half-open)
        with np.errstate(divide="ignore", invalid="ignore"):
            cx = x1 + (cy - y1) * (x2 - x1) / (y2 - y1)
        rows, edges = np.nonzero(crosses)
        # each crossing flips inside/outside for the pixel centres at or right of it
        start = np.clip(np.ceil(cx[rows, edges] - 0.5), 0, width).astype(np.int64)
        flips = np.zeros((r1 - r0, width + 1), dtype=np.int64)
        np.add.at(flips, (rows, start), 1)
        out[r0:r1] |= (np.cumsum(flips, axis=1)[:, :width] % 2).astype(bool)
    return out


def _iris(region: Region, pts: np.ndarray, height: int, width: int) -> np.ndarray:
    """The iris as the ellipse through its four edge landmarks (left, top, right, bottom)."""
    ring = pts[list(region.ids)]
    (x0, y0), (x1, y1) = ring.min(0), ring.max(0)
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, max((x1 - x0) / 2, 1e-6), max((y1 - y0) / 2, 1e-6)
    ys = np.arange(height, dtype=np.float64)[:, None] + 0.5
    xs = np.arange(width, dtype=np.float64)[None, :] + 0.5
    return ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1.0


def landmark_mask(regions: FaceMeshRegions, pts: np.ndarray, attributes, height: int, width: int) -> np.ndarray:
    """The boolean ``[H, W]`` mask of one face's attributes from its landmarks (pixels)."""
    def fill(*regs):
        return fill_polygons([r.outline(pts) for r in regs], height, width)

    def mouth_and_opening():
        polys = sorted(regions.lips.polygons(pts), key=polygon_area, reverse=True)
        if not polys:
            return np.zeros((height, width), bool), np.zeros((height, width), bool)
        outer = fill_polygons(polys[:1], height, width)
        inner = fill_polygons(polys[1:], height, width) & outer
        return outer, inner

    out = np.zeros((height, width), dtype=bool)
    for a in attributes:
        if a == "face":
            out |= fill(regions.oval)
        elif a == "eyes":
            out |= fill(regions.eye["left"], regions.eye["right"])
        elif a in ("left eye", "right eye"):
            out |= fill(regions.eye[a.split()[0]])
        elif a == "irises":
            for side in ("left", "right"):
                out |= _iris(regions.iris[side], pts, height, width) & fill(regions.eye[side])
        elif a == "brows":
            out |= fill(regions.brow["left"], regions.brow["right"])
        elif a == "nose":
            out |= fill(regions.nose)
        elif a == "mouth":
            out |= mouth_and_opening()[0]
        elif a == "lips":
            outer, inner = mouth_and_opening()
            out |= outer & ~inner
        elif a == "skin":
            features = fill(regions.eye["left"], regions.eye["right"], regions.brow["left"], regions.brow["right"])
            out |= fill(regions.oval) & ~features & ~mouth_and_opening()[0]
        else:
            raise ValueError(f"attributes: mediapipe cannot mask {a!r}")
    return out


def mediapipe_masks(image: torch.Tensor, attributes, faces: str = "largest", if_no_face: str = "error",
                    check_interrupt: Callable[[], None] | None = None,
                    progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Masks ``[B, H, W]`` (float 0/1) of the attributes on each image of a batch, from MediaPipe
    face landmarks. ``faces``: ``largest`` keeps the face with the largest detection box, ``all``
    the union of every face found."""
    B, H, W = check_image(image)
    check_supported(attributes, "mediapipe")
    regions = face_mesh_regions()
    out = torch.zeros(B, H, W)
    with FaceLandmarker() as finder:
        for i in range(B):
            if check_interrupt is not None:
                check_interrupt()
            found = finder.faces(to_uint8_rgb(image[i]), largest_only=faces == "largest")
            if not found:
                if if_no_face == "error":
                    raise NoFaceError(no_face_message(i, B, "mediapipe"))
                log.warning("Personalize Face Attribute Mask: no face in image %d; its mask is empty", i + 1)
            else:
                m = np.zeros((H, W), dtype=bool)
                for pts in found:
                    m |= landmark_mask(regions, pts, attributes, H, W)
                out[i] = torch.from_numpy(m.astype(np.float32))
            if progress is not None:
                progress(i + 1)
    return out


# ---------------------------------------------------------------------------------------------
# BiSeNet face parsing (CelebAMask-HQ, 19 classes)
# ---------------------------------------------------------------------------------------------

OFFICIAL_FILE = "79999_iter.pth"
OFFICIAL_URL = "https://drive.google.com/open?id=154JgKpzCPW82qINcVieuPH3fZ2e0P812"
REPO_URL = "https://github.com/zllrunning/face-parsing.PyTorch"
NUM_CLASSES = len(BISENET_LABELS)
INPUT_SIZE = 512
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MIN_FACE_FRACTION = 0.001       # below this share of face labels an image counts as having no face


class FaceParsingFileError(ValueError):
    """A face-parsing checkpoint that cannot be used; the message says why and what to do."""


def download_hint(folder: str = "ComfyUI/models/face_parsing") -> str:
    return (f"download the official BiSeNet face-parsing model {OFFICIAL_FILE} ({OFFICIAL_URL}, linked from the "
            f"README of {REPO_URL}) into {folder}")


class _ConvBNReLU(nn.Module):
    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, padding: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if cin != cout or stride != 1:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class _ResNet18(nn.Module):
    """ResNet-18 trunk without the classifier; returns the 1/8, 1/16 and 1/32 feature maps."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        widths = ((64, 64, 1), (64, 128, 2), (128, 256, 2), (256, 512, 2))
        for i, (cin, cout, stride) in enumerate(widths, 1):
            setattr(self, f"layer{i}", nn.Sequential(_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout)))

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        f8 = self.layer2(self.layer1(x))
        f16 = self.layer3(f8)
        return f8, f16, self.layer4(f16)


class _AttentionRefinement(nn.Module):
    """Conv, then a channel gate from the globally pooled features."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = _ConvBNReLU(cin, cout)
        self.conv_atten = nn.Conv2d(cout, cout, 1, bias=False)
        self.bn_atten = nn.BatchNorm2d(cout)

    def forward(self, x):
        f = self.conv(x)
        gate = torch.sigmoid(self.bn_atten(self.conv_atten(f.mean((2, 3), keepdim=True))))
        return f * gate


class _ContextPath(nn.Module):
    def __init__(self):
        super().__init__()
        self.resnet = _ResNet18()
        self.arm16 = _AttentionRefinement(256, 128)
        self.arm32 = _AttentionRefinement(512, 128)
        self.conv_head32 = _ConvBNReLU(128, 128)
        self.conv_head16 = _ConvBNReLU(128, 128)
        self.conv_avg = _ConvBNReLU(512, 128, k=1, padding=0)

    def forward(self, x):
        f8, f16, f32 = self.resnet(x)
        context = self.conv_avg(f32.mean((2, 3), keepdim=True))          # broadcast over the 1/32 grid
        up32 = self.conv_head32(F.interpolate(self.arm32(f32) + context, size=f16.shape[2:], mode="nearest"))
        up16 = self.conv_head16(F.interpolate(self.arm16(f16) + up32, size=f8.shape[2:], mode="nearest"))
        return f8, up16, up32


class _FeatureFusion(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.convblk = _ConvBNReLU(cin, cout, k=1, padding=0)
        self.conv1 = nn.Conv2d(cout, cout // 4, 1, bias=False)
        self.conv2 = nn.Conv2d(cout // 4, cout, 1, bias=False)

    def forward(self, spatial, context):
        f = self.convblk(torch.cat([spatial, context], dim=1))
        gate = torch.sigmoid(self.conv2(F.relu(self.conv1(f.mean((2, 3), keepdim=True)))))
        return f + f * gate


class _Head(nn.Module):
    def __init__(self, cin: int, mid: int, n_classes: int):
        super().__init__()
        self.conv = _ConvBNReLU(cin, mid)
        self.conv_out = nn.Conv2d(mid, n_classes, 1, bias=False)

    def forward(self, x):
        return self.conv_out(self.conv(x))


class BiSeNet(nn.Module):
    """BiSeNet face parser with the layout (and parameter names) of face-parsing.PyTorch: a ResNet-18
    context path with attention refinement, the 1/8 ResNet features standing in for the spatial
    path, feature fusion and the main output head. The two auxiliary heads (``conv_out16``,
    ``conv_out32``) are training-only; they are kept so that the official file loads strictly, and
    ``forward(aux=True)`` computes them. Returns logits ``[B, n_classes, H, W]`` at the input size
    (bilinear, ``align_corners=True``, as the original)."""

    def __init__(self, n_classes: int = NUM_CLASSES):
        super().__init__()
        self.cp = _ContextPath()
        self.ffm = _FeatureFusion(256, 256)
        self.conv_out = _Head(256, 256, n_classes)
        self.conv_out16 = _Head(128, 64, n_classes)
        self.conv_out32 = _Head(128, 64, n_classes)

    def forward(self, x, aux: bool = False):
        size = x.shape[2:]
        f8, cp8, cp16 = self.cp(x)
        out = F.interpolate(self.conv_out(self.ffm(f8, cp8)), size=size, mode="bilinear", align_corners=True)
        if not aux:
            return out
        return (out, F.interpolate(self.conv_out16(cp8), size=size, mode="bilinear", align_corners=True),
                F.interpolate(self.conv_out32(cp16), size=size, mode="bilinear", align_corners=True))


# --- reading a checkpoint -----------------------------------------------------------------------

def read_state_dict(path: str | os.PathLike) -> dict:
    """The tensors of a ``.pth`` or ``.safetensors`` face-parsing file (``files.checkpoints.read_checkpoint``:
    weights_only, never unpickled objects); every failure is a ``FaceParsingFileError`` naming the file."""
    return read_checkpoint(path, FaceParsingFileError, f"Download it again: {download_hint()}.",
                           missing_prefix="face-parsing model ", get=download_hint())


def unwrap_state_dict(obj, name: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The flat ``{key: tensor}``: a plain state dict, one nested under ``state_dict`` / ``model``, and
    a ``module.`` prefix (DataParallel) are accepted."""
    sd = flat_state_dict(obj, ("state_dict", "model", "net", "module"))
    if sd is None:
        raise FaceParsingFileError(f"{name} is not a state dict of tensors (got {type(obj).__name__}); use the "
                                   f"official {OFFICIAL_FILE} ({OFFICIAL_URL})")
    return sd


def _is_counter(key: str) -> bool:
    return key.endswith("num_batches_tracked")     # BatchNorm's step counter: unused in eval, absent from old files


@dataclass
class FaceParser:
    """A loaded BiSeNet face parser."""
    net: BiSeNet
    name: str = "face_parser"
    path: str | None = None
    extras: dict = field(default_factory=dict)   # room for the host (e.g. ComfyUI's model patcher)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device


def build_bisenet(device="cpu") -> BiSeNet:
    with torch.device(device):
        return BiSeNet(NUM_CLASSES).eval()


def load_face_parser(path: str | os.PathLike) -> FaceParser:
    """Read, check and build the BiSeNet face parser on the CPU (float32). The keys must be the
    official layout's, exactly (BatchNorm's ``num_batches_tracked`` counters may be present or not)."""
    path = os.fspath(path)
    name = os.path.basename(path)
    sd = unwrap_state_dict(read_state_dict(path), name)
    use = f"use the official BiSeNet face-parsing model {OFFICIAL_FILE} ({OFFICIAL_URL})"
    if "cp.resnet.conv1.weight" not in sd or "conv_out.conv_out.weight" not in sd:
        kind = ""
        keys = list(sd)
        if any(k.startswith(("image_encoder.", "mask_decoder.")) for k in keys):
            kind = " (it is a Segment Anything checkpoint: those go to the sams folder)"
        elif any(k.startswith(("model.diffusion_model.", "first_stage_model.")) for k in keys):
            kind = " (it is a Stable Diffusion checkpoint)"
        elif any(k.startswith(("segformer.", "decode_head.")) for k in keys):
            kind = " (it is a SegFormer face parser (Hugging Face transformers), another network)"
        raise FaceParsingFileError(f"{name} is not a BiSeNet face-parsing model{kind}: it has no cp.resnet.* / "
                                   f"conv_out.* weights (its first keys are {', '.join(keys[:3])}); {use}")
    n_classes = sd["conv_out.conv_out.weight"].shape[0]
    if n_classes != NUM_CLASSES:
        raise FaceParsingFileError(f"{name} is a BiSeNet with {n_classes} classes, not the 19 CelebAMask-HQ face "
                                   f"classes these masks use; {use}")
    net = build_bisenet("meta")
    want = {k: tuple(v.shape) for k, v in net.state_dict().items() if not _is_counter(k)}
    have = {k: tuple(v.shape) for k, v in sd.items() if not _is_counter(k)}
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            parts.append(f"{len(wrong)} of another shape (e.g. {wrong[0]}: {have[wrong[0]]} instead of "
                         f"{want[wrong[0]]})")
        raise FaceParsingFileError(f"{name} does not match the BiSeNet face-parsing layout: keys {'; '.join(parts)}. "
                                   f"The file is incomplete or another network; {use}")
    tensors = {k: v for k, v in sd.items() if not _is_counter(k)}
    net.load_state_dict(tensors, strict=False, assign=True)
    for mod in net.modules():      # counters the file did not bring
        if isinstance(mod, nn.BatchNorm2d) and mod.num_batches_tracked is not None and mod.num_batches_tracked.is_meta:
            mod.num_batches_tracked = torch.zeros((), dtype=torch.long)
    left = [n for n, t in [*net.named_parameters(), *net.named_buffers()] if t.is_meta]
    if left:
        raise FaceParsingFileError(f"{name}: weights {left[:3]} were not in the file; {use}")
    net = net.float().eval()
    net.requires_grad_(False)
    return FaceParser(net=net, name=name, path=path)


# --- parsing ------------------------------------------------------------------------------------

def preprocess_bisenet(images: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE ``[B, H, W, C]`` (0..1) → BiSeNet input ``[B, 3, 512, 512]``: bilinear resize
    (antialiased when shrinking, as PIL's resize that FreeCure uses), ImageNet mean/std."""
    x = images[..., :3].float()
    if x.shape[-1] == 1:
        x = x.expand(*x.shape[:-1], 3)
    x = x.permute(0, 3, 1, 2)
    if tuple(x.shape[-2:]) != (INPUT_SIZE, INPUT_SIZE):
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def resize_labels(labels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Label maps ``[B, h, w]`` → ``[B, H, W]`` by nearest neighbour (pixel centres)."""
    if tuple(labels.shape[-2:]) == (height, width):
        return labels
    x = F.interpolate(labels[:, None].float(), size=(height, width), mode="nearest-exact")
    return x[:, 0].to(labels.dtype)


@torch.no_grad()
def parse_labels(parser: FaceParser, images: torch.Tensor, chunk: int = 4,
                 check_interrupt: Callable[[], None] | None = None,
                 progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """CelebAMask-HQ labels ``[B, H, W]`` (int64, on the CPU) of a batch of images ``[B, H, W, C]``,
    at the images' size."""
    B, H, W = check_image(images)
    device = parser.device
    out = []
    for s in range(0, B, chunk):
        if check_interrupt is not None:
            check_interrupt()
        x = preprocess_bisenet(images[s:s + chunk].to(device))
        labels = parser.net(x).argmax(1)
        out.append(resize_labels(labels, H, W).cpu())
        if progress is not None:
            progress(min(B, s + chunk))
    return torch.cat(out)


def labels_to_mask(labels: torch.Tensor, attributes) -> torch.Tensor:
    """0/1 float masks ``[B, H, W]`` of the union of the attributes' classes."""
    ids = torch.tensor(bisenet_labels_for(attributes), dtype=labels.dtype, device=labels.device)
    return torch.isin(labels, ids).float()


def has_face(labels: torch.Tensor) -> torch.Tensor:
    """Per image of ``[B, H, W]``: whether at least ``MIN_FACE_FRACTION`` of its pixels are face."""
    face = torch.isin(labels, torch.tensor(FACE_LABELS, dtype=labels.dtype, device=labels.device))
    return face.flatten(1).float().mean(1) >= MIN_FACE_FRACTION


def bisenet_masks(parser: FaceParser, image: torch.Tensor, attributes, if_no_face: str = "error",
                  check_interrupt: Callable[[], None] | None = None,
                  progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Masks ``[B, H, W]`` (float 0/1) of the attributes on each image, from BiSeNet face parsing. The
    parser labels the whole image, so every face in it contributes (``faces`` has no effect)."""
    B, _, _ = check_image(image)
    check_supported(attributes, "bisenet")
    labels = parse_labels(parser, image, check_interrupt=check_interrupt, progress=progress)
    masks = labels_to_mask(labels, attributes)
    for i, ok in enumerate(has_face(labels).tolist()):
        if not ok:
            if if_no_face == "error":
                raise NoFaceError(no_face_message(i, B, "bisenet"))
            log.warning("Personalize Face Attribute Mask: no face in image %d; its mask is empty", i + 1)
            masks[i] = 0
    return masks


def face_attribute_masks(image: torch.Tensor, attributes, provider: str = "mediapipe",
                         parser: FaceParser | None = None, faces: str = "largest", if_no_face: str = "error",
                         grow: int = 0, check_interrupt: Callable[[], None] | None = None,
                         progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """The attribute masks ``[B, H, W]`` (float 0/1, the image's size) of an image batch: checks the
    options, runs the provider, grows (or shrinks) the masks by ``grow`` pixels."""
    check_image(image)
    if faces not in FACES:
        raise ValueError(f"faces: unknown {faces!r}; use one of {', '.join(FACES)}")
    if if_no_face not in IF_NO_FACE:
        raise ValueError(f"if_no_face: unknown {if_no_face!r}; use one of {', '.join(IF_NO_FACE)}")
    if not attributes:
        raise ValueError("attributes: no attribute to mask")
    check_supported(attributes, provider)
    if provider == "mediapipe":
        masks = mediapipe_masks(image, attributes, faces, if_no_face, check_interrupt, progress)
    else:
        if parser is None:
            raise ValueError("face_parser: the bisenet provider needs a face parser; connect Face Parsing Loader "
                             f"(BiSeNet) with {OFFICIAL_FILE} (or use the mediapipe provider, which needs no file)")
        masks = bisenet_masks(parser, image, attributes, if_no_face, check_interrupt, progress)
    return grow_mask(masks, grow) if grow else masks


def memory_estimate(batch_chunk: int = 4) -> int:
    """Working memory of one BiSeNet chunk: about 64 float32 planes of 512x512 per image (the ResNet
    stem's activations, the 19 upsampled logits and the argmax)."""
    return int(batch_chunk * INPUT_SIZE ** 2 * 4 * 64)

