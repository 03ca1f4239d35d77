"""Boxes and points in the formats other ComfyUI nodes pass around, read into pixel prompts.

* **Boxes**: ComfyUI core's ``BOUNDING_BOX`` type (``comfy_api`` ``io.BoundingBox``): a dict
  ``{"x", "y", "width", "height"}`` in pixels from the image's top-left corner, with optional
  ``"label"`` and ``"score"``. Core's detection nodes (RT-DETR, SAM3 Detect, MediaPipe Face Landmarker)
  output a list per image of such dicts; core's consumers (Draw BBoxes, SAM3 Detect) also accept one
  dict (every image) and a flat list of dicts (the same boxes for every image). The same three shapes
  are accepted here, and ``bounding_box`` writes one.
* **Points**: core has no points type. Core's SAM3 Detect takes its points as a string of JSON,
  ``[{"x": 120, "y": 80}, ...]`` in pixels (the format of the KJNodes Points Editor, which most
  graphs use to click points); ``parse_coords`` reads that string.

Pure Python; nothing here imports ComfyUI.
"""
from __future__ import annotations

import json
import math
import numbers

Box = tuple[float, float, float, float]          # x0, y0, x1, y1 in pixels


def bounding_box(x0: float, y0: float, x1: float, y1: float, label: str | None = None,
                 score: float | None = None) -> dict:
    """One box in core's ``BOUNDING_BOX`` layout (x, y, width, height in pixels)."""
    out = {"x": float(x0), "y": float(y0), "width": float(x1) - float(x0), "height": float(y1) - float(y0)}
    if label is not None:
        out["label"] = str(label)
    if score is not None:
        out["score"] = float(score)
    return out


def _number(value, name: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name}: {where} is {value!r}; expected a finite number of pixels")
    return float(value)


def _box(d, name: str, where: str, height: int, width: int) -> Box:
    if not isinstance(d, dict) or not all(k in d for k in ("x", "y", "width", "height")):
        raise ValueError(f"{name}: {where} is {d!r}; expected a box {{'x', 'y', 'width', 'height'}} in pixels "
                         f"(ComfyUI's BOUNDING_BOX)")
    x, y, w, h = (_number(d[k], name, f"{where} {k}") for k in ("x", "y", "width", "height"))
    if w <= 0 or h <= 0:
        raise ValueError(f"{name}: {where} has width {w:g} and height {h:g}; both must be above 0")
    # detectors' boxes may run a little past the picture: keep the part inside it
    x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, float(width)), min(y + h, float(height))
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"{name}: {where} (x {x:g}, y {y:g}, width {w:g}, height {h:g}) lies outside the "
                         f"{width}x{height} image (pixels from the top-left corner)")
    return x0, y0, x1, y1


def boxes_per_image(bboxes, batch: int, height: int, width: int, name: str = "bboxes") -> list[list[Box]]:
    """Core's ``BOUNDING_BOX`` value as one list of boxes ``(x0, y0, x1, y1)`` per image of a batch of
    ``batch`` images of ``height`` x ``width``: one dict or a flat list of dicts is used for every image; a
    list of lists gives each image its own boxes and needs one list per image (or one for all). Boxes are
    clipped to the image; one wholly outside it, or of no size, is an error naming ``name``."""
    if isinstance(bboxes, dict):
        frames = [[bboxes]]
    elif isinstance(bboxes, (list, tuple)):
        if all(isinstance(f, (list, tuple)) for f in bboxes) and bboxes:
            frames = [list(f) for f in bboxes]
        elif all(isinstance(d, dict) for d in bboxes):
            frames = [list(bboxes)]
        else:
            raise ValueError(f"{name}: expected a box dict, a list of box dicts, or one list of box dicts per image "
                             f"(ComfyUI's BOUNDING_BOX), got a list mixing {sorted({type(v).__name__ for v in bboxes})}")
    else:
        raise ValueError(f"{name}: expected ComfyUI's BOUNDING_BOX (a box dict or lists of them), got "
                         f"{type(bboxes).__name__}")
    if len(frames) not in (1, batch):
        raise ValueError(f"{name}: {len(frames)} lists of boxes (one per image) for {batch} images; connect boxes "
                         f"detected on the same batch, or one list for every image")
    out = []
    for i, frame in enumerate(frames):
        where = (lambda j: f"box {j + 1}") if len(frames) == 1 else (lambda j, i=i: f"image {i + 1}'s box {j + 1}")
        out.append([_box(d, name, where(j), height, width) for j, d in enumerate(frame)])
    return out * batch if len(out) == 1 else out


def parse_coords(text, height: int, width: int, name: str = "positive_coords") -> list[tuple[float, float]]:
    """Points from the JSON string ``[{"x": .., "y": ..}, ...]`` (pixels from the top-left corner, the
    format of core's SAM3 Detect and of the KJNodes Points Editor); a list already decoded is accepted too.
    Empty text or ``[]`` gives no points. A point outside the ``height`` x ``width`` image is an error."""
    if text is None:
        return []
    if isinstance(text, str):
        if not text.strip():
            return []
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{name}: {text.strip()[:80]!r} is not JSON ({exc.msg}); expected points as "
                             f'[{{"x": 120, "y": 80}}, ...] in pixels') from None
    else:
        value = text
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f'{name}: expected a list of points [{{"x": 120, "y": 80}}, ...], got {type(value).__name__}')
    out = []
    for j, p in enumerate(value):
        if not isinstance(p, dict) or "x" not in p or "y" not in p:
            raise ValueError(f'{name}: point {j + 1} is {p!r}; expected {{"x": .., "y": ..}} in pixels')
        x, y = _number(p["x"], name, f"point {j + 1} x"), _number(p["y"], name, f"point {j + 1} y")
        if not (0 <= x <= width and 0 <= y <= height):
            raise ValueError(f"{name}: point {j + 1} ({x:g}, {y:g}) lies outside the {width}x{height} image "
                             f"(pixels from the top-left corner)")
        out.append((x, y))
    return out
