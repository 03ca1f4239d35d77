"""The world's ComfyUI checkpoint, assembled from the committed parts: the 64-channel UNet embedded
in SD1.5's layout, the TAESD-format VAE under ``first_stage_model.`` and the seeded CLIP-L. The file
loads with CheckpointLoaderSimple as an SD1.5 model."""
from __future__ import annotations

import json
from pathlib import Path

from ..files.atomic import atomic_save_safetensors
from ..files.checkpoints import read_checkpoint
from . import text, unet

WEIGHTS = Path(__file__).resolve().parent / "weights"
UNET_FILE = "world_unet.safetensors"
VAE_FILE = "world_vae.safetensors"
SCORER_FILE = "world_scorer.safetensors"
CHECKPOINT_NAME = "personalize_world.safetensors"
VAE_PREFIX = "first_stage_model."


def read_part(name: str, folder: Path = WEIGHTS) -> dict:
    path = Path(folder) / name
    if not path.is_file():
        raise FileNotFoundError(f"the world's {name} is missing from {folder}; train it with "
                                f"'python tools/world.py train' or restore it from the repository")
    return read_checkpoint(path, error=ValueError, redo="restore it from the repository")


def state_dict(folder: Path = WEIGHTS) -> dict:
    """Every tensor of the world checkpoint under SD1.x key names (fp16)."""
    sd = {unet.PREFIX + k: v for k, v in unet.embed(read_part(UNET_FILE, folder)).items()}
    sd.update({VAE_PREFIX + k: v.half() for k, v in read_part(VAE_FILE, folder).items()})
    sd.update(text.clip_state_dict())
    return sd


def build(path: Path, folder: Path = WEIGHTS, overwrite: bool = False) -> Path:
    """Write the checkpoint to ``path`` (atomically); an existing file is kept unless ``overwrite`` or
    one of the parts in ``folder`` is newer than it (new weights pulled or trained since it was built)."""
    path = Path(path)
    if not overwrite and not needs_build(path, folder):
        return path
    meta = {"modelspec.title": "Personalize world (tiny SD1.x-layout model of synthetic shapes)",
            "personalize.world": json.dumps({"unet": UNET_FILE, "vae": VAE_FILE, "clip_seed": text.CLIP_SEED})}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(path, state_dict(folder), metadata=meta)
    return path


def needs_build(path: Path, folder: Path = WEIGHTS) -> bool:
    """Whether the checkpoint at ``path`` is missing or older than the parts in ``folder``."""
    return not Path(path).exists() or stale(path, folder)


def stale(path: Path, folder: Path = WEIGHTS) -> bool:
    """Whether a part of the world in ``folder`` was written after the checkpoint at ``path``."""
    built = Path(path).stat().st_mtime
    return any((Path(folder) / name).is_file() and (Path(folder) / name).stat().st_mtime > built
               for name in (UNET_FILE, VAE_FILE))


def check_loadable(path: Path):
    """Load the file as ComfyUI's CheckpointLoaderSimple does; return (model, clip, vae)."""
    import comfy.sd
    model, clip, vae_, _ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)
    return model, clip, vae_

