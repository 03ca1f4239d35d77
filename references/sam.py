"""Segment Anything (SAM) for subject masks: the pre/post-processing around the network, point and box
prompts, and segmentation (the checkpoint, its layout and the network are in ``sam_checkpoint.py``).

Pure torch; nothing here imports ComfyUI or ``segment_anything``.

The pre/post-processing is written here rather than taken from ``SamPredictor`` so that it works on
float ComfyUI images (no uint8 round trip), on any device, on a whole grid of prompts at once, and so
that each step can be tested on its own. It follows SAM's conventions exactly:

* **pre-processing**: the image (0..1 floats) is scaled to 0..255, its longer side resized to the
  model's input size (1024 for every official SAM) with antialiased bilinear interpolation (the new
  size rounds half up, as ``ResizeLongestSide.get_preprocess_shape``), normalised with SAM's pixel
  mean and std, and padded with zeros on the bottom and the right to a square;
* **prompts** are in pixels of the original image (``x`` right, ``y`` down, from the top-left
  corner, as SamPredictor's); they are scaled by the resize factors of each axis;
* **post-processing**: the decoder's low-resolution logits (a quarter of the input size) are upscaled
  bilinearly to the padded input size, the padding is cut off, the rest is resized bilinearly to the
  original image size and thresholded (``logit > threshold``, SAM's threshold is 0). Of the three
  multimask outputs the one with the highest predicted IoU is kept.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .sam_checkpoint import PIXEL_MEAN, PIXEL_STD, SamModel

MODES = ("points", "box", "points + box", "largest object")
MULTIMASK = ("auto", "best of 3", "single")
UNITS = ("pixels", "fractions")

# SamAutomaticMaskGenerator's defaults, used by the "largest object" mode
LARGEST_MIN_IOU = 0.88
LARGEST_MIN_STABILITY = 0.95
STABILITY_OFFSET = 1.0


# ---------------------------------------------------------------------------------------------
# Pre- and post-processing
# ---------------------------------------------------------------------------------------------

def preprocess_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
    """Size of the image with its longer side resized to ``long_side`` (SAM's rounding: half up)."""
    scale = long_side / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def preprocess(image: torch.Tensor, img_size: int, mean=PIXEL_MEAN, std=PIXEL_STD):
    """ComfyUI IMAGE ``[B, H, W, C]`` (0..1) → SAM input ``[B, 3, img_size, img_size]`` and the
    resized size ``(h, w)`` before padding."""
    if image.dim() == 3:
        image = image[None]
    x = image[..., :3].float()
    if x.shape[-1] == 1:
        x = x.expand(*x.shape[:-1], 3)
    x = x.permute(0, 3, 1, 2) * 255.0
    h, w = preprocess_shape(x.shape[-2], x.shape[-1], img_size)
    if (h, w) != tuple(x.shape[-2:]):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    x = (x - mean) / std
    return F.pad(x, (0, img_size - w, 0, img_size - h)), (h, w)


def transform_coords(coords: torch.Tensor, original_size: tuple[int, int], img_size: int) -> torch.Tensor:
    """Points ``[..., 2]`` (x, y) in pixels of the original image → pixels of the model input."""
    H, W = original_size
    h, w = preprocess_shape(H, W, img_size)
    out = coords.to(torch.float32).clone()
    out[..., 0] = out[..., 0] * (w / W)
    out[..., 1] = out[..., 1] * (h / H)
    return out


def transform_boxes(boxes: torch.Tensor, original_size: tuple[int, int], img_size: int) -> torch.Tensor:
    """Boxes ``[..., 4]`` (x0, y0, x1, y1) in pixels of the original image → model input pixels."""
    return transform_coords(boxes.reshape(*boxes.shape[:-1], 2, 2), original_size, img_size).reshape(boxes.shape)


def postprocess_masks(low_res: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int],
                      img_size: int) -> torch.Tensor:
    """Low-resolution logits ``[N, C, h, w]`` → logits ``[N, C, H, W]`` of the original image: upscale to
    the padded input, cut the padding off, resize to the original size (bilinear throughout)."""
    x = F.interpolate(low_res.float(), size=(img_size, img_size), mode="bilinear", align_corners=False)
    x = x[..., :input_size[0], :input_size[1]]
    return F.interpolate(x, size=tuple(original_size), mode="bilinear", align_corners=False)


