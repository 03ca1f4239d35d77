"""MuDI's Detect-and-Compare nodes (docs/metrics.md §3.2): a loader for the detector (OWLv2) and the
embedder (DreamSim's ensemble) from models/personalize_eval, a subject node for the references, and the
scorer. Schema, input checks and wiring only (the work is in ``metrics/``)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
from comfy_api.latest import io

from ..metrics import detect_compare as dc
from ..metrics import owl
from ..metrics.embedders import load_embedder
from ..metrics.models import DREAMSIM_FOLDER, download_hint
from ..references.core_prompts import bounding_box
from .checks import check_inputs
from .model_files import (DC_LOADABLE, EVAL_FOLDER, dc_folders, eval_folder_kind, find_subfolder, load_scorer,
                          missing_file_message, register_folder)
from .types import check_images

register_folder(EVAL_FOLDER)

DetectCompareModels = io.Custom("PERSONALIZE_DC_MODELS")
DetectCompareSubjects = io.Custom("PERSONALIZE_DC_SUBJECTS")
CATEGORY = "personalize/metrics"


@dataclass
class DCModels:
    detector: object
    embedder: object
    extras: dict = field(default_factory=dict)      # ComfyUI's model patcher of both networks (model_files)

    def networks(self) -> torch.nn.Module:
        """The detector's and the embedder's torch modules, as one module for ComfyUI's model patcher."""
        emb = self.embedder if isinstance(self.embedder, torch.nn.Module) else self.embedder.model
        return torch.nn.ModuleDict({"detector": self.detector.model, "embedder": emb})


# working memory of one image: OWLv2 at 960 px (3600 tokens of a ViT-B/16) and the embedder's crops
DC_MEMORY = 768 * 1024 * 1024


@dataclass(frozen=True)
class DCSubject:
    name: str                  # the detector's text query
    images: torch.Tensor       # [K, H, W, 3] reference images


def _hint(kind: str) -> str:
    return owl.owl_hint() if kind == "detector" else download_hint("dreamsim")


def _wrong_folder(kind: str, name: str) -> str | None:
    """Why folder ``name`` cannot be this loader's ``kind`` (it holds the other kind of model), or None; a
    folder of unknown content is left to the model's own loader, which names what it lacks."""
    found = eval_folder_kind(find_subfolder(EVAL_FOLDER, name))
    other = "embedder" if kind == "detector" else "detector"
    if found is None or found not in DC_LOADABLE[other]:
        return None
    article = {"detector": "a detector", "embedder": "an embedder"}
    return (f"{kind}: the folder {name!r} holds {found}, a Detect-and-Compare {other}, not {article[kind]}. "
            f"{_hint(kind)}")


class DetectCompareLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        owl_folder = owl.OWL_FOLDER
        det = sorted(set(dc_folders("detector")) | {owl_folder})
        emb = sorted(set(dc_folders("embedder")) | {DREAMSIM_FOLDER})
        return io.Schema(
            node_id="PersonalizeDetectCompareLoader",
            display_name="Detect-and-Compare Loader (MuDI)",
            category=CATEGORY,
            description=(
                "Loads MuDI's Detect-and-Compare models from ComfyUI/models/personalize_eval: the OWLv2 detector "
                f"(the Hugging Face folder {owl_folder}, through transformers) and DreamSim's ensemble embedder "
                f"(the folder {DREAMSIM_FOLDER} with the unzipped DreamSim v0.2.0 ensemble checkpoint and DINO's "
                "ViT-B/16: MuDI's published D&C), or DINOv2 (a facebook/dinov2-base folder: MuDI's D&C-DINO "
                "variant)."),
            inputs=[
                io.Combo.Input("detector", options=det, default=owl_folder,
                               tooltip=f"A folder in models/personalize_eval holding {owl.OWL_HUB_ID} "
                                       f"({owl.OWL_URL})."),
                io.Combo.Input("embedder", options=emb, default=DREAMSIM_FOLDER,
                               tooltip="A folder in models/personalize_eval holding DreamSim's ensemble "
                                       "(clip_vitb16_pretrain.pth.tar, open_clip_vitb16_pretrain.pth.tar, "
                                       "ensemble_lora/, and checkpoints/dino_vitbase16_pretrain.pth), or the "
                                       "Hugging Face folder of facebook/dinov2-base (D&C-DINO)."),
            ],
            outputs=[DetectCompareModels.Output(display_name="dc_models",
                                                tooltip="The detector and embedder, for Detect-and-Compare.")],
        )

    @classmethod
    def validate_inputs(cls, detector=None, embedder=None):   # None: no value sent (see model_files)
        for kind, name in (("detector", detector), ("embedder", embedder)):
            if find_subfolder(EVAL_FOLDER, name) is None:
                return f"{kind}: " + missing_file_message(EVAL_FOLDER, name, _hint(kind), subfolder=True)
            wrong = _wrong_folder(kind, name)
            if wrong:
                return wrong
        return True

    @classmethod
    def execute(cls, detector, embedder) -> io.NodeOutput:
        paths = {}
        for kind, name in (("detector", detector), ("embedder", embedder)):
            paths[kind] = find_subfolder(EVAL_FOLDER, name)
            if paths[kind] is None:
                raise FileNotFoundError(f"{kind}: " + missing_file_message(EVAL_FOLDER, name, _hint(kind),
                                                                             subfolder=True))
            if _wrong_folder(kind, name):
                raise ValueError(_wrong_folder(kind, name))
        return io.NodeOutput(DCModels(owl.load_owlv2(paths["detector"]), load_embedder(paths["embedder"])))


