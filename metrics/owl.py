"""The OWLv2 open-vocabulary detector of MuDI's Detect-and-Compare (docs/metrics.md §3.2), run through
Hugging Face transformers (imported lazily) from a local folder in the Hub layout of
``google/owlv2-base-patch16-ensemble``. Pure torch at module level; no ComfyUI import.

MuDI's ``detect_and_crop`` (``detect_and_compare/owl_dreamsim_utils.py``) does, for one PIL image::

    inputs = processor(text=queries, images=img, return_tensors="pt")      # queries: a flat list of names
    outputs = model(**inputs)                                              # under torch.no_grad()
    processor.post_process_object_detection(outputs=outputs, threshold=threshold,
                                            target_sizes=torch.Tensor([img.size[::-1]]))   # (H, W)

and keeps every box above the threshold: no NMS, duplicates count. ``OwlDetector.detect`` makes the same
calls. transformers 5 removed ``Owlv2Processor.post_process_object_detection`` (4.x forwarded it to the
image processor, warning from 4.49 on that it is deprecated), so the image processor's method, the one 4.x
forwarded to, is called directly.
"""
from __future__ import annotations

import json
import numbers
import os
from pathlib import Path

import torch

from .detect_compare import Detection, image_to_pil
from .models import EvalModelError

OWL_FOLDER = "owlv2-base-patch16-ensemble"   # subfolder of models/personalize_eval, HF layout
OWL_HUB_ID = "google/owlv2-base-patch16-ensemble"
OWL_URL = "https://huggingface.co/google/owlv2-base-patch16-ensemble"
TRANSFORMERS_HINT = "pip install transformers (in ComfyUI's Python; ComfyUI itself depends on it)"

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# transformers 4.x and the Hub store the image processor in preprocessor_config.json; a processor saved
# by transformers 5 keeps it inside processor_config.json.
PREPROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def owl_hint() -> str:
    return (f"Download every file of {OWL_URL} (config.json, model.safetensors, preprocessor_config.json, "
            f"tokenizer_config.json, tokenizer.json, vocab.json, merges.txt, special_tokens_map.json) and put "
            f"the whole folder in models/personalize_eval/{OWL_FOLDER}")


def import_transformers():
    """``(Owlv2ForObjectDetection, Owlv2Processor)``, or an ImportError saying what to install."""
    try:
        from transformers import Owlv2ForObjectDetection, Owlv2Processor
    except ImportError as exc:
        raise ImportError(f"The OWLv2 detector needs transformers: {TRANSFORMERS_HINT} ({exc})") from exc
    return Owlv2ForObjectDetection, Owlv2Processor


def missing_files(folder: Path) -> list[str]:
    """What ``folder`` lacks of an OWLv2 Hub folder, one entry per missing piece."""
    have = {p.name for p in folder.iterdir() if p.is_file()}
    missing = []
    if "config.json" not in have:
        missing.append("config.json")
    if not have.intersection(WEIGHT_FILES):
        missing.append(" or ".join(WEIGHT_FILES))
    if not have.intersection(PREPROCESSOR_FILES):
        missing.append("preprocessor_config.json")
    if "tokenizer_config.json" not in have:
        missing.append("tokenizer_config.json")
    if "tokenizer.json" not in have and not {"vocab.json", "merges.txt"} <= have:
        missing.append("tokenizer.json (or vocab.json and merges.txt)")
    return missing


def check_config(folder: Path) -> None:
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EvalModelError(f"{path} is not a readable JSON model config ({exc}). {owl_hint()}") from exc
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != "owlv2":
        extra = " (OWL-ViT v1; D&C uses OWLv2)" if model_type == "owlvit" else ""
        raise EvalModelError(f"{path} describes a {model_type!r} model{extra}, not an OWLv2 detector "
                             f"(model_type 'owlv2'). {owl_hint()}")