def stability_score(logits: torch.Tensor, threshold: float = 0.0, offset: float = STABILITY_OFFSET) -> torch.Tensor:
    """SAM's stability score: IoU of the masks thresholded at ``threshold ± offset`` (over the last two
    dims)."""
    inner = (logits > threshold + offset).flatten(-2).sum(-1).float()
    outer = (logits > threshold - offset).flatten(-2).sum(-1).float()
    return torch.where(outer > 0, inner / outer.clamp(min=1), torch.zeros_like(outer))


def low_res_valid_size(low_res_size: int, input_size: tuple[int, int], img_size: int) -> tuple[int, int]:
    """Rows and columns of the low-resolution logits that cover the image (not the padding)."""
    f = img_size / low_res_size
    return min(low_res_size, math.ceil(input_size[0] / f)), min(low_res_size, math.ceil(input_size[1] / f))


def borders_touched(masks: torch.Tensor) -> torch.Tensor:
    """How many of the 4 image borders each binary mask ``[..., h, w]`` touches."""
    m = masks.bool()
    return (m[..., 0, :].any(-1).int() + m[..., -1, :].any(-1).int()
            + m[..., :, 0].any(-1).int() + m[..., :, -1].any(-1).int())


def pick_largest_object(low_res: torch.Tensor, iou: torch.Tensor, valid_size: tuple[int, int],
                        threshold: float = 0.0, min_iou: float = LARGEST_MIN_IOU,
                        min_stability: float = LARGEST_MIN_STABILITY, max_borders: int = 2):
    """The "largest object" rule, on the decoder's low-resolution logits ``[N, C, h, w]`` (N grid
    prompts, C masks each) and predicted IoUs ``[N, C]``, cropped to ``valid_size`` (the image part):

    1. a candidate is *confident*: predicted IoU ≥ ``min_iou`` and stability score ≥ ``min_stability``
       (SamAutomaticMaskGenerator's filters, 0.88 and 0.95 with offset 1.0);
    2. it is an *object*, not the background: it touches at most ``max_borders`` of the image's four
       borders (a subject cut off at the bottom touches one or two; the background around it three or
       four) and is not empty;
    3. the candidate with the largest area wins (ties: the higher predicted IoU).

    Returns ``(prompt index, mask index, area fraction)`` or None when no candidate passes."""
    vh, vw = valid_size
    logits = low_res[..., :vh, :vw]
    binary = logits > threshold
    area = binary.flatten(-2).sum(-1).float()
    ok = ((iou >= min_iou) & (stability_score(logits, threshold) >= min_stability)
          & (borders_touched(binary) <= max_borders) & (area > 0))
    if not bool(ok.any()):
        return None
    score = torch.where(ok, area + iou.float().clamp(0, 1) * 0.5, torch.full_like(area, -1.0))
    flat = int(score.flatten().argmax())
    n, c = divmod(flat, iou.shape[1])
    return n, c, float(area[n, c]) / (vh * vw)


# ---------------------------------------------------------------------------------------------
# Prompts: parsing and checking
# ---------------------------------------------------------------------------------------------

_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"


def _numbers(text: str, name: str, what: str) -> list[float]:
    parts = [p.strip() for p in text.split(",")]
    if any(not re.fullmatch(_NUM, p) for p in parts):
        raise ValueError(f"{name}: could not read {text.strip()!r} as {what}; write numbers separated by commas")
    return [float(p) for p in parts]