def subjects_from_inputs(name: str, images, previous=None) -> tuple:
    name = str(name or "").strip()
    if not name:
        raise ValueError("name: give the subject's name, the detector's text query (e.g. 'monster toy')")
    images = check_images("reference_images", images)
    prev = tuple(previous or ())
    if any(s.name == name for s in prev):
        raise ValueError(f"name: {name!r} is already a subject of this chain; give each subject its own name")
    return prev + (DCSubject(name, images[..., :3].float().cpu()),)


class DetectCompareSubject(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PersonalizeDetectCompareSubject",
            display_name="Detect-and-Compare Subject (MuDI)",
            category=CATEGORY,
            description=(
                "One subject for Detect-and-Compare: its name (OWLv2's text query, e.g. 'monster toy') and its "
                "reference images (a batch; MuDI's demo uses 5). Chain one node per subject, in the order the "
                "score's matrices list them."),
            inputs=[
                io.String.Input("name", default="", tooltip="The detector's text query for this subject, e.g. "
                                                            "'dog' or 'robot toy' (at most about 14 words' tokens)."),
                io.Image.Input("reference_images", tooltip="The subject's reference photos (a batch)."),
                DetectCompareSubjects.Input("subjects", optional=True, tooltip="Subjects to chain onto."),
            ],
            outputs=[DetectCompareSubjects.Output(display_name="subjects", tooltip="The chain of subjects so far, this one last.")],
        )

    @classmethod
    def execute(cls, name, reference_images, subjects=None) -> io.NodeOutput:
        checked = check_inputs(cls, locals())
        reference_images = checked["reference_images"]
        return io.NodeOutput(subjects_from_inputs(name, reference_images, subjects))


def score_batch(models: DCModels, images: torch.Tensor, subjects, threshold: float, check_interrupt=None,
                progress=None):
    """``(scores, results, detections, annotated)`` for every image of the batch, on the device the
    models are on; ``check_interrupt()`` runs before each image and ``progress(n)`` after the n-th."""
    names = [s.name for s in subjects]
    refs = [models.embedder.embed(list(s.images)) for s in subjects]
    out = []
    for i, img in enumerate(images):
        if check_interrupt is not None:
            check_interrupt()
        out.append(dc.score_image(img[..., :3], names, refs, models.detector, models.embedder, threshold))
        if progress is not None:
            progress(i + 1)
    annotated = torch.stack([dc.annotate(img, dets, names, r.matched, f"D&C {r.score:.3f}")
                             for img, (r, dets) in zip(images, out)])
    return [r.score for r, _ in out], [r for r, _ in out], [d for _, d in out], annotated


