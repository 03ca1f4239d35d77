"""Named bad inputs against every node of the pack inside a real ComfyUI, each asserting the pack's clear
error (the message names the node input and what it expects) and that nothing was lost or changed: the
loaders with empty model folders (through ComfyUI's own prompt validation), the Evaluation and
Detect-and-Compare loaders listing only what they can load, NaN/Inf/absurd numbers arriving through links,
NaN and wrongly shaped IMAGE/MASK/LATENT inputs, and a tooltip on every output. The checkpoint reader's and
the evaluation command's faults are unit tests (tests/test_faults_inputs.py)."""
from __future__ import annotations

import asyncio
import inspect
import json
import math
from contextlib import contextmanager

import pytest
import torch

from comfy_host import init_nodes_with_pack
from comfy_sampling import snapshot

# The pack's loaders: node id -> (its file input, the model folder, the pack's words for an empty folder)
LOADERS = {
    "PersonalizeMIPAdapterLoader": ("adapter_name", "ipadapter", "no file is in the ipadapter folder"),
    "PersonalizeApplyInfusion": ("infusion_name", "model_patches", "no file is in the model_patches folder"),
    "PersonalizeSAMModelLoader": ("model_name", "sams", "no SAM checkpoint is in the sams folder"),
    "PersonalizeFaceParsingLoader": ("model_name", "face_parsing", "no file is in the face_parsing folder"),
    "PersonalizeEvalModelLoader": ("model_name", "personalize_eval", "no model file is in the personalize_eval folder"),
    "PersonalizeDetectCompareLoader": ("detector", "personalize_eval", "no model folder is in the personalize_eval "
                                                                       "folder"),
}


@pytest.fixture(scope="module")
def node_classes():
    init_nodes_with_pack()
    import nodes
    return {k: v for k, v in nodes.NODE_CLASS_MAPPINGS.items() if k.startswith("Personalize")}


@contextmanager
def only_folder(names, path):
    """ComfyUI's model folders ``names`` pointed at ``path`` alone, restored afterwards."""
    import folder_paths
    saved = {n: folder_paths.folder_names_and_paths[n] for n in names}
    try:
        for n in names:
            folder_paths.folder_names_and_paths[n] = ([str(path)], saved[n][1])
        folder_paths.filename_list_cache.clear()
        yield
    finally:
        folder_paths.folder_names_and_paths.update(saved)
        folder_paths.filename_list_cache.clear()


def validate(prompt: dict):
    import execution
    ok, _, _, node_errors = asyncio.run(execution.validate_prompt("faults", prompt, None))
    return ok, json.dumps(node_errors)


# ------------------------------------------------------------------------ loaders and empty folders

def test_every_validate_inputs_argument_has_a_default(node_classes):
    """ComfyUI hands ``validate_inputs`` only the inputs the prompt holds; the editor sends no value for
    a combo with no options (an empty model folder). A parameter without a default then raised
    "validate_inputs() missing 1 required positional argument" instead of the pack's message."""
    with_validation = [k for k, c in node_classes.items() if "validate_inputs" in c.__dict__]
    assert set(LOADERS) <= set(with_validation)
    for name in with_validation:
        params = list(inspect.signature(node_classes[name].validate_inputs).parameters.values())
        assert params, name
        assert all(p.default is not inspect.Parameter.empty for p in params), (name, params)