def parse_points(text: str | None, name: str = "points") -> list[tuple[float, float]]:
    """``"x,y; x,y"`` (``;`` or new lines between points) → ``[(x, y), ...]``; empty text → ``[]``."""
    text = (text or "").strip()
    if not text:
        return []
    out = []
    for part in re.split(r"[;\n]+", text):
        if not part.strip():
            continue
        nums = _numbers(part.strip().strip("()[]"), name, "a point 'x,y'")
        if len(nums) != 2:
            raise ValueError(f"{name}: {part.strip()!r} has {len(nums)} numbers; a point is 'x,y' and points "
                             f"are separated by ';', e.g. '250,300; 120,80'")
        out.append((nums[0], nums[1]))
    return out


def parse_box(text: str | None, name: str = "box") -> tuple[float, float, float, float] | None:
    """``"x0,y0,x1,y1"`` (left, top, right, bottom) → a tuple; empty text → None."""
    text = (text or "").strip().strip("()[]")
    if not text:
        return None
    nums = _numbers(text, name, "a box 'x0,y0,x1,y1'")
    if len(nums) != 4:
        raise ValueError(f"{name}: {text!r} has {len(nums)} numbers; a box is 'x0,y0,x1,y1' (left, top, right, "
                         f"bottom)")
    x0, y0, x1, y1 = nums
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"{name}: {text!r} is not a box 'x0,y0,x1,y1' with x0 < x1 and y0 < y1 (left, top, right, "
                         f"bottom)")
    return x0, y0, x1, y1


@dataclass(frozen=True)
class Prompts:
    """Checked prompts in pixels of the original image."""
    mode: str
    points: tuple[tuple[float, float], ...] = ()
    labels: tuple[int, ...] = ()           # 1 positive, 0 negative
    box: tuple[float, float, float, float] | None = None
    extra_boxes: tuple[tuple[float, float, float, float], ...] = ()    # more boxes: one mask each, united

    @property
    def boxes(self) -> tuple[tuple[float, float, float, float], ...]:
        return () if self.box is None else (self.box,) + self.extra_boxes


def _to_pixels(values, size, units, name):
    if units == "fractions":
        for v in values:
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name}: {v:g} is not a fraction in 0..1 (units is 'fractions'); use units "
                                 f"'pixels' for pixel coordinates")
        return [v * s for v, s in zip(values, size)]
    return list(values)


def _check_connected(mode: str, given_points, given_negative, given_boxes) -> None:
    """A prompt connected from another node that ``mode`` would not use is an error, not ignored."""
    if given_boxes is not None and mode not in ("box", "points + box"):
        raise ValueError(f"bboxes: boxes are connected but mode {mode!r} uses no box; choose mode 'box' or "
                         f"'points + box', or disconnect bboxes")
    for name, given in (("positive_coords", given_points), ("negative_coords", given_negative)):
        if given is not None and mode not in ("points", "points + box"):
            raise ValueError(f"{name}: points are connected but mode {mode!r} uses no points; choose mode "
                             f"'points' or 'points + box', or disconnect {name}")


