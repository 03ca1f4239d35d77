"""The bisenet provider (references/bisenet.py): the network against the official layout, pre-processing,
parsing, labels to masks, the masks end to end with a fixed parsing, and loading the file (other
containers, missing, truncated and foreign files, pickled objects refused), all with random weights."""
from __future__ import annotations

import hashlib
import os
import types

import numpy as np
import pytest
import torch
import torch.nn as nn

from pack_paths import PACK_ROOT
from personalize_pack.references import bisenet as bis
from personalize_pack.references import face_attributes as fa
from personalize_pack.references import face_masks as fm

INPUTS = PACK_ROOT / "workflows" / "inputs"


# --- BiSeNet: the official layout ----------------------------------------------------------------

# Read from zllrunning/face-parsing.PyTorch (model.py, resnet.py: BiSeNet(n_classes=19)): 191 state dict
# entries, 31 of them BatchNorm num_batches_tracked counters; 13,313,088 values in the other 160. The
# sha256 is of the sorted lines "key [shape]" of those 160 entries.
OFFICIAL_ENTRIES = 191
OFFICIAL_COUNTERS = 31
OFFICIAL_VALUES = 13_313_088
OFFICIAL_SHA256 = "1c7b86244baafb7b6902c4dbca65ec4b7e1b7eb7c27d67060793e03dc5b8df19"
OFFICIAL_SAMPLE = {
    "cp.resnet.conv1.weight": (64, 3, 7, 7),
    "cp.resnet.bn1.running_var": (64,),
    "cp.resnet.layer1.0.conv1.weight": (64, 64, 3, 3),
    "cp.resnet.layer2.0.downsample.0.weight": (128, 64, 1, 1),
    "cp.resnet.layer2.0.downsample.1.running_mean": (128,),
    "cp.resnet.layer4.1.bn2.weight": (512,),
    "cp.arm16.conv.conv.weight": (128, 256, 3, 3),
    "cp.arm32.conv_atten.weight": (128, 128, 1, 1),
    "cp.arm32.bn_atten.bias": (128,),
    "cp.conv_head32.conv.weight": (128, 128, 3, 3),
    "cp.conv_avg.conv.weight": (128, 512, 1, 1),
    "ffm.convblk.conv.weight": (256, 256, 1, 1),
    "ffm.conv1.weight": (64, 256, 1, 1),
    "ffm.conv2.weight": (256, 64, 1, 1),
    "conv_out.conv.conv.weight": (256, 256, 3, 3),
    "conv_out.conv_out.weight": (19, 256, 1, 1),
    "conv_out16.conv.conv.weight": (64, 128, 3, 3),
    "conv_out32.conv_out.weight": (19, 64, 1, 1),
}


def random_bisenet(seed=0) -> bis.BiSeNet:
    torch.manual_seed(seed)
    net = bis.build_bisenet()
    for mod in net.modules():         # non-trivial BatchNorm statistics
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 1.5)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.2, 0.2)
    return net.eval()


def test_bisenet_matches_the_official_layout():
    with torch.device("meta"):
        sd = bis.BiSeNet(19).state_dict()
    assert len(sd) == OFFICIAL_ENTRIES
    counters = [k for k in sd if k.endswith("num_batches_tracked")]
    assert len(counters) == OFFICIAL_COUNTERS
    rest = {k: v for k, v in sd.items() if k not in counters}
    assert sum(v.numel() for v in rest.values()) == OFFICIAL_VALUES
    for k, shape in OFFICIAL_SAMPLE.items():
        assert tuple(sd[k].shape) == shape, k
    lines = "\n".join(f"{k} {list(v.shape)}" for k, v in sorted(rest.items()))
    assert hashlib.sha256(lines.encode()).hexdigest() == OFFICIAL_SHA256


def test_bisenet_forward_shapes():
    net = random_bisenet()
    x = torch.randn(2, 3, 128, 96)
    with torch.no_grad():
        out = net(x)
        main, aux16, aux32 = net(x, aux=True)
    assert out.shape == (2, 19, 128, 96) and torch.equal(out, main)
    assert aux16.shape == aux32.shape == (2, 19, 128, 96)
    assert torch.isfinite(out).all()


def test_bisenet_parsing_of_an_image_batch():
    parser = bis.FaceParser(net=random_bisenet())
    images = torch.rand(2, 90, 70, 3)
    labels = bis.parse_labels(parser, images, chunk=1)
    assert labels.shape == (2, 90, 70) and labels.dtype == torch.int64
    assert int(labels.min()) >= 0 and int(labels.max()) <= 18
    with torch.no_grad():                                           # = argmax at 512, resized back (nearest)
        full = parser.net(bis.preprocess_bisenet(images[1:])).argmax(1)
    assert full.shape == (1, 512, 512)
    assert torch.equal(labels[1:], bis.resize_labels(full, 90, 70))


