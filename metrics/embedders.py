"""The embedders Detect-and-Compare can use, chosen by what a folder holds: DreamSim's ensemble
(``metrics/dreamsim.py``, MuDI's "D&C-DS", the published metric) or DINOv2 through transformers (MuDI's
"D&C-DINO" variant: the mean of ``last_hidden_state`` over all tokens, 768-d for dinov2-base).
Pure torch at module level; transformers is imported only for a DINOv2 folder."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .detect_compare import image_to_pil
from .models import EvalModelError, download_hint

DINOV2_FOLDER = "dinov2-base"
DINOV2_URL = "https://huggingface.co/facebook/dinov2-base"


class DinoV2Embedder:
    """``Dinov2Model`` + its image processor from a local Hugging Face folder; ``embed`` gives the mean
    of the last hidden state over every token (CLS and patches) of each image."""

    def __init__(self, model, processor, name: str):
        self.model, self.processor, self.name = model, processor, name

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device) -> "DinoV2Embedder":
        self.model.to(device)
        return self

    @torch.no_grad()
    def embed(self, images, batch: int = 16) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            images = list(images if images.dim() == 4 else images[None])
        if len(images) == 0:
            raise ValueError("images: nothing to embed")
        pils = [image_to_pil(img) for img in images]
        rows = []
        for i in range(0, len(pils), batch):
            inputs = self.processor(images=pils[i:i + batch], return_tensors="pt").to(self.device)
            rows.append(self.model(**inputs).last_hidden_state.mean(dim=1).float().cpu())
        return torch.cat(rows)


def folder_model_type(folder: Path) -> str | None:
    """The ``model_type`` of a Hugging Face folder's ``config.json``, or None when there is none."""
    cfg = folder / "config.json"
    if not cfg.is_file():
        return None
    try:
        return json.loads(cfg.read_text()).get("model_type")
    except (OSError, ValueError) as exc:
        raise EvalModelError(f"{cfg} is not readable JSON ({exc})") from None


def load_dinov2(folder: str | os.PathLike) -> DinoV2Embedder:
    folder = Path(folder)
    try:
        from transformers import AutoImageProcessor, Dinov2Model
    except ImportError as exc:
        raise ImportError(f"the DINOv2 embedder needs transformers (pip install transformers; ComfyUI brings it): "
                          f"{exc}") from exc
    if not any((folder / f).is_file() for f in ("model.safetensors", "pytorch_model.bin")):
        raise EvalModelError(f"{folder} has no model.safetensors or pytorch_model.bin; download every file of "
                             f"{DINOV2_URL} into it")
    if not any((folder / f).is_file() for f in ("preprocessor_config.json", "processor_config.json")):
        raise EvalModelError(f"{folder} has no preprocessor_config.json; download every file of {DINOV2_URL} "
                             f"into it")
    model = Dinov2Model.from_pretrained(str(folder), local_files_only=True).eval().float()
    processor = AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
    return DinoV2Embedder(model, processor, folder.name)


def load_embedder(folder: str | os.PathLike):
    """DINOv2 for a Hugging Face folder whose config says ``dinov2``, DreamSim's ensemble otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EvalModelError(f"the embedder folder {folder} does not exist. {download_hint('dreamsim')}; or "
                             f"DINOv2 ({DINOV2_URL}) in a folder {DINOV2_FOLDER}")
    kind = folder_model_type(folder)
    if kind == "dinov2":
        return load_dinov2(folder)
    if kind is not None:
        raise EvalModelError(f"{folder} holds a {kind!r} model; Detect-and-Compare embeds with DreamSim's ensemble "
                             f"or DINOv2 ({DINOV2_URL})")
    from .dreamsim import load_dreamsim          # numpy and PIL: only for a DreamSim folder
    return load_dreamsim(folder)
