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


def subfolders(name: str) -> list[str]:
    """The names of the model folders (directories, e.g. Hugging Face model folders) inside every path
    of ``models/<name>``, sorted."""
    out = set()
    for root in folder_paths.get_folder_paths(name):
        if os.path.isdir(root):
            out.update(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    return sorted(out)


def find_subfolder(name: str, sub: str) -> str | None:
    """The path of directory ``sub`` in the first path of ``models/<name>`` that has it, else None."""
    if not sub or os.path.basename(sub) != sub or sub in (".", ".."):
        return None
    for root in folder_paths.get_folder_paths(name):
        path = os.path.join(root, sub)
        if os.path.isdir(path):
            return path
    return None