def make_prompts(mode: str, points: str = "", negative_points: str = "", box: str = "", height: int = 1,
                 width: int = 1, units: str = "pixels", *, given_points=None, given_negative=None,
                 given_boxes=None) -> Prompts:
    """Parse and check the prompts of ``mode`` for an image of ``height`` x ``width``. Coordinates are
    pixels from the top-left corner (``x`` in 0..width, ``y`` in 0..height), or fractions of the width
    and height with ``units='fractions'``. Inputs the mode does not use are ignored.

    ``given_points`` / ``given_negative`` (points ``(x, y)``) and ``given_boxes`` (boxes ``(x0, y0, x1,
    y1)``), in pixels and already checked against the image (``core_prompts``), are prompts connected from
    other nodes: each replaces its text input (``points``, ``negative_points``, ``box``); ``units`` does
    not apply to them. A connected prompt that ``mode`` does not use is an error."""
    if mode not in MODES:
        raise ValueError(f"mode: unknown {mode!r}; choose one of {', '.join(MODES)}")
    if units not in UNITS:
        raise ValueError(f"units: unknown {units!r}; choose 'pixels' or 'fractions'")
    _check_connected(mode, given_points, given_negative, given_boxes)
    if mode == "largest object":
        return Prompts(mode)
    unit = "pixels" if units == "pixels" else "fractions of the image size"
    pts, labels, bx, more = [], [], None, ()
    if mode in ("points", "points + box"):
        pos = parse_points(points, "points") if given_points is None else None
        neg = parse_points(negative_points, "negative_points") if given_negative is None else None
        for label, given in ((1, given_points), (0, given_negative)):
            for x, y in given or ():
                pts.append((float(x), float(y)))
                labels.append(label)
        for label, name, group in ((1, "points", pos or ()), (0, "negative_points", neg or ())):
            for x, y in group:
                px, py = _to_pixels((x, y), (width, height), units, name)
                if not (0 <= px <= width and 0 <= py <= height):
                    raise ValueError(f"{name}: point ({x:g}, {y:g}) lies outside the {width}x{height} image "
                                     f"(coordinates are {unit} from the top-left corner)")
                pts.append((px, py))
                labels.append(label)
        if mode == "points" and not (pos or given_points):
            if given_points is not None:
                raise ValueError("positive_coords: mode 'points' needs at least one positive point; the connected "
                                 "points are empty")
            raise ValueError("points: mode 'points' needs at least one positive point, e.g. '250,300' or "
                             "'250,300; 120,80' (pixels of the input image, from the top-left corner)")
        if mode == "points + box" and not pts:
            raise ValueError("points: mode 'points + box' needs at least one point (in points or "
                             "negative_points); use mode 'box' for a box alone")
    if mode in ("box", "points + box") and given_boxes is not None:
        if not given_boxes:
            raise ValueError(f"bboxes: mode {mode!r} needs a box; the connected boxes are empty")
        boxes = tuple(tuple(float(v) for v in b) for b in given_boxes)
        return Prompts(mode, tuple(pts), tuple(labels), boxes[0], boxes[1:])
    if mode in ("box", "points + box"):
        b = parse_box(box, "box")
        if b is None:
            raise ValueError(f"box: mode '{mode}' needs a box 'x0,y0,x1,y1' (left, top, right, bottom in {unit})")
        x0, y0, x1, y1 = _to_pixels(b, (width, height, width, height), units, "box")
        if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
            raise ValueError(f"box: ({', '.join(f'{v:g}' for v in b)}) lies outside the {width}x{height} image; "
                             f"x must be in 0..{width if units == 'pixels' else 1}, y in "
                             f"0..{height if units == 'pixels' else 1} ({unit} from the top-left corner)")
        bx = (x0, y0, x1, y1)
    return Prompts(mode, tuple(pts), tuple(labels), bx, more)


# ---------------------------------------------------------------------------------------------
# Running the network
# ---------------------------------------------------------------------------------------------

def grid_points(n: int, height: int, width: int) -> torch.Tensor:
    """``n x n`` points at the centres of a regular grid over the image, in pixels ``[n*n, 2]``."""
    t = (torch.arange(n, dtype=torch.float32) + 0.5) / n
    ys, xs = torch.meshgrid(t * height, t * width, indexing="ij")
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1)


@torch.inference_mode()
def encode_image(sam: SamModel, image: torch.Tensor):
    """One image ``[H, W, C]`` (0..1) → (image embedding ``[1, C, h, w]``, resized input size)."""
    net = sam.net
    x, input_size = preprocess(image.to(sam.device), sam.img_size,
                               net.pixel_mean.flatten().tolist(), net.pixel_std.flatten().tolist())
    return net.image_encoder(x), input_size


