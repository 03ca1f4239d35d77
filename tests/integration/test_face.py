"""The face nodes inside a real ComfyUI: registration, the face_parsing model folder and the loader's
messages, the Face Attribute Mask node through its ``execute`` with both providers (MediaPipe on the
astronaut photo from scikit-image; BiSeNet with random weights saved like the official file), bad
inputs, progress and Cancel. Skipped without ComfyUI (set COMFYUI_PATH); the MediaPipe cases also
without mediapipe or scikit-image."""
from __future__ import annotations

import asyncio
import json

import pytest
import torch

from comfy_sampling import load_image
from pack_paths import PACK_ROOT


from personalize_pack.references.bisenet import OFFICIAL_FILE, build_bisenet
from personalize_pack.references.face_attributes import grow_mask
from personalize_pack.references.face_masks import face_attribute_masks
from personalize_pack.references.face_mesh import import_solutions

try:
    import_solutions()
    from skimage import data as skdata
    MP_ERROR = None
except Exception as exc:
    MP_ERROR = f"{type(exc).__name__}: {str(exc).split(';')[0][:160]}"
needs_mediapipe = pytest.mark.skipif(MP_ERROR is not None, reason=f"mediapipe or scikit-image cannot be imported "
                                                                  f"({MP_ERROR}); see tools/run_tests.sh")
OFFICIAL = OFFICIAL_FILE
MASK_ARGS = dict(attributes="eyes", provider="mediapipe", faces="largest", if_no_face="error", grow=0,
                 face_parser=None, prompt="")


@pytest.fixture(scope="module")
def parsing_dir(tmp_path_factory):
    """ComfyUI with the pack loaded, and a temporary face_parsing folder holding a random BiSeNet saved
    like the official file (a plain state dict in the legacy torch.save format) under another name."""
    import comfy_host
    comfy_host.init_nodes_with_pack()
    import folder_paths
    d = tmp_path_factory.mktemp("face_models") / "face_parsing"
    d.mkdir()
    torch.manual_seed(0)
    torch.save(build_bisenet().state_dict(), d / "random_bisenet.pth", _use_new_zipfile_serialization=False)
    folder_paths.add_model_folder_path("face_parsing", str(d))
    return d


def node_class(name):
    import nodes
    return nodes.NODE_CLASS_MAPPINGS[name]


def run_mask(image, **kw):
    args = dict(MASK_ARGS, **kw)
    return node_class("PersonalizeFaceAttributeMask").execute(image, **args).result


@pytest.fixture(scope="module")
def astronaut():
    if MP_ERROR is not None:
        pytest.skip(MP_ERROR)
    return torch.from_numpy(skdata.astronaut().astype("float32") / 255.0)[None]


# --- registration, the folder and the loader ------------------------------------------------------

def test_nodes_register_with_tooltips_and_the_folder(parsing_dir):
    import folder_paths
    assert "face_parsing" in folder_paths.folder_names_and_paths
    assert str(parsing_dir) in folder_paths.get_folder_paths("face_parsing")
    for name, display in (("PersonalizeFaceParsingLoader", "Face Parsing Loader (BiSeNet)"),
                          ("PersonalizeFaceAttributeMask", "Face Attribute Mask")):
        schema = node_class(name).GET_SCHEMA()
        assert schema.display_name == display and schema.category == "personalize/masks" and schema.description
        assert all(i.tooltip for i in schema.inputs), [i.id for i in schema.inputs if not i.tooltip]
    options = node_class("PersonalizeFaceParsingLoader").INPUT_TYPES()["required"]["model_name"][1]["options"]
    assert "random_bisenet.pth" in options
    mask = node_class("PersonalizeFaceAttributeMask")
    assert list(mask.RETURN_TYPES) == ["MASK", "IMAGE"]
    optional = mask.INPUT_TYPES()["optional"]
    assert optional["face_parser"][0] == "PERSONALIZE_FACE_PARSER" and "prompt" in optional


