"""The native-reference examples' own inputs: the two target regions (the left and the right half of a
square picture, white = the region) as PNG images, and the second person of the Qwen-Image-Edit example,
scikit-image's CC0 "camera" photograph, as an RGB JPEG. Deterministic: the regions are drawn, the photo is
converted the same way on every machine (written only when scikit-image is there and the file is not)."""
from __future__ import annotations

from pathlib import Path

from .settings import INPUTS

REGIONS = {"personalize_region_left.png": 0, "personalize_region_right.png": 1}
CAMERAMAN = "personalize_cameraman.jpg"
SIZE = 512


def write_native_inputs(folder: Path = INPUTS) -> list[Path]:
    """Write the region masks (and the second person's photo, see the module docstring); returns the files written."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, half in REGIONS.items():
        im = Image.new("L", (SIZE, SIZE), 0)
        ImageDraw.Draw(im).rectangle((half * SIZE // 2, 0, (half + 1) * SIZE // 2 - 1, SIZE - 1), fill=255)
        im.save(folder / name, optimize=False)
        written.append(folder / name)
    if not (folder / CAMERAMAN).is_file():
        try:
            import skimage.data
        except ImportError:
            print(f"scikit-image is not installed: {CAMERAMAN} was not written")
            return written
        Image.fromarray(skimage.data.camera()).convert("RGB").save(folder / CAMERAMAN, quality=92)
        written.append(folder / CAMERAMAN)
    return written
