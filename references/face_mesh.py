"""The mediapipe provider of the face attribute masks: MediaPipe Face Mesh (legacy
``mp.solutions.face_mesh``, 478 landmarks with the refined eyes, irises and lips) on a crop around each
face that the full-range face detector finds, and the attribute regions as polygons through the landmarks
of mediapipe's own connection sets (``mp.solutions.face_mesh_connections``), rasterised at the image size.

Its models are inside the ``mediapipe==0.10.21`` wheel, so it works offline with no model file. Landmarks
cover the face only: hair, hat, glasses, ears, earrings, neck, necklace and clothes cannot be drawn from
them. ``mediapipe`` is imported inside the functions that need it, with an error that says what to
install; nothing here imports ComfyUI.
"""
from __future__ import annotations

import importlib
import logging
import math
import sys
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .face_attributes import NoFaceError, check_image, check_supported, no_face_message, to_uint8_rgb

log = logging.getLogger(__name__)

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
    except Exception as exc:
        raise ImportError(f"mediapipe is installed but could not be imported ({type(exc).__name__}: {exc}); "
                          + mediapipe_install_hint()) from exc
    version = getattr(mp, "__version__", "?")
    try:
        for name in ("face_detection", "face_mesh", "face_mesh_connections"):
            importlib.import_module(f"mediapipe.python.solutions.{name}")
        from mediapipe.python import solutions
    except Exception as exc:
        raise ImportError(f"mediapipe {version} has no legacy solutions (mp.solutions.face_mesh; releases after "
                          f"{MEDIAPIPE_VERSION} ship neither them nor their models): {type(exc).__name__}: {exc}. "
                          + mediapipe_install_hint()) from None
    return solutions


def _protobuf_version() -> str:
    try:
        import google.protobuf
        return google.protobuf.__version__
    except Exception:
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
        except Exception as exc:
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

