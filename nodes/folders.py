"""The model folders the pack's loaders read, registered with ComfyUI the way other packs register
theirs (so ``extra_model_paths.yaml`` entries work), and their paths for error messages."""
from __future__ import annotations

import os

import folder_paths


def register_folder(name: str) -> str:
    """Register ``models/<name>`` unless ComfyUI or another pack already did; returns ``name``."""
    if name not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[name] = ([os.path.join(folder_paths.models_dir, name)],
                                                     folder_paths.supported_pt_extensions)
    return name


def folder_list(name: str) -> str:
    """The folder's paths, comma-separated, for messages that say where a file belongs."""
    return ", ".join(folder_paths.get_folder_paths(name)) or os.path.join(folder_paths.models_dir, name)
