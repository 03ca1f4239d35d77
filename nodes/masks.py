"""Mask nodes: Segment Anything loader and mask node. Schema, input checks and wiring only (the work
is in ``references/sam.py`` and ``references/sam_checkpoint.py``)."""
from __future__ import annotations

import logging

import folder_paths
from comfy_api.latest import io

from ..references import core_prompts
from ..references import sam as samlib
from ..references import sam_checkpoint as samfile
from .checks import check_inputs
from .model_files import folder_list, missing_file_message, model_patcher, register_folder

# ComfyUI has no "sams" key; other SAM packs (Impact, storyicon) use models/sams. Register it the way
# cubiq's packs register theirs, so extra_model_paths.yaml entries work.
register_folder("sams")

SamType = io.Custom("PERSONALIZE_SAM")
DEVICES = ("auto", "cpu")
log = logging.getLogger(__name__)


class SAMModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        files = folder_paths.get_filename_list("sams")
        default = next((f for f in samfile.OFFICIAL_FILES if f in files), files[0] if files else samfile.OFFICIAL_FILES[0])
        return io.Schema(
            node_id="PersonalizeSAMModelLoader",
            display_name="SAM Model Loader (Personalize)",
            category="personalize/masks",
            description=(
                "Loads a Segment Anything (SAM) checkpoint from ComfyUI/models/sams for the SAM Mask node: the "
                "official sam_vit_b_01ec64.pth, sam_vit_l_0b3195.pth or sam_vit_h_4b8939.pth (the variant is read "
                "from the weights). Needs the segment-anything package (pip install segment-anything in "
                "ComfyUI's Python)."),
            inputs=[
                io.Combo.Input("model_name", options=files, default=default,
                               tooltip="A SAM checkpoint in ComfyUI/models/sams (official files: "
                                       + ", ".join(samfile.OFFICIAL_FILES) + "; ViT-B is the smallest and fastest)."),
                io.Combo.Input("device", advanced=True, options=list(DEVICES), default="auto",
                               tooltip="auto: ComfyUI's device (the GPU when there is one), loaded and unloaded by "
                                       "ComfyUI's model management; cpu: always run SAM on the CPU."),
            ],
            outputs=[SamType.Output(display_name="sam", tooltip="The SAM model, for SAM Mask.")],
        )

    @classmethod
    def validate_inputs(cls, model_name=None):
        # replaces ComfyUI's "value not in list" for model_name, so that the message says what to
        # download and where (ComfyUI prefixes it with the input's name)
        if not model_name or folder_paths.get_full_path("sams", model_name) is None:
            return missing_file_message("sams", model_name, samfile.download_hint(folder_list("sams")), "SAM checkpoint")
        return True

    @classmethod
    def execute(cls, model_name, device="auto") -> io.NodeOutput:
        path = folder_paths.get_full_path("sams", model_name) if model_name else None
        if path is None:
            raise FileNotFoundError("model_name: " + missing_file_message(
                "sams", model_name, samfile.download_hint(folder_list("sams")), "SAM checkpoint"))
        samfile.import_sam_modeling()          # fails early, saying what to install
        sam = samfile.load_sam(path)
        sam.extras["device"] = device
        expected = next((v for v, spec in samfile.OFFICIAL.items() if spec[0] == model_name), None)
        if expected and sam.config.variant != expected:
            log.warning("Personalize SAM: %s holds a %s, not the %s its name says", model_name, sam.config.label,
                        expected)
        return io.NodeOutput(sam)