@torch.inference_mode()
def decode(sam: SamModel, embedding: torch.Tensor, coords=None, labels=None, boxes=None, multimask=True):
    """Decoder on one image embedding. ``coords [N, P, 2]`` / ``labels [N, P]`` / ``boxes [N, 4]`` in model
    input pixels → low-resolution logits ``[N, C, h, w]`` and predicted IoUs ``[N, C]``."""
    net = sam.net
    points = None
    if coords is not None:
        points = (coords.to(sam.device, torch.float32), labels.to(sam.device, torch.int64))
    if boxes is not None:
        boxes = boxes.to(sam.device, torch.float32)
    sparse, dense = net.prompt_encoder(points=points, boxes=boxes, masks=None)
    return net.mask_decoder(image_embeddings=embedding, image_pe=net.prompt_encoder.get_dense_pe(),
                            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                            multimask_output=multimask)


def use_multimask(option: str, prompts: Prompts) -> bool:
    """``auto`` follows SAM's advice: three candidate masks for a single point (ambiguous), one mask
    for a box or several points."""
    if option not in MULTIMASK:
        raise ValueError(f"multimask: unknown {option!r}; choose one of {', '.join(MULTIMASK)}")
    if option == "auto":
        return prompts.box is None and len(prompts.points) == 1
    return option == "best of 3"


def segment_image(sam: SamModel, image: torch.Tensor, prompts: Prompts, multimask: str = "auto",
                  threshold: float = 0.0, grid: int = 8, min_iou: float = LARGEST_MIN_IOU,
                  min_stability: float = LARGEST_MIN_STABILITY, max_borders: int = 2, chunk: int = 32,
                  check_interrupt: Callable[[], None] | None = None) -> torch.Tensor:
    """A binary mask ``[H, W]`` (float 0/1, on the model's device) of one image ``[H, W, C]``."""
    H, W = int(image.shape[0]), int(image.shape[1])
    S = sam.img_size
    embedding, input_size = encode_image(sam, image)
    if prompts.mode == "largest object":
        pts = transform_coords(grid_points(grid, H, W), (H, W), S)
        best = None   # (score, low-res logits [1, h, w])
        for start in range(0, pts.shape[0], chunk):
            if check_interrupt is not None:
                check_interrupt()
            c = pts[start:start + chunk, None, :]
            low, iou = decode(sam, embedding, c, torch.ones(c.shape[:2], dtype=torch.int64), None, True)
            valid = low_res_valid_size(low.shape[-1], input_size, S)
            pick = pick_largest_object(low, iou, valid, threshold, min_iou, min_stability, max_borders)
            if pick is not None:
                n, k, area = pick
                key = (area, float(iou[n, k]))
                if best is None or key > best[0]:
                    best = (key, low[n, k][None, None].clone())
        if best is None:
            raise ValueError(f"mode 'largest object': SAM found no confident object in the image (a {grid}x{grid} "
                             f"grid of points, masks with predicted IoU >= {min_iou:g} and stability >= "
                             f"{min_stability:g} touching at most {max_borders} image borders); give points or a box, or "
                             f"lower min_confidence")
        low_best = best[1]
    else:
        # one decoder row per box (the points repeated on each); the masks of several boxes are united
        rows = max(1, len(prompts.boxes))
        coords = labels = boxes = None
        if prompts.points:
            coords = transform_coords(torch.tensor(prompts.points)[None], (H, W), S).expand(rows, -1, -1)
            labels = torch.tensor(prompts.labels)[None].expand(rows, -1)
        if prompts.boxes:
            boxes = transform_boxes(torch.tensor(prompts.boxes), (H, W), S)
        low, iou = decode(sam, embedding, coords, labels, boxes, use_multimask(multimask, prompts))
        k = iou.argmax(dim=1)
        low_best = low[torch.arange(rows), k][:, None]
    logits = postprocess_masks(low_best, input_size, (H, W), S)
    return (logits[:, 0] > threshold).any(dim=0).float()
