"""The world examples' input images: each subject of ``settings.WORLD_SUBJECTS`` drawn by the world's own
scene generator (world/data.py) as the only object of a 128x128 scene, saved as a PNG image and a PNG mask
(white on the subject). Deterministic: each subject's scene comes from a generator seeded with the file's
name, so the files are the same on every machine and whatever the order they are made in."""
from __future__ import annotations

import zlib
from pathlib import Path

from pack_import import import_pack

from .settings import INPUTS, WORLD_SUBJECTS, world_files

INPUT_SEED = 15                    # the issue that asked for the world's examples


def render_subject(subject: str):
    """(image uint8 [128, 128, 3], mask bool [128, 128]) of one subject, as shipped."""
    import numpy as np
    import_pack()
    from personalize_pack.world import data

    colour, pattern, shape = WORLD_SUBJECTS[subject]
    rng = np.random.default_rng([INPUT_SEED, zlib.crc32(world_files(subject)[0].encode())])
    image, masks = data.render(data.sample_scene(rng, attributes=[(colour, pattern, shape)]))
    return image, masks[0]


def write_world_inputs(folder: Path = INPUTS) -> list[Path]:
    """Write every subject's image and mask into ``folder``; returns the files written."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for subject in WORLD_SUBJECTS:
        image, mask = render_subject(subject)
        names = world_files(subject)
        Image.fromarray(image, "RGB").save(folder / names[0], optimize=False)
        Image.fromarray(mask.astype("uint8") * 255, "L").save(folder / names[1], optimize=False)
        written += [folder / n for n in names]
    return written