def test_preprocess_resizes_like_pil_and_normalises():
    from PIL import Image
    torch.manual_seed(1)
    img = torch.rand(1, 700, 600, 3)
    x = bis.preprocess_bisenet(img)
    assert x.shape == (1, 3, 512, 512)
    for c in range(3):
        want = np.asarray(Image.fromarray(img[0, ..., c].numpy(), mode="F").resize((512, 512), Image.BILINEAR))
        want = (want - bis.IMAGENET_MEAN[c]) / bis.IMAGENET_STD[c]
        np.testing.assert_allclose(x[0, c].numpy(), want, atol=2e-4)
    flat = bis.preprocess_bisenet(torch.full((1, 512, 512, 3), 0.5))
    for c in range(3):
        want = (0.5 - bis.IMAGENET_MEAN[c]) / bis.IMAGENET_STD[c]
        torch.testing.assert_close(flat[0, c], torch.full((512, 512), want), atol=1e-6, rtol=0)


def test_resize_labels_is_nearest():
    lab = torch.tensor([[[0, 1], [2, 3]]])
    assert torch.equal(bis.resize_labels(lab, 4, 6), torch.tensor([[[0, 0, 0, 1, 1, 1]] * 2 + [[2, 2, 2, 3, 3, 3]] * 2]))


# --- BiSeNet: labels to masks --------------------------------------------------------------------

def hand_made_labels(H=512, W=512):
    """A cartoon face parsing: hair on top, skin below with brows, eyes, glasses, nose, mouth and
    lips, ears at the sides, neck and clothes at the bottom."""
    lab = torch.zeros(H, W, dtype=torch.long)

    def put(label, y0, y1, x0, x1):
        lab[int(y0 * H):int(y1 * H), int(x0 * W):int(x1 * W)] = label
    put(17, 0.0, 0.25, 0.2, 0.8)          # hair
    put(1, 0.25, 0.75, 0.25, 0.75)        # skin
    put(2, 0.3, 0.33, 0.3, 0.45)          # brows
    put(3, 0.3, 0.33, 0.55, 0.7)
    put(6, 0.35, 0.45, 0.28, 0.72)        # glasses around the eyes
    put(4, 0.38, 0.42, 0.32, 0.42)        # eyes
    put(5, 0.38, 0.42, 0.58, 0.68)
    put(10, 0.45, 0.55, 0.45, 0.55)       # nose
    put(12, 0.6, 0.62, 0.4, 0.6)          # upper lip, mouth, lower lip
    put(11, 0.62, 0.64, 0.4, 0.6)
    put(13, 0.64, 0.66, 0.4, 0.6)
    put(7, 0.4, 0.5, 0.2, 0.25)           # ears, an earring
    put(8, 0.4, 0.5, 0.75, 0.8)
    put(9, 0.5, 0.53, 0.2, 0.23)
    put(14, 0.75, 0.85, 0.4, 0.6)         # neck, necklace, clothes, a hat
    put(15, 0.8, 0.82, 0.42, 0.58)
    put(16, 0.85, 1.0, 0.1, 0.9)
    put(18, 0.0, 0.05, 0.3, 0.7)
    return lab


def test_labels_to_masks():
    lab = hand_made_labels()[None]
    for attr, ids in fa.BISENET_ATTRIBUTES.items():
        m = bis.labels_to_mask(lab, (attr,))
        want = sum((lab == i).float() for i in ids)
        assert torch.equal(m, want), attr
        assert m.sum() > 0, attr
    m = bis.labels_to_mask(lab, ("hair", "eyes", "glasses"))           # FreeCure's three
    assert torch.equal(m, ((lab == 17) | (lab == 4) | (lab == 5) | (lab == 6)).float())
    face = bis.labels_to_mask(lab, ("face",))
    assert torch.equal(face, torch.isin(lab, torch.tensor(fa.FACE_LABELS)).float())
    assert face[0, 100, 256] == 0 and face[0, 256, 256] == 1          # hair is not face
    assert bis.has_face(lab).tolist() == [True]
    no = torch.zeros(2, 100, 100, dtype=torch.long)
    no[1, :10, :10] = 1                                               # 1% skin: a face
    no[0, :2, :2] = 1                                                 # 0.04%: not
    assert bis.has_face(no).tolist() == [False, True]