def details_json(names, results, detections) -> str:
    rows = []
    for i, (r, dets) in enumerate(zip(results, detections)):
        rows.append({
            "image": i, "score": r.score, "reason": r.reason,
            "boxes": [{"box": [round(v, 2) for v in d.box], "score": round(d.score, 4), "query": names[d.label]}
                      for d in dets],
            "boxes_vs_subjects": [[round(float(v), 6) for v in row] for row in r.boxes_vs_subjects],
            "matched_box_per_subject": r.matched,
        })
    gt = results[0].ground_truth if results else torch.zeros(0, 0)
    return json.dumps({"subjects": names, "ground_truth": [[round(float(v), 6) for v in row] for row in gt],
                       "images": rows}, indent=1)


class DetectCompare(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PersonalizeDetectCompare",
            display_name="Detect-and-Compare (MuDI)",
            category=CATEGORY,
            description=(
                "MuDI's multi-subject fidelity score. OWLv2 finds every box of the subjects' names above the "
                "threshold (no NMS); each box is cropped, padded white to a square and embedded with DreamSim; "
                "boxes are compared with the subjects' references (matrix A) and the references with each other "
                "(matrix G). A box count other than the subject count scores 0; otherwise boxes are matched to "
                "subjects greedily and the score is 1 - ||A_matched - G||_2 (spectral norm). 1 is best."),
            inputs=[
                DetectCompareModels.Input("dc_models", tooltip="From Detect-and-Compare Loader (MuDI)."),
                io.Image.Input("images", tooltip="The generated images (a batch: one score each, averaged)."),
                DetectCompareSubjects.Input("subjects", tooltip="From Detect-and-Compare Subject nodes, chained."),
                io.Float.Input("threshold", default=0.4, min=0.0, max=1.0, step=0.01,
                               tooltip="OWLv2's box score threshold: MuDI's demo uses 0.4, its function default "
                                       "0.25. Duplicated boxes above it make the count gate fail."),
            ],
            outputs=[io.Float.Output(display_name="score", tooltip="The D&C score, averaged over the images."),
                     io.Image.Output(display_name="annotated", tooltip="The images with the detected boxes drawn."),
                     io.String.Output(display_name="report", tooltip="Each image's score and matches, as text."),
                     io.String.Output(display_name="matrices",
                                      tooltip="Each image's similarity matrices and detections, as JSON."),
                     io.BoundingBox.Output(display_name="bboxes",
                                           tooltip="Every detected box, one list per image (ComfyUI's BOUNDING_BOX: "
                                                   "x, y, width, height in pixels, label = the subject name the box "
                                                   "answers, score = the detector's). Feed it to SAM Mask "
                                                   "(Personalize), Draw BBoxes or other core nodes.")],
        )

    @classmethod
    def execute(cls, dc_models, images, subjects, threshold=0.4) -> io.NodeOutput:
        checked = check_inputs(cls, locals())
        images = checked["images"]
        if not isinstance(dc_models, DCModels):
            raise ValueError("dc_models: expected the output of Detect-and-Compare Loader (MuDI)")
        images = check_images("images", images)
        if not subjects or not all(isinstance(s, DCSubject) for s in subjects):
            raise ValueError("subjects: connect Detect-and-Compare Subject (MuDI) nodes (at least one subject)")
        threshold = float(threshold)
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold: {threshold} is outside [0, 1]")
        import comfy.model_management as mm
        import comfy.utils
        load_scorer(dc_models.extras, dc_models.networks(), DC_MEMORY)
        pbar = comfy.utils.ProgressBar(images.shape[0])
        scores, results, dets, annotated = score_batch(
            dc_models, images, subjects, threshold, mm.throw_exception_if_processing_interrupted,
            lambda n: pbar.update_absolute(n, images.shape[0]))
        names = [s.name for s in subjects]
        mean = sum(scores) / len(scores)
        lines = [f"D&C {mean:.4f} over {len(scores)} image(s), {len(names)} subjects ({', '.join(names)}), "
                 f"threshold {threshold:g}"]
        for i, (r, d) in enumerate(zip(results, dets)):
            why = f" ({r.reason})" if r.reason else ""
            lines.append(f"  image {i + 1}: {r.score:.4f}, {len(d)} box(es){why}")
        bboxes = [[bounding_box(*d.box, names[d.label], d.score) for d in image_dets] for image_dets in dets]
        return io.NodeOutput(mean, annotated, "\n".join(lines), details_json(names, results, dets), bboxes)


NODES = [DetectCompareLoader, DetectCompareSubject, DetectCompare]
