"""The model files the pack's loaders read: their folders (registered with ComfyUI the way other packs
register theirs, so ``extra_model_paths.yaml`` entries work), the one message for a file that is not
there, and the device handling of what was loaded (ComfyUI's model patcher and model management)."""
from __future__ import annotations

import json
import os

import folder_paths

EVAL_FOLDER = "personalize_eval"     # the evaluation models: CLIP, DINO, OWLv2, DreamSim (files and folders)
EVAL_FILE_EXTENSIONS = (".bin", ".pth", ".pt", ".safetensors")   # what Evaluation Model Loader reads
# what each input of Detect-and-Compare Loader loads (a Hugging Face model_type, or "dreamsim"); an OWL-ViT
# (v1) folder is a detector folder too, refused by name by the detector's own loader
DC_LOADABLE = {"detector": ("owlv2",), "embedder": ("dinov2", "dreamsim")}
DC_FOLDER_TYPES = ("owlv2", "owlvit", "dinov2", "dreamsim")
DREAMSIM_MARKERS = ("ensemble_lora", "clip_vitb16_pretrain.pth.tar", "open_clip_vitb16_pretrain.pth.tar")


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


def eval_folder_kind(path) -> str | None:
    """The Detect-and-Compare model a folder of ``models/personalize_eval`` holds: its Hugging Face
    ``model_type`` when that is one of ``DC_FOLDER_TYPES`` ("owlv2", "owlvit", "dinov2"), ``"dreamsim"``
    for DreamSim's unzipped ensemble, or None (anything else, e.g. a folder of CLIP/DINO files for
    Evaluation Model Loader)."""
    if not path or not os.path.isdir(path):
        return None
    if any(os.path.exists(os.path.join(path, m)) for m in DREAMSIM_MARKERS):
        return "dreamsim"
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return model_type if model_type in DC_FOLDER_TYPES else None


def dc_folders(kind: str) -> list[str]:
    """The folders of ``models/personalize_eval`` that Detect-and-Compare Loader's ``kind`` input
    (``detector`` or ``embedder``) can load, sorted."""
    return [d for d in subfolders(EVAL_FOLDER) if eval_folder_kind(find_subfolder(EVAL_FOLDER, d)) in DC_LOADABLE[kind]]


def eval_model_files() -> list[str]:
    """The files of ``models/personalize_eval`` that Evaluation Model Loader can load: CLIP/DINO weight
    files, not the parts of a Detect-and-Compare model folder (OWLv2, DINOv2, DreamSim)."""
    return [f for f in folder_paths.get_filename_list(EVAL_FOLDER)
            if f.lower().endswith(EVAL_FILE_EXTENSIONS) and eval_file_owner(f) is None]


def eval_file_owner(name: str) -> str | None:
    """The Detect-and-Compare model folder (``models/personalize_eval/<folder>``) that file ``name`` is a
    part of, or None."""
    parts = name.replace("\\", "/").split("/")
    for depth in range(1, len(parts)):
        sub = "/".join(parts[:depth])
        for root in folder_paths.get_folder_paths(EVAL_FOLDER):
            if eval_folder_kind(os.path.join(root, sub)) is not None:
                return sub
    return None


def empty_folder_choice(folder: str) -> str:
    """What a loader's file combo shows (and the editor sends) when its folder holds no file. The
    editor sends no value at all for a combo without options and default, and ComfyUI then reports a
    bare "Required input is missing" (before this default, a crash in ``validate_inputs``); with this
    value the loader's ``validate_inputs`` says which folder is empty and what to put there."""
    return f"(no file in models/{folder})"


def file_default(files: list, folder: str, preferred=()) -> str:
    """The default of a loader's file combo: the first of ``preferred`` that is there, else the first
    file, else ``empty_folder_choice(folder)``."""
    return next((f for f in preferred if f in files), files[0] if files else empty_folder_choice(folder))


def missing_file_message(folder: str, name: str, hint: str, what: str = "file", subfolder: bool = False) -> str:
    """What a loader says when the chosen model is not in its folder: which name, which folder (with
    every path ComfyUI searches for it), then ``hint``: what to put there and where to get it.

    ``what`` names the kind of file when none was chosen ("no SAM checkpoint is in ..."); ``subfolder``
    is for models that are folders (Hugging Face layouts), not files. The loader prefixes its input's
    name where ComfyUI does not ("model_name: ...")."""
    if name == empty_folder_choice(folder):
        name = ""
    if subfolder:
        subject = f"no folder {name!r}" if name else "no model folder is"
    elif name:
        subject = f"{name!r} is not"
    else:
        subject = f"no {what} is"
    return f"{subject} in the {folder} folder ({folder_list(folder)}). {hint[:1].upper()}{hint[1:]}"


def model_patcher(extras: dict, net, holder: str | None = None):
    """ComfyUI's model patcher for a loaded network, made once and kept in ``extras["patcher"]``, so that
    ComfyUI's model management moves it to the device, frees memory for it and unloads it like any
    other model. ``extras["device"]`` is the loader's choice: ``auto`` (ComfyUI's device) or ``cpu``.
    ``holder``: hold ``net`` as this attribute of a plain module, for networks that define attributes
    the patcher sets (e.g. SAM's read-only ``device``)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import torch
    if "patcher" not in extras:
        load = mm.get_torch_device() if extras.get("device", "auto") == "auto" else torch.device("cpu")
        model = net
        if holder is not None:
            model = torch.nn.Module()
            setattr(model, holder, net)
        extras["patcher"] = comfy.model_patcher.CoreModelPatcher(model, load_device=load,
                                                                 offload_device=mm.unet_offload_device())
    return extras["patcher"]


def load_scorer(extras: dict, net, memory_required: int = 0):
    """Loads a scoring network through ComfyUI's model management, like any model: wrapped once in a
    model patcher (``model_patcher``, held as ``scorer`` so the network's own attributes stay untouched)
    and loaded with ``load_models_gpu``, so that "Unload models" and memory pressure free it. Returns the
    device it runs on."""
    import comfy.model_management as mm
    patcher = model_patcher(extras, net, holder="scorer")
    mm.load_models_gpu([patcher], memory_required=memory_required, force_full_load=True)
    if not on_device(net, patcher.load_device) and hasattr(mm, "unload_model_and_clones"):
        # moved behind the model management's back (another node's .to("cpu")): it still counts as
        # loaded, so unload it and load it again, which puts the weights back on the device
        mm.unload_model_and_clones(patcher)
        mm.load_models_gpu([patcher], memory_required=memory_required, force_full_load=True)
    return patcher.load_device


def on_device(net, device) -> bool:
    """Whether every parameter of ``net`` is on ``device`` ("cuda" and "cuda:0" alike)."""
    import torch
    want = torch.device(device)
    return all(p.device.type == want.type and (p.device.index or 0) == (want.index or 0) for p in net.parameters())
