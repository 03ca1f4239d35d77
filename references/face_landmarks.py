"""Face attribute masks from ComfyUI core's face landmarks, so that the mediapipe provider needs no
mediapipe package when a graph already has landmarks.

Core (ComfyUI 0.33 and later, ``comfy_extras/nodes_mediapipe.py``) ships a PyTorch port of MediaPipe's
Face Landmarker v2. Its "Detect Face Landmarks (MediaPipe)" node outputs ``FACE_LANDMARKS``, a dict:

* ``frames``: one list per image of the batch, one dict per face with ``landmarks_xy`` (a ``[478, 2]``
  array, x right and y down in pixels of the image it ran on), ``bbox_xyxy`` (the landmarks' extent),
  ``score`` and more;
* ``image_size``: that image's ``(H, W)``;
* ``connection_sets``: MediaPipe's FACEMESH_* edge sets as sets of landmark-id pairs, named
  ``face_oval``, ``left_eye``, ``right_eye``, ``left_eyebrow``, ``right_eyebrow``, ``lips``, ``irises``
  (both irises in one set), ``nose``, ``tesselation``, ``contours``, ``all``.

The landmarks are the 478 points of MediaPipe's canonical face mesh in its own order, the order of the
legacy Face Mesh that ``face_mesh.py`` runs, and the edge sets are MediaPipe's own. So nothing is
re-indexed: the regions are built from the edge sets that travel with the landmarks (``left``/``right``
are the person's own, MediaPipe's naming) and drawn by ``face_mesh.landmark_mask``, the same polygons as
the mediapipe path. The one difference is the irises: core keeps both in one ``irises`` set, so it is
split into its two rings and each ring goes to the eye it lies in.

Pure numpy / torch; nothing here imports ComfyUI or mediapipe.
"""
from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import torch

from .face_attributes import NoFaceError, check_supported
from .face_mesh import FaceMeshRegions, Region, edge_paths, landmark_mask

log = logging.getLogger(__name__)

CORE_NODE = "Detect Face Landmarks (MediaPipe)"      # the core node whose output the input takes
PARTS = {"face_oval": "oval", "left_eye": "left eye", "right_eye": "right eye", "left_eyebrow": "left brow",
         "right_eyebrow": "right brow", "lips": "lips", "nose": "nose"}
NAME = "face_landmarks"


def _edges(sets: dict, key: str) -> frozenset:
    edges = sets.get(key)
    try:
        pairs = frozenset((int(a), int(b)) for a, b in edges)
    except (TypeError, ValueError):
        raise ValueError(f"{NAME}: its connection set {key!r} is not a set of landmark-id pairs; connect the "
                         f"output of core's {CORE_NODE} node") from None
    if not pairs:
        raise ValueError(f"{NAME}: its connection set {key!r} is empty")
    return pairs


def check_connection_sets(sets) -> dict[str, frozenset]:
    """The edge sets the masks need, read from the ``connection_sets`` of core's FACE_LANDMARKS."""
    if not isinstance(sets, dict):
        raise ValueError(f"{NAME}: has no connection_sets (the face mesh's edges); connect the output of core's "
                         f"{CORE_NODE} node")
    need = [*PARTS, "irises"] if "irises" in sets or "left_iris" not in sets else [*PARTS, "left_iris", "right_iris"]
    missing = [k for k in need if k not in sets]
    if missing:
        raise ValueError(f"{NAME}: its connection_sets lack {', '.join(missing)}; connect the output of core's "
                         f"{CORE_NODE} node (ComfyUI 0.33 or later)")
    return {k: _edges(sets, k) for k in need}


def regions_for_face(sets: dict[str, frozenset], pts: np.ndarray) -> FaceMeshRegions:
    """The regions of one face. Core's single ``irises`` set is split into its rings; each ring goes to
    the eye whose outline's centre is nearest to the ring's centre (person's left and right as the eye
    sets name them)."""
    eye = {"left": Region.of(sets["left_eye"]), "right": Region.of(sets["right_eye"])}
    if "irises" in sets:
        rings = [ids for ids, _ in edge_paths(sets["irises"])]
        if len(rings) != 2:
            raise ValueError(f"{NAME}: its 'irises' connection set has {len(rings)} rings, expected 2 (one per eye)")
        centre = {side: pts[list(eye[side].ids)].mean(0) for side in eye}
        first = pts[list(rings[0])].mean(0)
        left_first = np.hypot(*(first - centre["left"])) <= np.hypot(*(first - centre["right"]))
        by_side = dict(zip(("left", "right") if left_first else ("right", "left"), rings))
        iris = {side: Region.of({(a, b) for a, b in sets["irises"] if a in by_side[side]}) for side in by_side}
    else:
        iris = {"left": Region.of(sets["left_iris"]), "right": Region.of(sets["right_iris"])}
    return FaceMeshRegions(oval=Region.of(sets["face_oval"]), eye=eye, iris=iris,
                           brow={"left": Region.of(sets["left_eyebrow"]), "right": Region.of(sets["right_eyebrow"])},
                           lips=Region.of(sets["lips"]), nose=Region.of(sets["nose"]))


