"""Face nodes for FreeCure: the BiSeNet face-parsing loader and the face attribute mask. Schema, input
checks and wiring only (the work is in ``references/face_masks.py`` and the modules it
dispatches to)."""
from __future__ import annotations

import logging

import folder_paths
from comfy_api.latest import io

from ..references.bisenet import (
    OFFICIAL_FILE,
    OFFICIAL_URL,
    REPO_URL,
    download_hint,
    load_face_parser,
    memory_estimate,
)
from ..references.face_attributes import (
    BISENET_ATTRIBUTES,
    FACES,
    IF_NO_FACE,
    MEDIAPIPE_ATTRIBUTES,
    PROVIDERS,
    check_image,
    check_supported,
    overlay,
    parse_attributes,
)
from ..references.face_masks import face_attribute_masks
from ..references.face_mesh import MEDIAPIPE_VERSION
from .checks import check_inputs
from .model_files import folder_list, missing_file_message, model_patcher, register_folder

# No ComfyUI folder holds BiSeNet face parsers; register models/face_parsing (extra_model_paths.yaml
# entries for face_parsing work). Another pack may have registered the name already: keep its entry.
register_folder("face_parsing")

FaceParserType = io.Custom("PERSONALIZE_FACE_PARSER")
FaceLandmarksType = io.Custom("FACE_LANDMARKS")       # core's, from Detect Face Landmarks (MediaPipe)
DEVICES = ("auto", "cpu")
log = logging.getLogger(__name__)


class FaceParsingLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        files = folder_paths.get_filename_list("face_parsing")
        default = OFFICIAL_FILE if OFFICIAL_FILE in files else (files[0] if files else OFFICIAL_FILE)
        return io.Schema(
            node_id="PersonalizeFaceParsingLoader",
            display_name="Face Parsing Loader (BiSeNet)",
            category="personalize/masks",
            description=(
                "Loads the BiSeNet face parser that FreeCure uses (face-parsing.PyTorch, 19 CelebAMask-HQ classes: "
                "skin, brows, eyes, glasses, ears, earrings, nose, mouth, lips, neck, necklace, clothes, hair, hat) "
                "from ComfyUI/models/face_parsing, for the bisenet provider of Face Attribute Mask. The file is "
                f"{OFFICIAL_FILE} ({OFFICIAL_URL}); it is read as tensors only."),
            inputs=[
                io.Combo.Input("model_name", options=files, default=default,
                               tooltip=f"A BiSeNet face-parsing file in ComfyUI/models/face_parsing: the official "
                                       f"{OFFICIAL_FILE} (53 MB, from the README of {REPO_URL}), or a "
                                       f".safetensors copy with the same keys."),
                io.Combo.Input("device", advanced=True, options=list(DEVICES), default="auto",
                               tooltip="auto: ComfyUI's device (the GPU when there is one), loaded and unloaded by "
                                       "ComfyUI's model management; cpu: always parse on the CPU (about 0.2 s "
                                       "per image)."),
            ],
            outputs=[FaceParserType.Output(display_name="face_parser",
                                           tooltip="The BiSeNet face parser, for Face Attribute Mask.")],
        )

    @classmethod
    def validate_inputs(cls, model_name=None):
        # replaces ComfyUI's "value not in list", so the message says what to download and where
        if not model_name or folder_paths.get_full_path("face_parsing", model_name) is None:
            return missing_file_message("face_parsing", model_name, download_hint(folder_list("face_parsing")))
        return True

    @classmethod
    def execute(cls, model_name, device="auto") -> io.NodeOutput:
        path = folder_paths.get_full_path("face_parsing", model_name) if model_name else None
        if path is None:
            raise FileNotFoundError("model_name: " + missing_file_message("face_parsing", model_name,
                                                                          download_hint(folder_list("face_parsing"))))
        parser = load_face_parser(path)
        parser.extras["device"] = device
        return io.NodeOutput(parser)


