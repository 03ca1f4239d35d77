"""Face attributes: the vocabulary of the Face Attribute Mask node (the attribute names, their other
spellings, the prompt words that name them, what each provider can draw), and the mask helpers both
providers share (growing, the preview overlay, the image check, the "no face" error).

Pure torch / numpy; nothing here imports ComfyUI or mediapipe.
"""
from __future__ import annotations

import re

import numpy as np
import torch
import torch.nn.functional as F

PROVIDERS = ("mediapipe", "bisenet")
FACES = ("largest", "all")
IF_NO_FACE = ("error", "empty mask")
FROM_PROMPT = "from prompt"
MIN_FACE_FRACTION = 0.001       # below this share of BiSeNet face labels an image counts as having no face

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