class FixedParser(nn.Module):
    """Stands in for BiSeNet: logits whose argmax is a given label map at 512x512."""

    def __init__(self, labels):
        super().__init__()
        self.register_buffer("logits", torch.nn.functional.one_hot(labels, 19).permute(0, 3, 1, 2).float() * 5)
        self.weight = nn.Parameter(torch.zeros(1))
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x.shape)
        return self.logits[:1].expand(x.shape[0], -1, -1, -1) if self.logits.shape[0] == 1 else self.logits


def test_bisenet_masks_end_to_end_with_a_fixed_parsing():
    lab = hand_made_labels()
    parser = bis.FaceParser(net=FixedParser(lab[None]))
    image = torch.rand(3, 150, 100, 3)
    calls = []
    masks = fm.face_attribute_masks(image, ("hair", "eyes"), "bisenet", parser, progress=calls.append)
    assert masks.shape == (3, 150, 100) and masks.dtype == torch.float32
    want = bis.resize_labels(((lab == 17) | (lab == 4) | (lab == 5)).long()[None], 150, 100).float()[0]
    assert torch.equal(masks[0], want) and torch.equal(masks[2], want)
    assert parser.net.inputs[0] == (3, 3, 512, 512) and calls == [3]
    grown = fm.face_attribute_masks(image[:1], ("hair", "eyes"), "bisenet", parser, grow=2)
    assert grown.sum() > masks[0].sum() and (grown[0] >= masks[0]).all()
    # "faces" has no effect: the parser labels the whole image
    assert torch.equal(fm.face_attribute_masks(image[:1], ("hair",), "bisenet", parser, faces="all")[0],
                       fm.face_attribute_masks(image[:1], ("hair",), "bisenet", parser, faces="largest")[0])


def test_bisenet_no_face():
    lab = torch.zeros(2, 512, 512, dtype=torch.long)
    lab[0] = hand_made_labels()
    lab[1, :50, :] = 17                                             # hair but no face: counts as no face
    parser = bis.FaceParser(net=FixedParser(lab))
    image = torch.rand(2, 64, 64, 3)
    with pytest.raises(fa.NoFaceError, match=r"image: no face was found in image 2 of 2 \(BiSeNet parsed less than "
                                             r"0\.1% of it as face.*if_no_face to 'empty mask'"):
        fm.face_attribute_masks(image, ("hair",), "bisenet", parser)
    masks = fm.face_attribute_masks(image, ("hair",), "bisenet", parser, if_no_face="empty mask")
    assert masks[0].sum() > 0 and masks[1].sum() == 0


# --- BiSeNet: loading and bad files ---------------------------------------------------------------

@pytest.fixture(scope="module")
def official_like(tmp_path_factory):
    """A random BiSeNet saved like the official file (a plain state dict, legacy torch.save format)."""
    d = tmp_path_factory.mktemp("face_parsing")
    sd = random_bisenet(seed=3).state_dict()
    torch.save(sd, d / "79999_iter.pth", _use_new_zipfile_serialization=False)
    return d / "79999_iter.pth", sd


def assert_loaded(parser, sd):
    got = parser.net.state_dict()
    assert set(got) == set(sd)
    for k, v in sd.items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(got[k], v.float()), k
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in parser.net.parameters())
    assert not any(t.is_meta for t in [*parser.net.parameters(), *parser.net.buffers()])
    assert not parser.net.training


def test_official_like_file_loads_exactly(official_like):
    path, sd = official_like
    parser = bis.load_face_parser(path)
    assert parser.name == "79999_iter.pth" and parser.device.type == "cpu"
    assert_loaded(parser, sd)
    x = torch.randn(1, 3, 64, 64)
    ref = random_bisenet(seed=3)
    with torch.no_grad():
        torch.testing.assert_close(parser.net(x), ref(x))


def test_other_containers_load(tmp_path, official_like):
    _, sd = official_like
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "a.safetensors")
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "b.pth")
    torch.save({k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}, tmp_path / "c.pth")
    torch.save({k: v.half() for k, v in sd.items()}, tmp_path / "d.pth")
    for name in ("a.safetensors", "b.pth", "c.pth"):
        assert_loaded(bis.load_face_parser(tmp_path / name), sd)
    half = bis.load_face_parser(tmp_path / "d.pth")
    assert half.net.conv_out.conv_out.weight.dtype == torch.float32
    torch.testing.assert_close(half.net.conv_out.conv_out.weight, sd["conv_out.conv_out.weight"].half().float())


