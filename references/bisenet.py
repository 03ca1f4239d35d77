"""The bisenet provider of the face attribute masks: the 19-class CelebAMask-HQ face parser used by
FreeCure (BiSeNet with a ResNet-18 context path, ``zllrunning/face-parsing.PyTorch``, file
``79999_iter.pth``), its file reading and the parsing.

The network is written here with the parameter names of the official file, which loads exactly. The file is
read through ``files.checkpoints`` (tensors only). Pre-processing as FreeCure: the image resized to 512x512
(bilinear, antialiased when shrinking, like PIL's), ImageNet mean/std, argmax of the main head's logits; the
labels are resized back to the image size (nearest). Pure torch; nothing here imports ComfyUI.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..files.checkpoints import flat_state_dict, read_checkpoint
from .face_attributes import (
    BISENET_LABELS,
    FACE_LABELS,
    MIN_FACE_FRACTION,
    NoFaceError,
    bisenet_labels_for,
    check_image,
    check_supported,
    no_face_message,
)

log = logging.getLogger(__name__)


OFFICIAL_FILE = "79999_iter.pth"
OFFICIAL_URL = "https://drive.google.com/open?id=154JgKpzCPW82qINcVieuPH3fZ2e0P812"
REPO_URL = "https://github.com/zllrunning/face-parsing.PyTorch"
NUM_CLASSES = len(BISENET_LABELS)
INPUT_SIZE = 512
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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



def memory_estimate(batch_chunk: int = 4) -> int:
    """Working memory of one BiSeNet chunk: about 64 float32 planes of 512x512 per image (the ResNet
    stem's activations, the 19 upsampled logits and the argmax)."""
    return int(batch_chunk * INPUT_SIZE ** 2 * 4 * 64)