def _face_points(face, where: str, scale: np.ndarray, highest: int) -> np.ndarray:
    pts = face.get("landmarks_xy") if isinstance(face, dict) else None
    if pts is None:
        raise ValueError(f"{NAME}: {where} has no landmarks_xy; connect the output of core's {CORE_NODE} node")
    pts = np.asarray(pts.detach().cpu().numpy() if isinstance(pts, torch.Tensor) else pts, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2 or pts.shape[0] <= highest:
        raise ValueError(f"{NAME}: {where}'s landmarks_xy has shape {tuple(pts.shape)}; the face mesh needs "
                         f"[{highest + 1} or more, 2] (MediaPipe's 478 landmarks, x and y in pixels)")
    if not np.isfinite(pts).all():
        raise ValueError(f"{NAME}: {where}'s landmarks contain NaN or infinite values")
    return pts * scale


def faces_per_image(face_landmarks, batch: int, height: int, width: int, largest_only: bool):
    """Core's FACE_LANDMARKS as one list of ``[N, 2]`` landmark arrays (pixels of an image ``height`` x
    ``width``) per image, each list largest face first (by landmark extent), and the edge sets. The
    landmarks are scaled when core ran on an image of another size; one frame list serves every image."""
    if not isinstance(face_landmarks, dict) or not isinstance(face_landmarks.get("frames"), (list, tuple)):
        raise ValueError(f"{NAME}: expected core's FACE_LANDMARKS (a dict with frames, image_size and "
                         f"connection_sets) from its {CORE_NODE} node, got {type(face_landmarks).__name__}")
    sets = check_connection_sets(face_landmarks.get("connection_sets"))
    highest = max(max(a, b) for edges in sets.values() for a, b in edges)
    frames = list(face_landmarks["frames"])
    if len(frames) not in (1, batch):
        raise ValueError(f"{NAME}: landmarks of {len(frames)} images for a batch of {batch}; detect the landmarks "
                         f"on the same image batch")
    size = face_landmarks.get("image_size")
    try:
        src_h, src_w = (float(v) for v in size)
    except (TypeError, ValueError):
        raise ValueError(f"{NAME}: image_size is {size!r}, expected (height, width)") from None
    if src_h <= 0 or src_w <= 0:
        raise ValueError(f"{NAME}: image_size is {size!r}, expected (height, width) above 0")
    if abs(src_h / src_w - height / width) > 0.02 * height / width:
        log.warning("Personalize Face Attribute Mask: the landmarks were found on a %gx%g image, the mask is "
                    "%dx%d; the aspect ratios differ, so the landmarks are stretched", src_w, src_h, width, height)
    scale = np.array([width / src_w, height / src_h])
    out = []
    for i, frame in enumerate(frames):
        if not isinstance(frame, (list, tuple)):
            raise ValueError(f"{NAME}: frame {i + 1} is {type(frame).__name__}, expected a list of faces")
        pts = [_face_points(f, f"image {i + 1}'s face {j + 1}", scale, highest) for j, f in enumerate(frame)]
        pts.sort(key=lambda p: float(np.prod(p.max(0) - p.min(0))), reverse=True)
        out.append(pts[:1] if largest_only else pts)
    return (out * batch if len(out) == 1 else out), sets


def landmark_masks(face_landmarks, shape: tuple[int, int, int], attributes, faces: str = "largest",
                   if_no_face: str = "error", check_interrupt: Callable[[], None] | None = None,
                   progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Masks ``[B, H, W]`` (float 0/1) of the attributes for a batch of ``shape`` ``(B, H, W)`` from core's
    FACE_LANDMARKS: the same polygons as the mediapipe provider, drawn through these landmarks."""
    B, H, W = shape
    check_supported(attributes, "mediapipe")
    per_image, sets = faces_per_image(face_landmarks, B, H, W, faces == "largest")
    out = torch.zeros(B, H, W)
    for i, found in enumerate(per_image):
        if check_interrupt is not None:
            check_interrupt()
        if not found:
            which = f"image {i + 1} of {B}" if B > 1 else "the image"
            if if_no_face == "error":
                raise NoFaceError(f"{NAME}: no face in {which} (core's {CORE_NODE} found none). Set if_no_face "
                                  f"to 'empty mask' to get an empty mask for such images instead of this error")
            log.warning("Personalize Face Attribute Mask: the landmarks have no face for image %d; its mask is "
                        "empty", i + 1)
        m = np.zeros((H, W), dtype=bool)
        for pts in found:
            m |= landmark_mask(regions_for_face(sets, pts), pts, attributes, H, W)
        out[i] = torch.from_numpy(m.astype(np.float32))
        if progress is not None:
            progress(i + 1)
    return out