def test_missing_empty_and_truncated_files(tmp_path, official_like):
    with pytest.raises(bis.FaceParsingFileError, match=r"does not exist; download the official BiSeNet face-parsing "
                                                      r"model 79999_iter\.pth \(https://drive\.google\.com/open\?id="
                                                      r"154JgKpzCPW82qINcVieuPH3fZ2e0P812"):
        bis.load_face_parser(tmp_path / "79999_iter.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(bis.FaceParsingFileError, match="empty.pth is empty"):
        bis.load_face_parser(tmp_path / "empty.pth")
    path, sd = official_like
    torch.save(sd, tmp_path / "zip.pth")
    for src in (path, tmp_path / "zip.pth"):
        data = src.read_bytes()
        for cut in (len(data) // 2, len(data) - 40, 200):
            bad = tmp_path / f"cut_{src.stem}_{cut}.pth"
            bad.write_bytes(data[:cut])
            with pytest.raises(bis.FaceParsingFileError, match=r"is damaged or incomplete \(a truncated download\?\)"):
                bis.load_face_parser(bad)
    from safetensors.torch import save_file
    save_file({"cp.resnet.conv1.weight": torch.zeros(64, 3, 7, 7)}, tmp_path / "t.safetensors")
    raw = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(raw[:-100])
    with pytest.raises(bis.FaceParsingFileError, match="t.safetensors is a damaged or incomplete safetensors file"):
        bis.load_face_parser(tmp_path / "t.safetensors")


def test_files_of_another_kind(tmp_path, official_like):
    _, sd = official_like
    raw = {
        "page.pth": (b"<!DOCTYPE html><html><body>Google Drive - Virus scan warning</body></html>", "web page"),
        "photo.pth": ((INPUTS / "personalize_cat_04.jpg").read_bytes(), "it is an image"),
        "notes.pth": (b"just some text", "not a PyTorch"),
    }
    for name, (content, msg) in raw.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(bis.FaceParsingFileError, match=msg):
            bis.load_face_parser(tmp_path / name)
    wrong = {k: v for k, v in sd.items() if k != "cp.arm16.conv_atten.weight"}
    more = dict(sd, **{"cp.sp.conv1.weight": torch.zeros(1)})
    shape = dict(sd, **{"ffm.conv1.weight": torch.zeros(32, 256, 1, 1)})
    classes = {k: (v[:18] if k.endswith("conv_out.weight") else v) for k, v in sd.items()}
    kinds = {
        "sam.pth": ({"image_encoder.patch_embed.proj.weight": torch.zeros(2), "mask_decoder.x": torch.zeros(2)},
                    "not a BiSeNet face-parsing model \\(it is a Segment Anything checkpoint"),
        "sd.pth": ({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)}, "Stable Diffusion"),
        "segformer.pth": ({"segformer.encoder.x": torch.zeros(2), "decode_head.y": torch.zeros(2)}, "SegFormer"),
        "other.pth": ({"backbone.conv.weight": torch.zeros(2)}, "not a BiSeNet face-parsing model: it has no"),
        "classes.pth": (classes, "a BiSeNet with 18 classes, not the 19"),
        "missing.pth": (wrong, r"keys 1 missing \(e\.g\. cp\.arm16\.conv_atten\.weight\)"),
        "more.pth": (more, r"1 unexpected \(e\.g\. cp\.sp\.conv1\.weight\)"),
        "shape.pth": (shape, r"1 of another shape \(e\.g\. ffm\.conv1\.weight: \(32, 256, 1, 1\) instead of "
                             r"\(64, 256, 1, 1\)\)"),
        "list.pth": ([torch.zeros(2)], "not a state dict of tensors"),
    }
    for name, (obj, msg) in kinds.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(bis.FaceParsingFileError, match=msg):
            bis.load_face_parser(tmp_path / name)


class Payload:
    """Unpickling this runs a shell command: a loader that unpickles arbitrary objects would create
    the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickled_objects_are_refused_and_never_run(tmp_path, official_like):
    _, sd = official_like
    marker = tmp_path / "ran"
    for fmt in (True, False):                                        # zip and legacy torch.save formats
        path = tmp_path / f"payload_{fmt}.pth"
        torch.save(dict(sd, extra=Payload(marker)), path, _use_new_zipfile_serialization=fmt)
        with pytest.raises(bis.FaceParsingFileError, match=r"holds pickled Python objects \(it asks to import "
                                                          r"(posix|os|nt)\.system\).*not unpickled for safety"):
            bis.load_face_parser(path)
        assert not marker.exists()
    torch.save({"cp.resnet.conv1.weight": torch.zeros(1), "cfg": types.SimpleNamespace(a=1)}, tmp_path / "obj.pth")
    with pytest.raises(bis.FaceParsingFileError, match="holds pickled Python objects"):
        bis.load_face_parser(tmp_path / "obj.pth")