def test_missing_model_file_says_what_to_download_and_where(parsing_dir):
    loader = node_class("PersonalizeFaceParsingLoader")
    assert loader.validate_inputs("random_bisenet.pth") is True
    msg = loader.validate_inputs(OFFICIAL)
    assert isinstance(msg, str) and str(parsing_dir) in msg and f"'{OFFICIAL}' is not in the face_parsing folder" in msg
    assert "https://drive.google.com/open?id=154JgKpzCPW82qINcVieuPH3fZ2e0P812" in msg
    assert "zllrunning/face-parsing.PyTorch" in msg
    with pytest.raises(FileNotFoundError, match=f"model_name: '{OFFICIAL}' is not in the face_parsing folder"):
        loader.execute(OFFICIAL, "auto")
    # through ComfyUI's own prompt validation: the node's message, not "value not in list"
    import execution
    prompt = {"1": {"class_type": "PersonalizeFaceParsingLoader", "inputs": {"model_name": OFFICIAL, "device": "auto"}},
              "2": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
              "3": {"class_type": "PersonalizeFaceAttributeMask",
                    "inputs": {"image": ["2", 0], "attributes": "hair", "provider": "bisenet", "faces": "largest",
                               "if_no_face": "error", "grow": 0, "face_parser": ["1", 0], "prompt": ""}},
              "4": {"class_type": "MaskPreview", "inputs": {"mask": ["3", 0]}}}
    ok, _, _, node_errors = asyncio.run(execution.validate_prompt("p1", prompt, None))
    details = json.dumps(node_errors)
    assert not ok and "custom_validation_failed" in details and "value_not_in_list" not in details
    assert OFFICIAL in details and str(parsing_dir) in details and "drive.google.com" in details