@pytest.mark.parametrize("node_id", sorted(LOADERS))
@pytest.mark.parametrize("sent", ["editor", "null", "nothing"])
def test_loader_with_an_empty_folder_says_the_folder_is_empty(node_classes, tmp_path, node_id, sent):
    """``editor``: what ComfyUI's editor sends for the combo (its default when it has no options: before,
    MIP-Adapter Loader and Apply Infusion had none, so the editor sent nothing); ``null``: a script's
    None; ``nothing``: a script that leaves the input out (ComfyUI's own "Required input is missing",
    no crash)."""
    file_input, folder, words = LOADERS[node_id]
    cls = node_classes[node_id]
    inputs = {"prompt": "a cat", "concept_word": "cat", "strength": 1.0} if node_id == "PersonalizeApplyInfusion" \
        else {}
    if node_id == "PersonalizeDetectCompareLoader":
        inputs["embedder"] = "dreamsim"
    prompt = {"1": {"class_type": node_id, "inputs": inputs},
              "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}
    with only_folder({folder}, tmp_path):
        spec = cls.INPUT_TYPES()["required"][file_input][1]
        if node_id != "PersonalizeDetectCompareLoader":      # D&C always offers its two default folders
            assert spec["options"] == []
        assert isinstance(spec.get("default"), str) and spec["default"]
        if sent != "nothing":
            inputs[file_input] = spec["default"] if sent == "editor" else None
        ok, errors = validate(prompt)
        assert not ok
        assert "missing 1 required positional argument" not in errors and "exception_during" not in errors, errors
        if sent == "nothing":
            assert '"message": "Required input is missing", "details": "%s"' % file_input in errors, errors
        else:
            assert f"{file_input} - " in errors and f"in the {folder} folder ({tmp_path})" in errors, errors
            if sent == "null" or node_id in ("PersonalizeMIPAdapterLoader", "PersonalizeApplyInfusion"):
                assert words in errors, errors
        # run anyway (a prompt from a script that skips validation): the same message, naming the input
        args = {p: None for p in inspect.signature(cls.execute).parameters}
        args[file_input] = spec["default"]
        with pytest.raises(FileNotFoundError) as err:
            cls.execute(**args)
        assert str(err.value).startswith(f"{file_input}: ") and str(tmp_path) in str(err.value)


# ------------------------------------------------------------------------ Evaluation vs Detect-and-Compare

def make_eval_folder(root):
    """A models/personalize_eval with a CLIP and a DINO file, a folder of CLIP files, and the three kinds
    of Detect-and-Compare folders (OWLv2, DINOv2, DreamSim) with their weight files inside."""
    (root / "open_clip_pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")
    (root / "dino_deitsmall16_pretrain.pth").write_bytes(b"\x80\x02}q\x00.")
    (root / "clips").mkdir()
    (root / "clips" / "open_clip_model.safetensors").write_bytes(b"x")
    for folder, model_type in (("owlv2-base-patch16-ensemble", "owlv2"), ("dinov2-base", "dinov2"),
                               ("owl_vit_v1", "owlvit")):
        (root / folder).mkdir()
        (root / folder / "config.json").write_text(json.dumps({"model_type": model_type}))
        (root / folder / "model.safetensors").write_bytes(b"x")
    (root / "dreamsim" / "ensemble_lora").mkdir(parents=True)
    (root / "dreamsim" / "ensemble_lora" / "adapter_model.bin").write_bytes(b"x")
    (root / "dreamsim" / "checkpoints").mkdir()
    (root / "dreamsim" / "checkpoints" / "dino_vitbase16_pretrain.pth").write_bytes(b"x")
    (root / "notes").mkdir()


def test_eval_and_detect_compare_loaders_list_only_what_they_load(node_classes, tmp_path):
    make_eval_folder(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with only_folder({"personalize_eval"}, tmp_path):
        ev = node_classes["PersonalizeEvalModelLoader"]
        dc = node_classes["PersonalizeDetectCompareLoader"]
        assert ev.INPUT_TYPES()["required"]["model_name"][1]["options"] == [
            "clips/open_clip_model.safetensors", "dino_deitsmall16_pretrain.pth", "open_clip_pytorch_model.bin"]
        req = dc.INPUT_TYPES()["required"]
        assert req["detector"][1]["options"] == ["owlv2-base-patch16-ensemble"]
        assert req["embedder"][1]["options"] == ["dinov2-base", "dreamsim"]
        # a part of a D&C folder picked anyway (an old workflow, a script): refused by name, before loading
        msg = ev.validate_inputs(model_name="owlv2-base-patch16-ensemble/model.safetensors")
        assert "part of the Detect-and-Compare model folder 'owlv2-base-patch16-ensemble'" in msg
        assert "Detect-and-Compare Loader" in ev.validate_inputs(model_name="dreamsim/checkpoints/dino_vitbase16_pretrain.pth")
        assert ev.validate_inputs(model_name="clips/open_clip_model.safetensors") is True
        with pytest.raises(ValueError, match=r"^model_name: 'dinov2-base/model.safetensors' is a part of"):
            ev.execute("clip", "dinov2-base/model.safetensors")
        # D&C: an embedder folder as the detector, a detector folder as the embedder
        msg = dc.validate_inputs("dinov2-base", "dreamsim")
        assert msg.startswith("detector: the folder 'dinov2-base' holds dinov2, a Detect-and-Compare embedder, "
                              "not a detector. Download every file of") and "owlv2" in msg
        msg = dc.validate_inputs("owlv2-base-patch16-ensemble", "owlv2-base-patch16-ensemble")
        assert msg.startswith("embedder: the folder 'owlv2-base-patch16-ensemble' holds owlv2, a "
                              "Detect-and-Compare detector, not an embedder")
        with pytest.raises(ValueError, match="^embedder: the folder 'owlv2-base-patch16-ensemble' holds"):
            dc.execute("owlv2-base-patch16-ensemble", "owlv2-base-patch16-ensemble")
        ok, errors = validate({"1": {"class_type": "PersonalizeDetectCompareLoader",
                                     "inputs": {"detector": "dreamsim", "embedder": "dreamsim"}},
                               "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}})
        assert not ok and "detector: the folder 'dreamsim' holds dreamsim, a Detect-and-Compare embedder" in errors
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


# ------------------------------------------------------------------------ output tooltips

def test_every_output_of_every_node_has_a_tooltip(node_classes):
    import importlib
    listed = set()
    for family in ("references", "attention", "masks", "face", "mip", "mudi", "scores", "detect_compare",
                   "infusion", "training", "overfitting", "native_refs", "reference_cache"):
        module = importlib.import_module(f"personalize_pack.nodes.{family}")
        listed |= {n.GET_SCHEMA().node_id for n in module.NODES}
    assert listed == set(node_classes)
    missing = [(name, o.display_name or o.io_type) for name, cls in sorted(node_classes.items())
               for o in cls.GET_SCHEMA().outputs if not (o.tooltip or "").strip()]
    assert missing == []
    counted = sum(len(cls.GET_SCHEMA().outputs) for cls in node_classes.values())
    assert counted >= 44


# ------------------------------------------------------------------------ numbers, images, masks, latents

def schema_inputs(cls):
    return {i.id: i for i in cls.GET_SCHEMA().inputs}


def good_args(cls, model=None) -> dict:
    """Every input of ``cls`` with a valid value of its kind (numbers at their defaults); MODEL inputs get
    ``model``, the other kinds an object the check does not look at."""
    from comfy_api.latest import io
    args = {}
    for name, inp in schema_inputs(cls).items():
        if isinstance(inp, (io.Float.Input, io.Int.Input)):
            args[name] = inp.default if inp.default is not None else (inp.min or 0)
        elif isinstance(inp, io.Image.Input):
            args[name] = torch.rand(1, 16, 16, 3)
        elif isinstance(inp, io.Mask.Input):
            args[name] = torch.ones(1, 16, 16)
        elif isinstance(inp, io.Latent.Input):
            args[name] = {"samples": torch.zeros(1, 4, 2, 2)}
        elif isinstance(inp, io.Model.Input) and model is not None:
            args[name] = model
        else:
            args[name] = object()
    return args


def inputs_of_kind(node_classes, kinds):
    if not node_classes:
        return []
    from comfy_api.latest import io
    kinds = tuple(getattr(io, k).Input for k in kinds)
    return [(node, name) for node, cls in sorted(node_classes.items())
            for name, inp in schema_inputs(cls).items() if isinstance(inp, kinds)]


def all_pack_nodes():
    """The pack's node classes, for the parametrisations; none without ComfyUI (the tests are skipped)."""
    if init_nodes_with_pack() is None:
        return {}
    import nodes
    return {k: v for k, v in nodes.NODE_CLASS_MAPPINGS.items() if k.startswith("Personalize")}


def float_cases():
    out = []
    for node, name in inputs_of_kind(all_pack_nodes(), ("Float",)):
        out += [pytest.param(node, name, bad, id=f"{node}.{name}={bad}") for bad in ("nan", "inf", "-inf", "1e30")]
    return out


@pytest.mark.parametrize("node_id,name,bad", float_cases())
def test_bad_float_through_a_link_names_the_input(node_classes, sd15, node_id, name, bad):
    cls = node_classes[node_id]
    model = sd15[0]
    before = snapshot(model)
    args = good_args(cls, model)
    inp = schema_inputs(cls)[name]
    value = float(bad) if bad != "1e30" else 1e30
    if bad == "-inf" and inp.min is None:
        value = -1e30
    args[name] = value
    with pytest.raises(ValueError) as err:
        cls.execute(**args)
    msg = str(err.value)
    assert msg.startswith(f"{name}: must lie in {inp.min:g}..{inp.max:g}, got "), msg
    assert ("not a finite number" in msg) == (bad != "1e30")
    assert snapshot(model) == before


def int_cases():
    return [pytest.param(node, name, id=f"{node}.{name}") for node, name in inputs_of_kind(all_pack_nodes(), ("Int",))]


@pytest.mark.parametrize("node_id,name", int_cases())
def test_int_beyond_its_range_through_a_link_names_the_input(node_classes, node_id, name):
    cls = node_classes[node_id]
    inp = schema_inputs(cls)[name]
    args = good_args(cls)
    args[name] = (inp.max + 1) if inp.max is not None else inp.min - 1
    with pytest.raises(ValueError, match=rf"^{name}: must (lie in|be at least) .*, got "):
        cls.execute(**args)


def tensor_cases():
    out = []
    for node, name in inputs_of_kind(all_pack_nodes(), ("Image", "Mask", "Latent")):
        out.append(pytest.param(node, name, id=f"{node}.{name}"))
    return out


@pytest.mark.parametrize("node_id,name", tensor_cases())
def test_nan_and_misshapen_tensors_name_the_input(node_classes, node_id, name):
    from comfy_api.latest import io
    cls = node_classes[node_id]
    inp = schema_inputs(cls)[name]
    args = good_args(cls)
    good = args[name]
    if isinstance(inp, io.Latent.Input):
        samples = good["samples"].clone()
        samples.view(-1)[3] = math.nan
        nan = {"samples": samples}
        wrong = [{"samples": torch.zeros(4, 2, 2)}, torch.zeros(1, 4, 2, 2)]
    else:
        nan = good.clone()
        nan.view(-1)[3] = math.inf if isinstance(inp, io.Mask.Input) else math.nan
        wrong = ([torch.rand(1, 16, 16, 2), torch.rand(16, 16, 3), torch.rand(1, 0, 16, 3)]
                 if isinstance(inp, io.Image.Input) else [torch.rand(1, 1, 16, 16, 3), torch.zeros(1, 0, 4),
                                                          torch.rand(16), [[1.0]]])
    kept = nan["samples"].clone() if isinstance(nan, dict) else nan.clone()
    args[name] = nan
    with pytest.raises(ValueError, match=rf"^{name}: (image|mask|latent) 1 of 1 contains NaN or infinite values "
                                         rf"\(1 of \d+\); expected finite values"):
        cls.execute(**args)
    assert torch.equal(kept.isnan(), (nan["samples"] if isinstance(nan, dict) else nan).isnan())
    for bad in wrong:
        args[name] = bad
        with pytest.raises(ValueError, match=rf"^{name}: expected a ComfyUI (IMAGE|MASK|LATENT)"):
            cls.execute(**args)


def test_two_channel_image_says_how_to_convert(node_classes):
    with pytest.raises(ValueError, match=r"^image: expected a ComfyUI IMAGE .*2 channels.*Convert Mask to Image"):
        node_classes["PersonalizeSubject"].execute(torch.rand(1, 16, 16, 2), torch.ones(1, 16, 16), "cat", None)


def test_rgba_loses_its_alpha_and_grey_becomes_rgb(node_classes):
    """The documented conversions: an RGBA IMAGE is used as its RGB channels, a grey one as R=G=B."""
    rgb = torch.rand(1, 16, 16, 3)
    rgba = torch.cat([rgb, torch.rand(1, 16, 16, 1)], dim=-1)
    grey = torch.rand(1, 16, 16, 1)
    mask = torch.zeros(1, 16, 16)
    mask[:, 4:12, 4:12] = 1
    subject = node_classes["PersonalizeSubject"]
    a = subject.execute(rgb, mask, "cat", None).result[0]
    b = subject.execute(rgba, mask, "cat", None).result[0]
    assert torch.equal(a[0].image, b[0].image) and a[0].image.shape[-1] == 3
    dcs = node_classes["PersonalizeDetectCompareSubject"]
    assert torch.equal(dcs.execute("cat", rgba, None).result[0][0].images, rgb)
    assert torch.equal(dcs.execute("cat", grey, None).result[0][0].images, grey.expand(-1, -1, -1, 3))


def test_nan_weight_from_a_primitive_node_stops_the_run_with_the_node_message(node_classes):
    """The whole way: ComfyUI's validation lets a NaN through a link (and a typed NaN: NaN < min is
    False), the executor runs the node, the pack stops it naming the input."""
    import execution

    prompt = {"1": {"class_type": "PrimitiveFloat", "inputs": {"value": math.nan}},
              "2": {"class_type": "PersonalizeNativeReference", "inputs": {"weight": ["1", 0]}},
              "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}}}
    ok, errors = validate(json.loads(json.dumps(prompt)))
    assert ok, errors

    class Server:
        client_id = last_node_id = last_prompt_id = None
        sockets_metadata = {}

        def send_sync(self, *a, **k):
            pass

        def queue_updated(self):
            pass

    executor = execution.PromptExecutor(Server(), cache_type=execution.CacheType.CLASSIC,
                                        cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})
    asyncio.run(executor.execute_async(prompt, "nan-weight", {}, ["3"]))
    assert not executor.success
    error = next(d for e, d in executor.status_messages if e == "execution_error")
    assert error["node_type"] == "PersonalizeNativeReference"
    assert error["exception_message"].startswith("weight: must lie in 0..10, got nan, which is not a finite number")


# ------------------------------------------------------------------------ bad files in every file loader

FILE_LOADERS = {   # node id -> (model folder, the loader's arguments besides the file)
    "PersonalizeMIPAdapterLoader": ("ipadapter", {}),
    "PersonalizeApplyInfusion": ("model_patches", {"model": None, "clip": None, "prompt": "a cat",
                                                   "concept_word": "cat", "strength": 1.0}),
    "PersonalizeSAMModelLoader": ("sams", {"device": "cpu"}),
    "PersonalizeFaceParsingLoader": ("face_parsing", {"device": "cpu"}),
    "PersonalizeEvalModelLoader": ("personalize_eval", {"kind": "dino", "clip_architecture": ""}),
}


@pytest.mark.parametrize("node_id", sorted(FILE_LOADERS))
def test_every_file_loader_refuses_nan_weights_and_a_renamed_pickle(node_classes, tmp_path, node_id):
    """Every loader reads through the one safe reader: NaN weights are refused naming the file and the
    tensor, a pickle named .safetensors is refused unread (its code never runs); the files stay."""
    import pickle

    from safetensors.torch import save_file
    folder, extra = FILE_LOADERS[node_id]
    cls = node_classes[node_id]
    file_input = LOADERS[node_id][0]
    weights = torch.randn(8, 8)
    weights[1, 1] = math.nan
    save_file({"blocks.0.weight": weights}, str(tmp_path / "diverged.safetensors"))
    marker = tmp_path / "executed"
    with open(tmp_path / "renamed.safetensors", "wb") as f:
        pickle.dump({"w": torch.ones(2), "x": OpenOnLoad(str(marker))}, f)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with only_folder({folder}, tmp_path):
        assert cls.validate_inputs(**{file_input: "diverged.safetensors"}) is True
        with pytest.raises(ValueError, match=r"diverged.safetensors is refused: its tensor 'blocks.0.weight' "
                                             r"holds 1 NaN values of 64"):
            cls.execute(**extra, **{file_input: "diverged.safetensors"})
        with pytest.raises(ValueError, match=r"renamed.safetensors is named .safetensors but is not a safetensors "
                                             r"file"):
            cls.execute(**extra, **{file_input: "renamed.safetensors"})
    assert not marker.exists()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


class OpenOnLoad:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))