class FaceAttributeMask(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PersonalizeFaceAttributeMask",
            display_name="Face Attribute Mask",
            category="personalize/masks",
            description=(
                "A MASK of facial attributes (hair, eyes, glasses, lips, ...) on a face image, for FreeCure: run it "
                "on the foundation image (the same seed generated without the identity model) with the attributes "
                "your prompt asks for. Provider mediapipe draws the face, skin, eyes, irises, brows, nose, mouth and "
                "lips from face landmarks: those of core's Detect Face Landmarks (MediaPipe) node when connected to "
                "face_landmarks (no extra package), otherwise the mediapipe package's own; provider bisenet "
                "(Face Parsing Loader) also does hair, hat, glasses, ears, earrings, neck, necklace and clothes. "
                "An image batch gives one mask per image."),
            inputs=[
                io.Image.Input("image", tooltip="The face image (FreeCure: the foundation image). A batch gives one "
                                                "mask per image."),
                io.String.Input("attributes", default="eyes",
                                tooltip="Attributes to mask, separated by commas, e.g. 'hair, eyes' (the union is "
                                        "masked). mediapipe: " + ", ".join(MEDIAPIPE_ATTRIBUTES) + ". bisenet: "
                                        + ", ".join(BISENET_ATTRIBUTES) + ". 'from prompt' takes the attributes "
                                        "that the prompt input names (hair, eyes, glasses, eyebrows, lips, ...). "
                                        "Left/right are the person's own."),
                io.Combo.Input("provider", options=list(PROVIDERS), default="mediapipe",
                               tooltip="mediapipe: MediaPipe face mesh landmarks, from core's Detect Face Landmarks "
                                       "(MediaPipe) node connected to face_landmarks, or else the mediapipe package "
                                       f"(pip install --no-deps mediapipe=={MEDIAPIPE_VERSION}, see the README); "
                                       "face features only. bisenet: the BiSeNet face parser FreeCure uses (connect "
                                       "Face Parsing Loader); also hair, hat, glasses, ears, neck and clothes."),
                io.Combo.Input("faces", advanced=True, options=list(FACES), default="largest",
                               tooltip="largest: only the largest face's attributes (mediapipe); all: every face "
                                       "found. bisenet parses the whole image, so it always masks every face."),
                io.Combo.Input("if_no_face", advanced=True, options=list(IF_NO_FACE), default="error",
                               tooltip="error: stop with an error naming the image without a face; empty mask: that "
                                       "image's mask is empty (a warning is logged)."),
                io.Int.Input("grow", default=0, min=-256, max=256, step=1,
                             tooltip="Grow the mask by this many pixels in every direction (negative: shrink it)."),
                FaceParserType.Input("face_parser", optional=True,
                                     tooltip="From Face Parsing Loader (BiSeNet); needed by the bisenet provider."),
                io.String.Input("prompt", default="", multiline=True, optional=True,
                                tooltip="The generation prompt, used when attributes says 'from prompt': its "
                                        "attribute words (hair, eyes, glasses, eyebrows, lips, mouth, nose, ears, "
                                        "earrings, hat, neck, necklace, clothes, skin) are masked."),
                FaceLandmarksType.Input("face_landmarks", optional=True,
                                        tooltip="Face landmarks from core's Detect Face Landmarks (MediaPipe) node, "
                                                "run on the same image batch: the mediapipe provider draws the "
                                                "attributes through them instead of running the mediapipe package "
                                                "(which then need not be installed). Its num_faces decides which "
                                                "faces can be masked."),
            ],
            outputs=[io.Mask.Output(display_name="mask", tooltip="The attribute mask, one per image."),
                     io.Image.Output(display_name="preview", tooltip="The image with the mask tinted red.")],
        )

    @classmethod
    def execute(cls, image, attributes="eyes", provider="mediapipe", faces="largest", if_no_face="error", grow=0,
                face_parser=None, prompt="", face_landmarks=None) -> io.NodeOutput:
        checked = check_inputs(cls, locals())
        image = checked["image"]
        import comfy.model_management as mm
        import comfy.utils

        B, _, _ = check_image(image)
        if provider not in PROVIDERS:
            raise ValueError(f"provider: unknown {provider!r}; use one of {', '.join(PROVIDERS)}")
        names = parse_attributes(attributes, prompt or "")
        check_supported(names, provider)
        if provider == "bisenet":
            if face_parser is None:
                raise ValueError("face_parser: the bisenet provider needs a face parser: connect Face Parsing Loader "
                                 f"(BiSeNet) with {OFFICIAL_FILE}, or use the mediapipe provider (no model file)")
            if not all(hasattr(face_parser, a) for a in ("net", "extras")):   # duck-typed: the pack may load twice
                raise ValueError("face_parser: expected a model from Face Parsing Loader (BiSeNet)")
            patcher = model_patcher(face_parser.extras, face_parser.net)
            mm.load_models_gpu([patcher], memory_required=memory_estimate(), force_full_load=True)
            if face_landmarks is not None:
                log.info("Personalize Face Attribute Mask: provider bisenet ignores the connected face_landmarks")
        elif face_parser is not None:
            log.info("Personalize Face Attribute Mask: provider mediapipe ignores the connected face_parser")
        pbar = comfy.utils.ProgressBar(B)
        masks = face_attribute_masks(image, names, provider, face_parser if provider == "bisenet" else None,
                                     faces, if_no_face, grow,
                                     check_interrupt=mm.throw_exception_if_processing_interrupted,
                                     progress=lambda n: pbar.update_absolute(n, B),
                                     landmarks=face_landmarks if provider == "mediapipe" else None)
        masks = masks.to(mm.intermediate_device())
        return io.NodeOutput(masks, overlay(image.to(masks.device), masks))


NODES = [FaceParsingLoader, FaceAttributeMask]
