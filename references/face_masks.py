"""Face attribute masks for FreeCure: a binary mask of the facial attributes named in a prompt (hair,
eyes, glasses, ...) on the foundation image, from one of two providers.

* **mediapipe** (default, ``face_mesh.py``): MediaPipe Face Mesh landmarks and polygons through them;
  no model file, face features only.
* **bisenet** (``bisenet.py``): the 19-class CelebAMask-HQ face parser used by FreeCure; also hair, hat,
  glasses, ears, neck and clothes.

The mediapipe provider takes ComfyUI core's face landmarks instead when they are given
(``face_landmarks.py``): the same polygons, and no mediapipe package needed.

The attribute names and shared mask helpers are in ``face_attributes.py``. This module is the dispatcher:
it checks the options, runs the provider and grows the masks. Nothing here imports ComfyUI.
"""
from __future__ import annotations

from typing import Callable

import torch

from .bisenet import OFFICIAL_FILE, FaceParser, bisenet_masks
from .face_attributes import FACES, IF_NO_FACE, check_image, check_supported, grow_mask
from .face_landmarks import CORE_NODE, landmark_masks
from .face_mesh import import_solutions, mediapipe_masks

CORE_MODEL_URL = "https://huggingface.co/Comfy-Org/mediapipe/resolve/main/detection/mediapipe_face_fp32.safetensors"


def require_landmarks_or_mediapipe() -> None:
    """Without core's landmarks the mediapipe provider needs the mediapipe package: when it cannot be
    imported, the error says both ways to go on."""
    try:
        import_solutions()
    except ImportError as exc:
        raise ImportError(f"face_landmarks: the mediapipe provider needs face landmarks. Either connect core's "
                          f"'{CORE_NODE}' node to face_landmarks (ComfyUI 0.33 or later, no extra package; its "
                          f"loader 'Load Face Detection Model (MediaPipe)' reads mediapipe_face_fp32.safetensors "
                          f"from models/detection, {CORE_MODEL_URL}), or install the mediapipe package. {exc}") from None


def face_attribute_masks(image: torch.Tensor, attributes, provider: str = "mediapipe",
                         parser: FaceParser | None = None, faces: str = "largest", if_no_face: str = "error",
                         grow: int = 0, check_interrupt: Callable[[], None] | None = None,
                         progress: Callable[[int], None] | None = None, landmarks=None) -> torch.Tensor:
    """The attribute masks ``[B, H, W]`` (float 0/1, the image's size) of an image batch: checks the
    options, runs the provider, grows (or shrinks) the masks by ``grow`` pixels. ``landmarks``: core's
    FACE_LANDMARKS, which the mediapipe provider draws through instead of running mediapipe."""
    shape = check_image(image)
    if faces not in FACES:
        raise ValueError(f"faces: unknown {faces!r}; use one of {', '.join(FACES)}")
    if if_no_face not in IF_NO_FACE:
        raise ValueError(f"if_no_face: unknown {if_no_face!r}; use one of {', '.join(IF_NO_FACE)}")
    if not attributes:
        raise ValueError("attributes: no attribute to mask")
    check_supported(attributes, provider)
    if provider == "mediapipe" and landmarks is not None:
        masks = landmark_masks(landmarks, shape, attributes, faces, if_no_face, check_interrupt, progress)
    elif provider == "mediapipe":
        require_landmarks_or_mediapipe()
        masks = mediapipe_masks(image, attributes, faces, if_no_face, check_interrupt, progress)
    else:
        if parser is None:
            raise ValueError("face_parser: the bisenet provider needs a face parser; connect Face Parsing Loader "
                             f"(BiSeNet) with {OFFICIAL_FILE} (or use the mediapipe provider, which needs no file)")
        masks = bisenet_masks(parser, image, attributes, if_no_face, check_interrupt, progress)
    return grow_mask(masks, grow) if grow else masks

