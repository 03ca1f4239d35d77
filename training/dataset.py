"""Training data from the nodes' inputs, checked: the subjects of a Seg-Mix data set (one per Seg-Mix
Dataset node) and Infusion's photos and masks. Every problem is a ``ValueError`` that names the input."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..references.compose import make_subject
from ..references.masks import as_mask_batch
from .segmix import cover_resize


@dataclass(frozen=True)
class DatasetSubject:
    identifier: str
    phrase: str
    images: torch.Tensor     # [N, H, W, 3]
    masks: torch.Tensor      # [N, H, W]
    captions: tuple


def dataset_from_inputs(images, masks, phrase: str, captions: str, identifier: str = "", previous=None) -> tuple:
    """``previous`` (a tuple of subjects, or None) plus the subject of these photos, masks and captions
    (one line for all, or one per photo; ``{}`` stands for the phrase)."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] < 1 or images.shape[-1] < 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images: expected a ComfyUI IMAGE [B,H,W,3] with at least one image, got {shape}")
    n = images.shape[0]
    check_finite(images, "images", "image")
    check_finite(masks, "masks", "mask")
    m = as_mask_batch(masks, "masks")
    if m.shape[0] not in (1, n):
        raise ValueError(f"masks: {m.shape[0]} masks for {n} images; give one mask per image (or one for all)")
    if tuple(m.shape[-2:]) != tuple(images.shape[1:3]):
        raise ValueError(f"masks: {m.shape[-1]}x{m.shape[-2]} masks for {images.shape[2]}x{images.shape[1]} images; "
                         f"each mask must have its image's size")
    m = m.expand(n, -1, -1) if m.shape[0] == 1 else m
    empty = [i + 1 for i in range(n) if float((m[i] > 0.5).sum()) == 0]
    phrase = str(phrase or "").strip()
    if empty:
        which = ", ".join(str(i) for i in empty)
        raise ValueError(f"masks: the mask of image {which} of {n}{' (' + repr(phrase) + ')' if phrase else ''} is "
                         f"empty (no pixel above 0.5): Seg-Mix cuts the subject out with it; give each photo the "
                         f"mask of its subject")
    if not phrase:
        raise ValueError("phrase: give the subject's placeholder phrase, e.g. 'olis monster toy'")
    ident = str(identifier or "").strip() or phrase.split()[0]
    lines = [ln.strip() for ln in str(captions or "").splitlines() if ln.strip()] or ["a photo of {}"]
    if len(lines) not in (1, n):
        raise ValueError(f"captions: {len(lines)} lines for {n} images; give one line for all (with '{{}}' for the "
                         f"phrase) or one per image")
    caps = tuple((lines[i] if len(lines) == n else lines[0]).replace("{}", phrase) for i in range(n))
    prev = tuple(previous or ())
    if any(s.identifier == ident for s in prev):
        raise ValueError(f"identifier: {ident!r} is already in the dataset; give each subject its own identifier")
    return prev + (DatasetSubject(ident, phrase, images[..., :3].float().cpu(), (m > 0.5).float().cpu(), caps),)


def check_finite(batch: torch.Tensor, input_name: str, item: str) -> None:
    """A ``ValueError`` naming the input and the items (1-based) that hold NaN or infinite values."""
    if not isinstance(batch, torch.Tensor) or not batch.is_floating_point():
        return
    bad = (~torch.isfinite(batch)).flatten(1).any(1) if batch.dim() > 2 else (~torch.isfinite(batch)).any()[None]
    if bool(bad.any()):
        which = ", ".join(str(i + 1) for i in torch.nonzero(bad).flatten().tolist())
        raise ValueError(f"{input_name}: {item} {which} of {bad.numel()} contains NaN or infinite values; give "
                         f"{input_name} with finite values (0..1)")


def check_segmix_dataset(dataset, segmix_prob: float) -> None:
    """A data set the Seg-Mix LoRA can train on: subjects from Seg-Mix Dataset nodes, two or more when
    Seg-Mix composes pairs."""
    if not dataset or not all(isinstance(s, DatasetSubject) for s in dataset):
        raise ValueError("dataset: connect Seg-Mix Dataset (MuDI) nodes (at least one subject)")
    if segmix_prob > 0 and len(dataset) < 2:
        raise ValueError("segmix_prob: Seg-Mix composes two different subjects; chain a second Seg-Mix Dataset "
                         "node, or set segmix_prob to 0 to train one subject")


def infusion_data_from_inputs(images, masks, concept_word, resolution: int) -> tuple[str, torch.Tensor, torch.Tensor]:
    """``(word, photos [N, S, S, 3], soft masks [N, S, S])`` for Infusion: the photos and masks (none:
    the whole image counts) resized to cover ``resolution`` pixels and centre-cropped, each mask
    divided by its maximum as the official dataset does."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] < 1:
        raise ValueError("images: expected a ComfyUI IMAGE batch with at least one photo")
    word = str(concept_word or "").strip()
    if not word:
        raise ValueError("concept_word: give the concept's super-class word, e.g. 'cat'")
    n = images.shape[0]
    if masks is None:
        m = torch.ones(n, images.shape[1], images.shape[2])
    else:
        check_finite(masks, "masks", "mask")
        m = as_mask_batch(masks, "masks")
        if m.shape[0] not in (1, n) or tuple(m.shape[-2:]) != tuple(images.shape[1:3]):
            raise ValueError(f"masks: {m.shape[0]} masks of {m.shape[-1]}x{m.shape[-2]} for {n} images of "
                             f"{images.shape[2]}x{images.shape[1]}; give one mask per image, of its size")
        m = m.expand(n, -1, -1) if m.shape[0] == 1 else m
    check_finite(images, "images", "image")
    for i in range(n):
        make_subject(images[i], torch.ones_like(m[i]), f"image {i + 1}")          # checks the pixels
    size = int(resolution)
    imgs = torch.stack([cover_resize(images[i, ..., :3].float(), size) for i in range(n)])
    msks = torch.stack([cover_resize(m[i, ..., None].float(), size)[..., 0] for i in range(n)])
    # the official dataset divides each resized soft mask by its maximum (infusion/dataset.py:
    # ``mask / mask.max()``), so a faint CLIPSeg mask still weighs its strongest pixel 1
    peak = msks.flatten(1).amax(1)
    empty = [i + 1 for i in range(n) if not float(peak[i]) > 0]
    if empty:
        which = ", ".join(str(i) for i in empty)
        raise ValueError(f"masks: the mask of image {which} of {n} is empty (all zero) after resizing to {size} px; "
                         f"every photo needs some of its concept inside its mask")
    return word, imgs, msks / peak[:, None, None]
