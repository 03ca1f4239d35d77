"""The example workflows' input images, made available to ComfyUI's Load Image when the pack loads.

A template's Load Image nodes name images shipped in ``workflows/inputs/``. Core Load Image only lists
(and loads) files of ComfyUI's input folder, so the pack copies each shipped image there when that
folder lacks a file of the name, and never touches a file that is there: a user's own image of the same
name stays as it is. The copy runs once per start of ComfyUI and costs one ``stat`` per image after the
first start. A failure (a read-only input folder, a full disk) is logged and the pack loads all the same:
the templates then show the images as missing, as before.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from .copy_absent import copy_if_absent

EXAMPLE_INPUTS = Path(__file__).resolve().parents[1] / "workflows" / "inputs"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def example_images() -> list[Path]:
    """The shipped example images (the licence texts and credits beside them stay in the pack)."""
    if not EXAMPLE_INPUTS.is_dir():
        return []
    return sorted(p for p in EXAMPLE_INPUTS.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def install_example_inputs(input_dir: str | os.PathLike) -> list[str]:
    """Copy every shipped example image missing from ``input_dir`` (ComfyUI's input folder) into it;
    returns the names copied. Never overwrites, never raises (module docstring)."""
    folder = Path(input_dir)
    copied = []
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for image in example_images():
            if copy_if_absent(image, folder / image.name):
                copied.append(image.name)
    except OSError as exc:
        logging.warning("Personalize: could not copy the example workflows' images into %s (%s); the templates "
                        "will show them as missing. Copy them by hand from %s", folder, exc, EXAMPLE_INPUTS)
    if copied:
        logging.info("Personalize: copied %d example image(s) for the workflow templates into %s", len(copied), folder)
    return copied