class SAMMask(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PersonalizeSAMMask",
            display_name="SAM Mask (Personalize)",
            category="personalize/masks",
            description=(
                "Segment Anything: a subject MASK of the image from point and/or box prompts, or automatically "
                "(the largest confident object). Coordinates are pixels of the input image from its top-left "
                "corner (or fractions of its size). Use the MASK in Reference Encode, or anywhere a MASK goes. "
                "An image batch gives one mask per image, with the same prompts."),
            inputs=[
                SamType.Input("sam", tooltip="From SAM Model Loader (Personalize)."),
                io.Image.Input("image", tooltip="The image to segment (a batch gives one mask per image)."),
                io.Combo.Input("mode", options=list(samlib.MODES), default="points",
                               tooltip="points: positive (and negative) points on the subject; box: a box around "
                                       "it; points + box: both; largest object: no prompts, SAM is prompted with a "
                                       "grid of points and the largest confident mask that is not the background "
                                       "(it touches at most 2 image borders) is kept."),
                io.String.Input("points", default="256,256",
                                tooltip="Points on the subject, 'x,y; x,y' (x right, y down from the top-left "
                                        "corner, in pixels of the input image or fractions with units = "
                                        "fractions). Used by the points modes."),
                io.String.Input("negative_points", default="",
                                tooltip="Points NOT on the subject, 'x,y; x,y' (optional; points modes)."),
                io.String.Input("box", default="",
                                tooltip="A box around the subject 'x0,y0,x1,y1' (left, top, right, bottom; pixels "
                                        "or fractions). Used by the box modes; must lie inside the image."),
                io.Combo.Input("units", advanced=True, options=list(samlib.UNITS), default="pixels",
                               tooltip="pixels: coordinates in pixels of the input image (0..width, 0..height); "
                                       "fractions: 0..1 of the width and height (independent of the image size)."),
                io.Combo.Input("multimask", advanced=True, options=list(samlib.MULTIMASK), default="auto",
                               tooltip="best of 3: SAM predicts three masks (e.g. part / object / group) and the "
                                       "one with the highest predicted IoU is kept; single: SAM's single-mask "
                                       "output; auto: best of 3 for a single point, single otherwise (SAM's advice)."),
                io.Float.Input("threshold", advanced=True, default=0.0, min=-20.0, max=20.0, step=0.1,
                               tooltip="Logit threshold of the mask (SAM: 0). Higher gives a tighter mask, lower a "
                                       "looser one."),
                io.Int.Input("grid", advanced=True, default=8, min=2, max=32,
                             tooltip="largest object mode: points per side of the prompt grid (8 = 64 prompts; "
                                     "more finds smaller objects but takes longer)."),
                io.Float.Input("min_confidence", advanced=True, default=samlib.LARGEST_MIN_IOU, min=0.0, max=1.0, step=0.01,
                               tooltip="largest object mode: minimum predicted IoU of a candidate mask "
                                       "(SAM's automatic mask generator: 0.88). Lower it when no object is found."),
                io.BoundingBox.Input("bboxes", optional=True, force_input=True,
                                     tooltip="Boxes from another node (ComfyUI's BOUNDING_BOX: Detect-and-Compare, "
                                             "SAM3 Detect, RT-DETR, face landmarks, Create Bounding Boxes), in pixels "
                                             "of this image. Replaces the box text; per-image lists give each image "
                                             "its own boxes; several boxes give the union of their masks; an image "
                                             "with no box gets an empty mask. Box modes only."),
                io.String.Input("positive_coords", optional=True, force_input=True,
                                tooltip="Points from another node as JSON [{\"x\": 120, \"y\": 80}, ...] in pixels "
                                        "(core SAM3 Detect's format, e.g. from the KJNodes Points Editor). Replaces "
                                        "the points text. Points modes only."),
                io.String.Input("negative_coords", optional=True, force_input=True,
                                tooltip="Points NOT on the subject, as JSON [{\"x\": .., \"y\": ..}, ...] in pixels. "
                                        "Replaces the negative_points text. Points modes only."),
            ],
            outputs=[io.Mask.Output(display_name="mask", tooltip="The segmentation mask, one per image.")],
        )

    @classmethod
    def execute(cls, sam, image, mode="points", points="", negative_points="", box="", units="pixels",
                multimask="auto", threshold=0.0, grid=8, min_confidence=samlib.LARGEST_MIN_IOU, bboxes=None,
                positive_coords=None, negative_coords=None) -> io.NodeOutput:
        checked = check_inputs(cls, locals())
        image = checked["image"]
        import comfy.model_management as mm
        import comfy.utils
        import torch

        if not all(hasattr(sam, a) for a in ("net", "config", "extras")):   # duck-typed: the pack may be loaded twice
            raise ValueError("sam: expected a model from SAM Model Loader (Personalize)")
        if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[-1] not in (1, 3, 4) \
                or image.shape[0] < 1:
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f"image: expected a ComfyUI IMAGE [B,H,W,3], got {shape}")
        B, H, W = (int(s) for s in image.shape[:3])
        given = dict(
            given_points=None if positive_coords is None else core_prompts.parse_coords(positive_coords, H, W),
            given_negative=None if negative_coords is None else core_prompts.parse_coords(
                negative_coords, H, W, "negative_coords"))
        boxes = None if bboxes is None else core_prompts.boxes_per_image(bboxes, B, H, W)
        # one prompt set per image (connected boxes may differ per image); None: no box for that image
        per_image = [samlib.make_prompts(mode, points, negative_points, box, H, W, units, **given,
                                         given_boxes=None if boxes is None else boxes[i])
                     if boxes is None or boxes[i] else None for i in range(B)]
        if all(p is None for p in per_image):       # no image has a box: still check the other inputs
            samlib.make_prompts(mode, points, negative_points, box, H, W, units, **given, given_boxes=[(0, 0, W, H)])
        for p in per_image:
            if p is not None:
                samlib.use_multimask(multimask, p)      # checks the option before any work

        patcher = model_patcher(sam.extras, sam.net, holder="sam")   # Sam defines .device read-only
        mm.load_models_gpu([patcher], memory_required=_memory_estimate(sam, grid), force_full_load=True)
        pbar = comfy.utils.ProgressBar(B)
        out = []
        for i in range(B):
            mm.throw_exception_if_processing_interrupted()
            if per_image[i] is None:
                log.warning("Personalize SAM Mask: bboxes has no box for image %d; its mask is empty", i + 1)
                out.append(torch.zeros(H, W, device=mm.intermediate_device()))
                pbar.update(1)
                continue
            m = samlib.segment_image(sam, image[i], per_image[i], multimask, threshold, grid=grid,
                                     min_iou=min_confidence, check_interrupt=mm.throw_exception_if_processing_interrupted)
            if float(m.max()) <= 0:
                log.warning("Personalize SAM Mask: the mask of image %d is empty; move the prompts or lower the "
                            "threshold", i + 1)
            out.append(m.to(mm.intermediate_device()))
            pbar.update(1)
        return io.NodeOutput(torch.stack(out))


def _memory_estimate(sam: samfile.SamModel, grid: int) -> int:
    """Working memory of one image: the encoder's activations (about 40 float32 copies of its token
    grid) plus one chunk of grid prompts in the decoder."""
    c = sam.config
    tokens = (c.img_size // c.patch_size) ** 2
    encoder = tokens * c.embed_dim * 4 * 40
    decoder = min(grid * grid, 32) * 3 * (c.img_size // 4) ** 2 * 4 * 4
    return encoder + decoder


NODES = [SAMModelLoader, SAMMask]