def test_loader_reads_the_file_and_refuses_bad_ones(parsing_dir):
    loader = node_class("PersonalizeFaceParsingLoader")
    parser = loader.execute("random_bisenet.pth", "cpu").result[0]
    assert isinstance(parser.net, torch.nn.Module) and parser.extras["device"] == "cpu"
    (parsing_dir / "page.pth").write_bytes(b"<!DOCTYPE html><html>Google Drive can't scan this file</html>")
    data = (parsing_dir / "random_bisenet.pth").read_bytes()
    (parsing_dir / "cut.pth").write_bytes(data[: len(data) // 3])
    try:
        with pytest.raises(ValueError, match="page.pth is not a PyTorch .* web page"):
            loader.execute("page.pth", "auto")
        with pytest.raises(ValueError, match=r"cut.pth is damaged or incomplete \(a truncated download\?\)"):
            loader.execute("cut.pth", "auto")
    finally:
        (parsing_dir / "page.pth").unlink()
        (parsing_dir / "cut.pth").unlink()


# --- the mask node --------------------------------------------------------------------------------

@needs_mediapipe
def test_mediapipe_masks_through_the_node(parsing_dir, astronaut):
    import comfy.utils
    calls = []
    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, *a, **k: calls.append((value, total)))
    try:
        mask, preview = run_mask(torch.cat([astronaut, astronaut.flip(2)]), attributes="eyes, lips")
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
    assert mask.shape == (2, 512, 512) and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert preview.shape == (2, 512, 512, 3) and calls[-1] == (2, 2)
    direct = face_attribute_masks(astronaut, ("eyes", "lips"))
    assert torch.equal(mask[:1], direct)
    # the mirrored photo gives (about) the mirrored mask
    flipped = mask[1].flip(1)
    assert float((flipped * mask[0]).sum() / ((flipped + mask[0]) > 0).sum()) > 0.6
    # from the prompt, grown
    by_prompt, _ = run_mask(astronaut, attributes="from prompt", prompt="a woman img with green eyes and red lipstick",
                            grow=2)
    assert torch.equal(by_prompt, grow_mask(direct, 2))


@needs_mediapipe
def test_no_face_and_unsupported_attributes(parsing_dir, astronaut):
    dice = load_image(PACK_ROOT / "workflows" / "inputs" / "personalize_mip_2_dice.jpg", 512)
    with pytest.raises(ValueError, match=r"image: no face was found in image 2 of 2"):
        run_mask(torch.cat([astronaut, dice]))
    mask, _ = run_mask(torch.cat([astronaut, dice]), if_no_face="empty mask")
    assert mask[0].sum() > 0 and mask[1].sum() == 0


def test_bad_inputs_name_the_input(parsing_dir):
    image = torch.rand(1, 64, 64, 3)
    with pytest.raises(ValueError, match=r"attributes: provider 'mediapipe' cannot mask 'hair'.*bisenet provider"):
        run_mask(image, attributes="hair, eyes")
    with pytest.raises(ValueError, match="face_parser: the bisenet provider needs a face parser"):
        run_mask(image, attributes="hair", provider="bisenet")
    with pytest.raises(ValueError, match="face_parser: expected a model from Face Parsing Loader"):
        run_mask(image, attributes="hair", provider="bisenet", face_parser="not a model")
    with pytest.raises(ValueError, match="attributes: unknown 'moustache'"):
        run_mask(image, attributes="moustache")
    with pytest.raises(ValueError, match="prompt: no face attribute word"):
        run_mask(image, attributes="from prompt", prompt="a cat on a sofa")
    with pytest.raises(ValueError, match="image: expected a ComfyUI IMAGE"):
        run_mask(image[0])


def test_bisenet_through_the_node_with_model_management(parsing_dir):
    loader = node_class("PersonalizeFaceParsingLoader")
    torch.manual_seed(1)
    image = torch.rand(2, 80, 60, 3)
    for device in ("auto", "cpu"):
        parser = loader.execute("random_bisenet.pth", device).result[0]
        mask, preview = run_mask(image, attributes="hair, eyes, glasses", provider="bisenet", face_parser=parser,
                                 if_no_face="empty mask")
        assert mask.shape == (2, 80, 60) and preview.shape == (2, 80, 60, 3)
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        assert "patcher" in parser.extras
        parser.net.to("cpu")
        want = face_attribute_masks(image, ("hair", "eyes", "glasses"), "bisenet", parser, if_no_face="empty mask")
        assert torch.equal(mask, want)


def test_cancel_stops_between_images(parsing_dir):
    import comfy.model_management as mm
    parser = node_class("PersonalizeFaceParsingLoader").execute("random_bisenet.pth", "cpu").result[0]
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            run_mask(torch.rand(1, 32, 32, 3), attributes="hair", provider="bisenet", face_parser=parser)
    finally:
        mm.interrupt_current_processing(False)


# --- core's face landmarks -------------------------------------------------------------------------

def core_landmarker_file():
    """Core's face landmarker weights when this machine has them (models/detection of the ComfyUI
    under test, or PERSONALIZE_FACE_LANDMARKER), else None."""
    import os

    import folder_paths
    given = os.environ.get("PERSONALIZE_FACE_LANDMARKER")
    if given and os.path.isfile(given):
        return given
    return folder_paths.get_full_path("detection", "mediapipe_face_fp32.safetensors")


def test_face_landmarks_input_takes_cores_type(parsing_dir):
    from comfy_extras.nodes_mediapipe import MediaPipeFaceLandmarker, MediaPipeFaceMask
    optional = node_class("PersonalizeFaceAttributeMask").INPUT_TYPES()["optional"]
    core_out = MediaPipeFaceLandmarker.GET_SCHEMA().outputs[0].get_io_type()
    assert optional["face_landmarks"][0] == core_out == MediaPipeFaceMask.INPUT_TYPES()["required"][
        "face_landmarks"][0] == "FACE_LANDMARKS"
    assert optional["face_landmarks"][1]["tooltip"]


def test_graph_from_cores_landmarker_validates(parsing_dir, tmp_path):
    """ComfyUI's own validation accepts the link from core's Detect Face Landmarks (MediaPipe) to
    face_landmarks (validation only: the file named here is not read)."""
    import execution
    import folder_paths
    (tmp_path / "detection").mkdir()
    (tmp_path / "detection" / "some_face_landmarker.safetensors").write_bytes(b"")
    folder_paths.add_model_folder_path("detection", str(tmp_path / "detection"))
    prompt = {
        "1": {"class_type": "LoadMediaPipeFaceLandmarker", "inputs": {"model_name": "some_face_landmarker.safetensors"}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
        "3": {"class_type": "MediaPipeFaceLandmarker", "inputs": {
            "face_detection_model": ["1", 0], "image": ["2", 0], "detector_variant": "short", "num_faces": 1,
            "min_confidence": 0.5, "missing_frame_fallback": "empty"}},
        "4": {"class_type": "PersonalizeFaceAttributeMask", "inputs": {
            "image": ["2", 0], "attributes": "eyes, lips", "provider": "mediapipe", "faces": "largest",
            "if_no_face": "empty mask", "grow": 0, "prompt": "", "face_landmarks": ["3", 0]}},
        "5": {"class_type": "MaskPreview", "inputs": {"mask": ["4", 0]}},
    }
    ok, error, _, node_errors = asyncio.run(execution.validate_prompt("p2", prompt, None))
    assert ok and not node_errors, (error, node_errors)


def test_node_draws_through_core_landmarks_without_mediapipe(parsing_dir, monkeypatch):
    import sys

    import comfy.model_management as mm
    import comfy.utils
    from synthetic_faces import payload, synthetic_face
    monkeypatch.setitem(sys.modules, "mediapipe", None)                 # as if mediapipe were not installed
    image = torch.rand(2, 100, 100, 3)
    with pytest.raises(ImportError, match=r"face_landmarks: the mediapipe provider needs face landmarks\. Either "
                                          r"connect core's 'Detect Face Landmarks \(MediaPipe\)' node"):
        run_mask(image)
    pts, sets = synthetic_face()
    lm = payload([[pts], [pts * 0.5]], sets)
    calls = []
    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, *a, **k: calls.append((value, total)))
    try:
        mask, preview = run_mask(image, attributes="face, left eye", face_landmarks=lm)
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
    assert mask.shape == (2, 100, 100) and preview.shape == (2, 100, 100, 3) and calls[-1] == (2, 2)
    assert int(mask[0].sum()) == 80 * 80 and int(mask[1].sum()) == 40 * 40     # the left eye lies in the face
    with pytest.raises(ValueError, match="face_landmarks: landmarks of 2 images for a batch of 1"):
        run_mask(image[:1], face_landmarks=lm)
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            run_mask(image, face_landmarks=lm)
    finally:
        mm.interrupt_current_processing(False)


@needs_mediapipe
def test_core_landmarker_masks_match_the_mediapipe_masks(parsing_dir, astronaut):
    """Where both are available: core's PyTorch face landmarker and the mediapipe package on the same
    face give masks that agree (IoU) attribute by attribute. Needs core's model file."""
    path = core_landmarker_file()
    if path is None:
        pytest.skip("core's face landmarker weights mediapipe_face_fp32.safetensors are not in models/detection "
                    "(https://huggingface.co/Comfy-Org/mediapipe); set PERSONALIZE_FACE_LANDMARKER to the file")
    import comfy.utils
    from comfy_extras.nodes_mediapipe import FaceLandmarkerModel, MediaPipeFaceLandmarker
    model = FaceLandmarkerModel(comfy.utils.load_torch_file(path, safe_load=True))
    lm = MediaPipeFaceLandmarker.execute(model, astronaut, "short", 1, 0.5, "empty").result[0]
    for attrs, min_iou in (("face", 0.9), ("eyes", 0.6), ("left eye", 0.6), ("lips", 0.6), ("mouth", 0.7),
                           ("nose", 0.7), ("brows", 0.5), ("skin", 0.85)):
        core, _ = run_mask(astronaut, attributes=attrs, face_landmarks=lm)
        ours, _ = run_mask(astronaut, attributes=attrs)
        iou = float((core * ours).sum() / ((core + ours) > 0).sum())
        assert iou >= min_iou, f"{attrs}: IoU {iou:.3f} between core's landmarks and mediapipe's"


@needs_mediapipe
def test_cores_real_landmark_output_feeds_the_node(parsing_dir, astronaut):
    """Core's own Detect Face Landmarks node (random weights in its file layout) gives the node its real
    FACE_LANDMARKS containers: float32 numpy landmarks, the edge sets core reads from its file, the image
    size. With MediaPipe's landmarks of the astronaut put into that output, the node's masks are those of
    the mediapipe provider; the node never needs its own mediapipe for it."""
    import numpy as np
    from comfy_extras.nodes_mediapipe import FaceLandmarkerModel, MediaPipeFaceLandmarker
    from tiny_face_landmarker import tiny_face_landmarker_state_dict

    from personalize_pack.references.face_attributes import to_uint8_rgb
    from personalize_pack.references.face_mesh import FaceLandmarker
    solutions = import_solutions()
    model = FaceLandmarkerModel(tiny_face_landmarker_state_dict(solutions.face_mesh_connections))
    with torch.inference_mode():
        lm = MediaPipeFaceLandmarker.execute(model, astronaut, "short", 1, 0.0, "empty").result[0]
    assert lm["image_size"] == (512, 512) and len(lm["frames"]) == 1 and len(lm["frames"][0]) == 1
    face = lm["frames"][0][0]
    assert face["landmarks_xy"].dtype == np.float32 and face["landmarks_xy"].shape == (478, 2)
    mask, _ = run_mask(astronaut, attributes="face", face_landmarks=lm, if_no_face="empty mask")
    assert mask.shape == (1, 512, 512)                      # random weights: a meaningless but valid mask
    with FaceLandmarker() as finder:
        face["landmarks_xy"] = finder.faces(to_uint8_rgb(astronaut[0]), largest_only=True)[0].astype(np.float32)
    for attrs in ("face", "eyes, irises", "left eye", "lips", "mouth, nose", "brows", "skin"):
        core, _ = run_mask(astronaut, attributes=attrs, face_landmarks=lm)
        ours, _ = run_mask(astronaut, attributes=attrs)
        # the same landmarks, rounded to float32: at most a few pixels on the outlines differ
        assert core.sum() > 0 and float((core != ours).sum()) <= 0.02 * float(ours.sum()) + 8, attrs
