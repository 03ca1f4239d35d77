"""Evaluation nodes: a loader for the CLIP / DINO evaluation models (models/personalize_eval) and the
CLIP Score (CLIP-T, CLIP-I) and DINO Score nodes of docs/metrics.md §3.1. Schema, input checks and
wiring only (the work is in ``metrics/``)."""
from __future__ import annotations

import math

import folder_paths
from comfy_api.latest import io

from ..metrics import models as evalmodels
from ..metrics.scores import clip_t, pairwise_mean_cosine
from .checks import check_inputs
from .model_files import (EVAL_FILE_EXTENSIONS, EVAL_FOLDER, eval_file_owner, eval_model_files, load_scorer,
                          missing_file_message, register_folder)
from .types import EvalModelType, check_images

register_folder(EVAL_FOLDER)

KINDS = ("clip", "dino")
SCORER_MEMORY = 256 * 1024 * 1024    # working memory of one image through a ViT-B at 224 px, with room to spare


def _extras(model) -> dict:
    """Where the model keeps its ComfyUI model patcher (a model from an older copy of the pack may lack it)."""
    if not isinstance(getattr(model, "extras", None), dict):
        model.extras = {}
    return model.extras


def _progress(total: int):
    """ComfyUI's progress bar over ``total`` images, and the hooks the embedding loops call: Cancel is
    checked before each image, the bar moves after it (``offset``: images of earlier passes)."""
    import comfy.model_management as mm
    import comfy.utils
    bar = comfy.utils.ProgressBar(total)
    return lambda offset=0: dict(batch=1, check_interrupt=mm.throw_exception_if_processing_interrupted,
                                 progress=lambda n: bar.update_absolute(offset + n, total))


def _eval_hint() -> str:
    return f"{evalmodels.download_hint('dino')}; {evalmodels.download_hint('clip')}"


def wrong_eval_file(name: str) -> str | None:
    """Why file ``name`` of models/personalize_eval is not for this loader (a part of a Detect-and-Compare
    model folder, or not a weights file), or None."""
    owner = eval_file_owner(name)
    if owner is not None:
        return (f"{name!r} is a part of the Detect-and-Compare model folder {owner!r}; load that folder with "
                f"Detect-and-Compare Loader (MuDI). This loader reads CLIP and DINO files. {_eval_hint()}")
    if not name.lower().endswith(EVAL_FILE_EXTENSIONS):
        return (f"{name!r} is not a CLIP or DINO weights file (expected {', '.join(EVAL_FILE_EXTENSIONS)}). "
                f"{_eval_hint()}")
    return None


class EvalModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        files = eval_model_files()
        default = next((f for f in (evalmodels.CLIP_FILE, evalmodels.CLIP_SAFETENSORS_FILE, evalmodels.DINO_FILE)
                        if f in files), files[0] if files else evalmodels.CLIP_FILE)
        return io.Schema(
            node_id="PersonalizeEvalModelLoader",
            display_name="Evaluation Model Loader (Personalize)",
            category="personalize/metrics",
            description=(
                "Loads an evaluation model from ComfyUI/models/personalize_eval for the CLIP Score and DINO Score "
                f"nodes: CLIP (open_clip format, e.g. {evalmodels.CLIP_FILE} of OpenAI ViT-B/32; needs "
                f"open_clip_torch) or DINO ViT-S/16 ({evalmodels.DINO_FILE})."),
            inputs=[
                io.Combo.Input("kind", options=list(KINDS), default="clip",
                               tooltip="clip: an open_clip CLIP model (for CLIP Score); dino: the DINO-v1 ViT "
                                       "(for DINO Score)."),
                io.Combo.Input("model_name", options=files, default=default,
                               tooltip=f"A file in ComfyUI/models/personalize_eval: {evalmodels.CLIP_FILE} from "
                                       f"{evalmodels.CLIP_REPO} (CLIP), or {evalmodels.DINO_FILE} (DINO)."),
                io.String.Input("clip_architecture", advanced=True, default=evalmodels.CLIP_ARCH,
                                tooltip="CLIP only: the open_clip architecture name of the file. OpenAI's weights "
                                        "need the -quickgelu names (ViT-B-32-quickgelu for the papers' ViT-B/32)."),
            ],
            outputs=[EvalModelType.Output(display_name="eval_model", tooltip="The CLIP or DINO model, for the score nodes.")],
        )

    @classmethod
    def validate_inputs(cls, kind=None, model_name=None, clip_architecture=None):   # None: no value sent
        if not model_name or folder_paths.get_full_path(EVAL_FOLDER, model_name) is None:
            return missing_file_message(EVAL_FOLDER, model_name, _eval_hint(), "model file")
        return wrong_eval_file(model_name) or True

    @classmethod
    def execute(cls, kind, model_name, clip_architecture=evalmodels.CLIP_ARCH) -> io.NodeOutput:
        path = folder_paths.get_full_path(EVAL_FOLDER, model_name) if model_name else None
        if path is None:
            raise FileNotFoundError("model_name: " + missing_file_message(EVAL_FOLDER, model_name, _eval_hint(),
                                                                          "model file"))
        if wrong_eval_file(model_name):
            raise ValueError("model_name: " + wrong_eval_file(model_name))
        if kind == "clip":
            return io.NodeOutput(evalmodels.load_clip(path, clip_architecture))
        if kind == "dino":
            return io.NodeOutput(evalmodels.load_dino(path))
        raise ValueError(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")


def parse_prompts(text: str, n: int) -> list[str]:
    """One prompt per line (blank lines dropped): a single line is used for every image, otherwise
    there must be one line per image."""
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    if not lines:
        raise ValueError("prompts: give the prompt of the images (one line for all, or one line per image)")
    if len(lines) == 1:
        return lines * n
    if len(lines) != n:
        raise ValueError(f"prompts: {len(lines)} prompt lines for {n} images; give one line for all images or "
                         f"one per image")
    return lines


class CLIPScore(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PersonalizeCLIPScore",
            display_name="CLIP Score (Personalize)",
            category="personalize/metrics",
            description=(
                "CLIP-T and CLIP-I as MIP-Adapter and Custom Diffusion compute them. CLIP-T: per image "
                "2.5 * max(0, cos(image, prompt)), averaged (a raw cosine of 0.30 reads 0.75). CLIP-I: the mean "
                "cosine over every (image, reference) pair. Use the prompt with the placeholder word replaced by "
                "the class noun."),
            inputs=[
                EvalModelType.Input("eval_model", tooltip="A CLIP model from Evaluation Model Loader (kind clip)."),
                io.Image.Input("images", tooltip="The generated images (a batch)."),
                io.String.Input("prompts", multiline=True, default="",
                                tooltip="The prompt of the images: one line for all of them, or one line per image "
                                        "in batch order."),
                io.Image.Input("reference_images", optional=True,
                               tooltip="Optional reference images of the subject for CLIP-I. Without them clip_i "
                                       "is NaN and the report says so."),
            ],
            outputs=[io.Float.Output(display_name="clip_t", tooltip="Image-prompt similarity, averaged over the images."),
                     io.Float.Output(display_name="clip_i",
                                     tooltip="Image-reference similarity, averaged (NaN without reference_images)."),
                     io.String.Output(display_name="report", tooltip="Each image's scores, as text.")],
        )

    @classmethod
    def execute(cls, eval_model, images, prompts, reference_images=None) -> io.NodeOutput:
        checked = check_inputs(cls, locals())
        images, reference_images = checked["images"], checked["reference_images"]
        if not isinstance(eval_model, evalmodels.ClipModel) and not hasattr(eval_model, "tokenizer"):
            raise ValueError("eval_model: expected a CLIP model from Evaluation Model Loader (kind clip)")
        images = check_images("images", images)
        refs = check_images("reference_images", reference_images, required=False)
        texts = parse_prompts(prompts, images.shape[0])

        n = images.shape[0]
        hooks = _progress(n + (refs.shape[0] if refs is not None else 0))
        dev = load_scorer(_extras(eval_model), eval_model.model, SCORER_MEMORY)
        g = evalmodels.clip_image_embeds(eval_model, images, dev, **hooks())
        t = evalmodels.clip_text_embeds(eval_model, texts, dev)
        r = evalmodels.clip_image_embeds(eval_model, refs, dev, **hooks(n)) if refs is not None else None
        per_image = clip_t(g, t)
        score_t = float(per_image.mean())
        lines = [f"CLIP-T {score_t:.4f} over {images.shape[0]} image(s) ({eval_model.arch}; 2.5*max(0,cos))"]
        lines += [f"  image {i + 1}: {float(v):.4f}  {texts[i]}" for i, v in enumerate(per_image)]
        if r is None:
            score_i = math.nan
            lines.append("CLIP-I: NaN (no reference_images connected)")
        else:
            score_i = float(pairwise_mean_cosine(g, r))
            lines.append(f"CLIP-I {score_i:.4f} over {g.shape[0]}x{r.shape[0]} (image, reference) pairs")
        return io.NodeOutput(score_t, score_i, "\n".join(lines))


class DINOScore(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PersonalizeDINOScore",
            display_name="DINO Score (Personalize)",
            category="personalize/metrics",
            description=(
                "DINO subject similarity as MIP-Adapter and Custom Diffusion compute it: the mean cosine of the "
                "DINO ViT-S/16 CLS embeddings over every (image, reference) pair (shorter side 256, centre crop "
                "224, ImageNet normalisation)."),
            inputs=[
                EvalModelType.Input("eval_model", tooltip="A DINO model from Evaluation Model Loader (kind dino)."),
                io.Image.Input("images", tooltip="The generated images (a batch)."),
                io.Image.Input("reference_images", tooltip="Reference images of the subject (a batch)."),
            ],
            outputs=[io.Float.Output(display_name="dino", tooltip="Image-reference DINO similarity, averaged."),
                     io.String.Output(display_name="report", tooltip="The score and image counts, as text.")],
        )

    @classmethod
    def execute(cls, eval_model, images, reference_images) -> io.NodeOutput:
        checked = check_inputs(cls, locals())
        images, reference_images = checked["images"], checked["reference_images"]
        if not isinstance(eval_model, evalmodels.DinoViT) and not hasattr(eval_model, "patch_embed"):
            raise ValueError("eval_model: expected a DINO model from Evaluation Model Loader (kind dino)")
        images = check_images("images", images)
        refs = check_images("reference_images", reference_images)
        hooks = _progress(images.shape[0] + refs.shape[0])
        dev = load_scorer(_extras(eval_model), eval_model, SCORER_MEMORY)
        g = evalmodels.dino_embeds(eval_model, images, dev, **hooks())
        r = evalmodels.dino_embeds(eval_model, refs, dev, **hooks(images.shape[0]))
        score = float(pairwise_mean_cosine(g, r))
        report = f"DINO {score:.4f} over {g.shape[0]}x{r.shape[0]} (image, reference) pairs"
        return io.NodeOutput(score, report)


NODES = [EvalModelLoader, CLIPScore, DINOScore]