def load_owlv2(folder: str | os.PathLike) -> "OwlDetector":
    """The OWLv2 detector and its processor from ``folder`` (the Hub folder of
    ``google/owlv2-base-patch16-ensemble``), offline (``local_files_only=True``), float32, eval mode, on
    the CPU. A missing folder or file, a config of another model type, or weights that do not fill the
    model are ``EvalModelError`` naming the folder and file; no transformers is an ImportError (4.x's
    ``Owlv2ImageProcessor`` also needs scipy, which ComfyUI brings; 5.x uses torchvision)."""
    folder = Path(os.fspath(folder)).expanduser()
    if not folder.is_dir():
        raise EvalModelError(f"OWLv2 folder {folder} does not exist. {owl_hint()}")
    missing = missing_files(folder)
    if missing:
        raise EvalModelError(f"OWLv2 folder {folder} lacks {', '.join(missing)}. {owl_hint()}")
    check_config(folder)
    model_cls, processor_cls = import_transformers()
    try:
        processor = processor_cls.from_pretrained(str(folder), local_files_only=True)
    except ImportError:
        raise
    except Exception as exc:  # transformers and tokenizers raise many kinds on a damaged file
        raise EvalModelError(f"OWLv2 folder {folder}: its processor files (preprocessor_config.json, tokenizer "
                             f"files) do not load: {_last_line(exc)}. {owl_hint()}") from exc
    weights = next(name for name in WEIGHT_FILES if (folder / name).is_file())
    try:
        model, info = model_cls.from_pretrained(str(folder), local_files_only=True, output_loading_info=True)
    except ImportError:
        raise
    except Exception as exc:  # safetensors, torch.load and transformers raise many kinds
        raise EvalModelError(f"OWLv2 folder {folder}: {weights} does not load: {_last_line(exc)}. "
                             f"{owl_hint()}") from exc
    absent = list(info.get("missing_keys") or [])
    if absent:
        raise EvalModelError(f"OWLv2 folder {folder}: {weights} lacks {len(absent)} of the model's tensors "
                             f"(e.g. {', '.join(sorted(absent)[:3])}); it is not a complete OWLv2 checkpoint. "
                             f"{owl_hint()}")
    model = model.float().eval()
    return OwlDetector(model, processor, folder.name)


def _last_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[-1].strip() if text else type(exc).__name__


def check_queries(queries) -> list[str]:
    if isinstance(queries, str) or not isinstance(queries, (list, tuple)):
        raise ValueError(f"queries: expected a list of subject names, got {type(queries).__name__}")
    if not queries:
        raise ValueError("queries: no subject names given")
    for i, q in enumerate(queries):
        if not isinstance(q, str) or not q.strip():
            raise ValueError(f"queries: name {i + 1} is {q!r}; every query needs a non-blank text")
    return list(queries)


class OwlDetector:
    """An ``Owlv2ForObjectDetection`` and its ``Owlv2Processor``, with the ``detect`` interface that
    ``detect_compare.score_image`` calls."""

    def __init__(self, model, processor, name: str):
        self.model = model
        self.processor = processor
        self.name = name

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device) -> "OwlDetector":
        self.model.to(device)
        return self

    def check_query_lengths(self, queries: list[str]) -> None:
        """The text model reads at most ``max_position_embeddings`` (16) tokens, start and end included;
        the processor pads to that length without truncating, so a longer name would fail inside the
        model."""
        limit = int(self.model.config.text_config.max_position_embeddings)
        for i, q in enumerate(queries):
            n = len(self.processor.tokenizer(q)["input_ids"])
            if n > limit:
                raise ValueError(f"queries: name {i + 1} ({q!r}) is {n} tokens with start and end; OWLv2 reads "
                                 f"at most {limit}: shorten it")

    def detect(self, image: torch.Tensor, queries: list[str], threshold: float = 0.4) -> list[Detection]:
        """Every box whose best query score is above ``threshold`` (MuDI's demo uses 0.4, its function
        default is 0.25), in the order transformers' post-processing returns them (patch order), with no
        NMS. ``image`` is ``[H, W, 3]`` or ``[1, H, W, 3]`` in 0..1; ``queries`` is the list of subject
        names, sent as MuDI sends them (one flat list of strings for the one image, padded to the
        tokenizer's 16 tokens). Each ``Detection`` has ``box`` (x0, y0, x1, y1) in pixels of the given
        image, ``score`` = sigmoid of the largest logit over the queries and ``label`` = that query's
        index. Runs on the model's device.

        Boxes on a non-square image: the processor pads the image at the bottom and right to a square
        of side max(H, W) before resizing, so the model predicts boxes relative to that square. MuDI
        passes ``target_sizes = (H, W)``; transformers 4.41 and later (5.x included) scale both
        coordinates by max(H, W), which maps them back to pixels of the original image exactly (a box
        may run over the right or bottom edge into the padding). transformers 4.35-4.40 scaled x by W
        and y by H, which squeezes boxes along the shorter side; on MuDI's square images both agree.
        """
        queries = check_queries(queries)
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
            raise ValueError(f"threshold: expected a number in [0, 1], got {type(threshold).__name__}")
        threshold = float(threshold)
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold: {threshold} is outside [0, 1]")
        self.check_query_lengths(queries)
        pil = image_to_pil(image)
        inputs = self.processor(text=queries, images=pil, return_tensors="pt").to(self.device)
        with torch.no_grad():
            outputs = self.model(**inputs)
        target_sizes = torch.tensor([[pil.height, pil.width]], dtype=torch.float32)
        result = self.processor.image_processor.post_process_object_detection(
            outputs=outputs, threshold=threshold, target_sizes=target_sizes)[0]
        boxes = result["boxes"].float().cpu().tolist()
        scores = result["scores"].float().cpu().tolist()
        labels = result["labels"].cpu().tolist()
        return [Detection(box=tuple(float(v) for v in b), score=float(s), label=int(lab))
                for b, s, lab in zip(boxes, scores, labels)]
