"""Face attribute masks (references/face_masks.py): attribute names and prompt words, mask growing,
the polygon geometry, the BiSeNet face parser (the official layout, pre-processing, loading and bad
files, labels to masks) with random weights, and MediaPipe masks on a real photograph (the
astronaut photo that ships in scikit-image, public domain). The MediaPipe tests skip, saying why,
when mediapipe or scikit-image cannot be imported; tools/run_tests.sh installs both."""
from __future__ import annotations

import hashlib
import os
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn as nn

from pack_paths import PACK_ROOT
from personalize_pack.references import face_masks as fm

INPUTS = PACK_ROOT / "workflows" / "inputs"
NO_FACE = ("personalize_mip_2_dice.jpg", "personalize_cat_04.jpg")     # dice pips and a cat: no human face

try:
    fm.import_solutions()
    MEDIAPIPE_ERROR = None
except Exception as exc:  # noqa: BLE001 - any import failure
    MEDIAPIPE_ERROR = f"{type(exc).__name__}: {str(exc).split(';')[0][:160]}"
try:
    from skimage import data as skdata
    SKIMAGE_ERROR = None
except Exception as exc:  # noqa: BLE001
    SKIMAGE_ERROR = f"{type(exc).__name__}: {exc}"

MEDIAPIPE_SKIP = pytest.mark.skipif(
    MEDIAPIPE_ERROR is not None or SKIMAGE_ERROR is not None,
    reason=(f"mediapipe cannot be imported ({MEDIAPIPE_ERROR}); pip install --no-deps mediapipe==0.10.21 and its "
            f"runtime deps (see tools/run_tests.sh)" if MEDIAPIPE_ERROR else
            f"scikit-image (the astronaut photo) cannot be imported ({SKIMAGE_ERROR}); pip install scikit-image"))


def load_rgb(path):
    from PIL import Image
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).astype("float32") / 255.0)


def centroid(mask):
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return float(xs.float().mean()), float(ys.float().mean())


# --- attribute names and prompt words ----------------------------------------------------------

def test_parse_attribute_lists():
    assert fm.parse_attributes("hair, eyes") == ("hair", "eyes")
    assert fm.parse_attributes(" Eyebrows;LIPS\nleft_eye , left-eye, eye ") == ("brows", "lips", "left eye", "eyes")
    assert fm.parse_attributes("glasses, eyeglasses, Spectacles") == ("glasses",)
    assert fm.parse_attributes("from prompt, ears", "a woman with red hair and blue eyes") == ("eyes", "hair", "ears")
    with pytest.raises(ValueError, match="attributes: empty; name the face attributes"):
        fm.parse_attributes(" , ")
    with pytest.raises(ValueError, match=r"attributes: unknown 'beard'; known: face, skin, eyes"):
        fm.parse_attributes("eyes, beard")
    with pytest.raises(ValueError, match="prompt: attributes says 'from prompt' but the prompt is empty"):
        fm.parse_attributes("from prompt", "  ")
    with pytest.raises(ValueError, match="prompt: no face attribute word in 'a man on a beach'"):
        fm.parse_attributes("from prompt", "a man on a beach")


@pytest.mark.parametrize("prompt,want", [
    # FreeCure's three keywords
    ("a photo of a man img with long blond hair", ("hair",)),
    ("a woman img with green eyes", ("eyes",)),
    ("a man img wearing glasses", ("glasses",)),
    ("a woman with curly pink hair, blue eyes and sunglasses", ("eyes", "hair", "glasses")),
    # whole words: eyeglasses names the glasses only (FreeCure's substring test also took the eyes)
    ("a man wearing eyeglasses", ("glasses",)),
    ("a red-haired, blue-eyed girl", ("eyes", "hair")),
    ("a woman wearing a pearl necklace", ("necklace",)),        # not the neck
    ("a woman with a long neck", ("neck",)),
    ("Thick EYEBROWS, red lipstick and a T-shirt", ("brows", "lips", "cloth")),
    ("a man in a hat with gold earrings", ("earrings", "hat")),
    ("dark-skinned man, big nose, open mouth", ("skin", "nose", "mouth")),
    ("a portrait of a man, captured in the studio", ()),       # 'captured' is not 'cap'
    ("", ()),
])
def test_attributes_from_prompt(prompt, want):
    assert set(fm.attributes_from_prompt(prompt)) == set(want)
    got = fm.attributes_from_prompt(prompt)
    assert list(got) == [a for a in fm.ATTRIBUTES if a in got]      # canonical order, each once


def test_providers_say_what_they_cannot_do():
    fm.check_supported(fm.MEDIAPIPE_ATTRIBUTES, "mediapipe")
    fm.check_supported(tuple(fm.BISENET_ATTRIBUTES), "bisenet")
    with pytest.raises(ValueError, match=r"provider 'mediapipe' cannot mask 'hair', 'glasses'\. MediaPipe finds face "
                                         r"landmarks only.*Use the bisenet provider.*79999_iter\.pth"):
        fm.check_supported(("eyes", "hair", "glasses"), "mediapipe")
    for attr in ("hat", "ears", "neck", "earrings", "necklace", "cloth"):
        with pytest.raises(ValueError, match="bisenet provider"):
            fm.check_supported((attr,), "mediapipe")
    with pytest.raises(ValueError, match=r"provider 'bisenet' cannot mask 'irises', 'left eye'.*mediapipe provider "
                                         r"draws irises, left eye"):
        fm.check_supported(("irises", "left eye"), "bisenet")
    with pytest.raises(ValueError, match="provider: unknown 'dlib'"):
        fm.check_supported(("eyes",), "dlib")


def test_bisenet_attribute_classes():
    labels = fm.BISENET_LABELS
    assert len(labels) == 19 and labels[0] == "background"
    # FreeCure's map: hair 17, eyes 4 and 5, glasses 6
    assert fm.BISENET_ATTRIBUTES["hair"] == (17,) and fm.BISENET_ATTRIBUTES["eyes"] == (4, 5)
    assert fm.BISENET_ATTRIBUTES["glasses"] == (6,)
    named = {"skin": "skin", "glasses": "eye_g", "earrings": "ear_r", "nose": "nose", "neck": "neck",
             "necklace": "neck_l", "cloth": "cloth", "hair": "hair", "hat": "hat"}
    for attr, label in named.items():
        assert [labels[i] for i in fm.BISENET_ATTRIBUTES[attr]] == [label]
    assert [labels[i] for i in fm.BISENET_ATTRIBUTES["brows"]] == ["l_brow", "r_brow"]
    assert [labels[i] for i in fm.BISENET_ATTRIBUTES["lips"]] == ["u_lip", "l_lip"]
    assert [labels[i] for i in fm.BISENET_ATTRIBUTES["mouth"]] == ["mouth", "u_lip", "l_lip"]
    assert [labels[i] for i in fm.BISENET_ATTRIBUTES["ears"]] == ["l_ear", "r_ear"]
    assert fm.bisenet_labels_for(("hair", "eyes", "glasses")) == (4, 5, 6, 17)


# --- masks: growing, overlay, options ----------------------------------------------------------

def test_grow_and_shrink():
    m = torch.zeros(1, 15, 15)
    m[0, 7, 7] = 1
    assert int(fm.grow_mask(m, 1).sum()) == 9                       # 3x3 square
    assert int(fm.grow_mask(m, 2).sum()) == 21                      # then a cross step: 5x5 without its corners
    g = fm.grow_mask(m, 4)
    assert torch.equal(g[0], g[0].flip(0)) and torch.equal(g[0], g[0].T)     # symmetric
    assert g[0, 7, 3] == 1 and g[0, 7, 2] == 0                      # reaches exactly 4 pixels along the axes
    sq = torch.zeros(2, 12, 12)
    sq[:, 2:9, 3:10] = 1
    assert torch.equal(fm.grow_mask(sq, -1)[0], torch.nn.functional.pad(torch.ones(5, 5), (4, 3, 3, 4)))
    assert int(fm.grow_mask(sq, -4).sum()) == 0
    assert torch.equal(fm.grow_mask(sq, 0), sq)
    edge = torch.zeros(1, 6, 6)
    edge[0, :, :3] = 1                                              # touching the border: not eroded from there
    assert torch.equal(fm.grow_mask(edge, -1)[0, :, :2], torch.ones(6, 2))
    assert set(fm.grow_mask(sq, 3).unique().tolist()) == {0.0, 1.0}


def test_overlay_and_bad_options():
    img = torch.rand(2, 8, 9, 3)
    mask = torch.zeros(2, 8, 9)
    mask[:, 2:5, 2:5] = 1
    prev = fm.overlay(img, mask)
    assert prev.shape == (2, 8, 9, 3)
    assert torch.equal(prev[mask == 0], img[mask == 0]) and not torch.equal(prev[mask == 1], img[mask == 1])
    with pytest.raises(ValueError, match="image: expected a ComfyUI IMAGE"):
        fm.face_attribute_masks(img[0], ("eyes",))
    with pytest.raises(ValueError, match="faces: unknown 'biggest'"):
        fm.face_attribute_masks(img, ("eyes",), faces="biggest")
    with pytest.raises(ValueError, match="if_no_face: unknown 'skip'"):
        fm.face_attribute_masks(img, ("eyes",), if_no_face="skip")
    with pytest.raises(ValueError, match="cannot mask 'hair'"):
        fm.face_attribute_masks(img, ("hair",), "mediapipe")
    with pytest.raises(ValueError, match="face_parser: the bisenet provider needs a face parser"):
        fm.face_attribute_masks(img, ("hair",), "bisenet")


def test_missing_mediapipe_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mediapipe", None)           # import raises ModuleNotFoundError
    with pytest.raises(ImportError, match=r"mediapipe package, which is not installed.*-m pip install --no-deps "
                                          r"mediapipe==0\.10\.21.*protobuf>=4\.25\.3,<5"):
        fm.import_solutions()


def test_mediapipe_without_legacy_solutions(monkeypatch):
    fake = types.ModuleType("mediapipe")
    fake.__version__ = "1.2.2"
    fake.__path__ = []
    monkeypatch.setitem(sys.modules, "mediapipe", fake)
    monkeypatch.setitem(sys.modules, "mediapipe.python", None)
    with pytest.raises(ImportError, match=r"mediapipe 1\.2\.2 has no legacy solutions.*mediapipe==0\.10\.21"):
        fm.import_solutions()


# --- polygon geometry ---------------------------------------------------------------------------

def test_edge_paths_kinds():
    loop = {(3, 1), (1, 2), (2, 4), (4, 3)}
    chains = {(10, 11), (11, 12), (20, 21), (22, 21)}
    graph = {(30, 31), (31, 32), (31, 33)}
    parts = fm.edge_paths(loop | chains | graph)
    assert ((1, 2, 4, 3), "loop") in parts or ((1, 3, 4, 2), "loop") in parts
    assert ((10, 11, 12), "path") in parts and ((20, 21, 22), "path") in parts
    assert ((30, 31, 32, 33), "graph") in parts
    assert len(parts) == 4


def test_polygon_helpers():
    square = np.array([[0, 0], [4, 0], [4, 3], [0, 3]], dtype=float)
    assert fm.polygon_area(square) == 12 and fm.polygon_area(square[::-1]) == 12
    inner = np.array([[1, 1], [2, 2], [3, 1], [2, 1.5]])
    hull = fm.convex_hull(np.concatenate([square, inner]))
    assert fm.polygon_area(hull) == 12 and len(hull) == 4
    # an eyebrow: an upper and a lower chain, both left to right; stitched they enclose the brow
    pts = np.array([[0, 1], [2, 0], [4, 1], [0, 2], [2, 1.5], [4, 2]], dtype=float)
    order = fm.stitch_paths([(0, 1, 2), (3, 4, 5)], pts)
    assert order == [0, 1, 2, 5, 4, 3]
    mask = fm.fill_polygons([square + 2], 10, 10)                  # x 2..6, y 2..5: pixel edges
    want = np.zeros((10, 10), bool)
    want[2:5, 2:6] = True
    assert (mask == want).all()
    tri = fm.fill_polygons([np.array([[0, 0], [8, 0], [0, 8]], float)], 10, 10)
    assert tri.sum() == 28 and tri[0, 6] and not tri[0, 7] and tri[6, 0] and not tri[7, 0]    # centres below x + y = 8
    ring = fm.fill_polygons([square * 2, square * 2 + 12], 20, 20)   # several polygons: their union
    assert ring.sum() == 2 * 8 * 6
    clipped = fm.fill_polygons([np.array([[-5, -5], [30, -5], [30, 3], [-5, 3]], float)], 10, 10)
    assert clipped[:3].all() and not clipped[3:].any()


def test_landmark_masks_on_a_synthetic_mesh():
    """A made-up 'face mesh' with mediapipe's set names: the lips are an outer and an inner loop,
    the mouth is the outer one filled, the irises are cut by the eye outline, skin excludes the features."""
    def ring(ids):
        return {(ids[i], ids[(i + 1) % len(ids)]) for i in range(len(ids))}
    P = {}

    def box(ids, x0, y0, x1, y1):
        for i, p in zip(ids, [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]):
            P[i] = p
        return ring(ids)
    c = types.SimpleNamespace(
        FACEMESH_FACE_OVAL=box([0, 1, 2, 3], 10, 10, 90, 90),
        FACEMESH_LEFT_EYE=box([4, 5, 6, 7], 60, 30, 80, 40), FACEMESH_RIGHT_EYE=box([8, 9, 10, 11], 20, 30, 40, 40),
        FACEMESH_LEFT_IRIS=box([12, 13, 14, 15], 65, 25, 75, 45), FACEMESH_RIGHT_IRIS=box([16, 17, 18, 19], 25, 25, 35, 45),
        FACEMESH_LEFT_EYEBROW={(20, 21), (22, 23)}, FACEMESH_RIGHT_EYEBROW={(24, 25), (26, 27)},
        FACEMESH_LIPS=box([28, 29, 30, 31], 35, 65, 65, 80) | box([32, 33, 34, 35], 40, 70, 60, 75),
        FACEMESH_NOSE={(36, 37), (37, 38), (37, 39)})
    P.update({20: (60, 20), 21: (80, 20), 22: (60, 24), 23: (80, 24), 24: (20, 20), 25: (40, 20), 26: (20, 24),
              27: (40, 24), 36: (50, 35), 37: (50, 55), 38: (44, 60), 39: (56, 60)})
    pts = np.array([P[i] for i in range(40)], dtype=float)
    r = fm.FaceMeshRegions.from_connections(c)

    def m(*attrs):
        return fm.landmark_mask(r, pts, attrs, 100, 100)
    assert m("face").sum() == 80 * 80
    assert m("left eye").sum() == 20 * 10 and m("left eye")[35, 70] and not m("left eye")[35, 30]
    assert (m("eyes") == (m("left eye") | m("right eye"))).all()
    assert m("mouth").sum() == 30 * 15 and m("lips").sum() == 30 * 15 - 20 * 5 and not m("lips")[72, 50]
    iris = m("irises")
    assert iris.sum() > 0 and not (iris & ~m("eyes")).any() and not iris[27, 70]     # cut by the eyelids
    assert m("brows").sum() == 2 * 20 * 4                         # two chains joined into a 20x4 outline each
    assert m("nose")[50, 50] and m("nose").sum() > 0              # a graph: its convex hull
    skin = m("skin")
    assert not (skin & (m("eyes") | m("brows") | m("mouth"))).any()
    assert skin.sum() == m("face").sum() - (m("eyes") | m("brows") | m("mouth")).sum()
    with pytest.raises(ImportError, match="lacks FACEMESH_NOSE"):
        fm.FaceMeshRegions.from_connections(types.SimpleNamespace(**{k: v for k, v in vars(c).items()
                                                                      if k != "FACEMESH_NOSE"}))


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


def random_bisenet(seed=0) -> fm.BiSeNet:
    torch.manual_seed(seed)
    net = fm.build_bisenet()
    for mod in net.modules():         # non-trivial BatchNorm statistics
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 1.5)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.2, 0.2)
    return net.eval()


def test_bisenet_matches_the_official_layout():
    with torch.device("meta"):
        sd = fm.BiSeNet(19).state_dict()
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
    parser = fm.FaceParser(net=random_bisenet())
    images = torch.rand(2, 90, 70, 3)
    labels = fm.parse_labels(parser, images, chunk=1)
    assert labels.shape == (2, 90, 70) and labels.dtype == torch.int64
    assert int(labels.min()) >= 0 and int(labels.max()) <= 18
    with torch.no_grad():                                           # = argmax at 512, resized back (nearest)
        full = parser.net(fm.preprocess_bisenet(images[1:])).argmax(1)
    assert full.shape == (1, 512, 512)
    assert torch.equal(labels[1:], fm.resize_labels(full, 90, 70))


def test_preprocess_resizes_like_pil_and_normalises():
    from PIL import Image
    torch.manual_seed(1)
    img = torch.rand(1, 700, 600, 3)
    x = fm.preprocess_bisenet(img)
    assert x.shape == (1, 3, 512, 512)
    for c in range(3):
        want = np.asarray(Image.fromarray(img[0, ..., c].numpy(), mode="F").resize((512, 512), Image.BILINEAR))
        want = (want - fm.IMAGENET_MEAN[c]) / fm.IMAGENET_STD[c]
        np.testing.assert_allclose(x[0, c].numpy(), want, atol=2e-4)
    flat = fm.preprocess_bisenet(torch.full((1, 512, 512, 3), 0.5))
    for c in range(3):
        want = (0.5 - fm.IMAGENET_MEAN[c]) / fm.IMAGENET_STD[c]
        torch.testing.assert_close(flat[0, c], torch.full((512, 512), want), atol=1e-6, rtol=0)


def test_resize_labels_is_nearest():
    lab = torch.tensor([[[0, 1], [2, 3]]])
    assert torch.equal(fm.resize_labels(lab, 4, 6), torch.tensor([[[0, 0, 0, 1, 1, 1]] * 2 + [[2, 2, 2, 3, 3, 3]] * 2]))


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
    for attr, ids in fm.BISENET_ATTRIBUTES.items():
        m = fm.labels_to_mask(lab, (attr,))
        want = sum((lab == i).float() for i in ids)
        assert torch.equal(m, want), attr
        assert m.sum() > 0, attr
    m = fm.labels_to_mask(lab, ("hair", "eyes", "glasses"))           # FreeCure's three
    assert torch.equal(m, ((lab == 17) | (lab == 4) | (lab == 5) | (lab == 6)).float())
    face = fm.labels_to_mask(lab, ("face",))
    assert torch.equal(face, torch.isin(lab, torch.tensor(fm.FACE_LABELS)).float())
    assert face[0, 100, 256] == 0 and face[0, 256, 256] == 1          # hair is not face
    assert fm.has_face(lab).tolist() == [True]
    no = torch.zeros(2, 100, 100, dtype=torch.long)
    no[1, :10, :10] = 1                                               # 1% skin: a face
    no[0, :2, :2] = 1                                                 # 0.04%: not
    assert fm.has_face(no).tolist() == [False, True]


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
    parser = fm.FaceParser(net=FixedParser(lab[None]))
    image = torch.rand(3, 150, 100, 3)
    calls = []
    masks = fm.face_attribute_masks(image, ("hair", "eyes"), "bisenet", parser, progress=calls.append)
    assert masks.shape == (3, 150, 100) and masks.dtype == torch.float32
    want = fm.resize_labels(((lab == 17) | (lab == 4) | (lab == 5)).long()[None], 150, 100).float()[0]
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
    parser = fm.FaceParser(net=FixedParser(lab))
    image = torch.rand(2, 64, 64, 3)
    with pytest.raises(fm.NoFaceError, match=r"image: no face was found in image 2 of 2 \(BiSeNet parsed less than "
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
    parser = fm.load_face_parser(path)
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
        assert_loaded(fm.load_face_parser(tmp_path / name), sd)
    half = fm.load_face_parser(tmp_path / "d.pth")
    assert half.net.conv_out.conv_out.weight.dtype == torch.float32
    torch.testing.assert_close(half.net.conv_out.conv_out.weight, sd["conv_out.conv_out.weight"].half().float())


def test_missing_empty_and_truncated_files(tmp_path, official_like):
    with pytest.raises(fm.FaceParsingFileError, match=r"does not exist; download the official BiSeNet face-parsing "
                                                      r"model 79999_iter\.pth \(https://drive\.google\.com/open\?id="
                                                      r"154JgKpzCPW82qINcVieuPH3fZ2e0P812"):
        fm.load_face_parser(tmp_path / "79999_iter.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(fm.FaceParsingFileError, match="empty.pth is empty"):
        fm.load_face_parser(tmp_path / "empty.pth")
    path, sd = official_like
    torch.save(sd, tmp_path / "zip.pth")
    for src in (path, tmp_path / "zip.pth"):
        data = src.read_bytes()
        for cut in (len(data) // 2, len(data) - 40, 200):
            bad = tmp_path / f"cut_{src.stem}_{cut}.pth"
            bad.write_bytes(data[:cut])
            with pytest.raises(fm.FaceParsingFileError, match=r"is damaged or incomplete \(a truncated download\?\)"):
                fm.load_face_parser(bad)
    from safetensors.torch import save_file
    save_file({"cp.resnet.conv1.weight": torch.zeros(64, 3, 7, 7)}, tmp_path / "t.safetensors")
    raw = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(raw[:-100])
    with pytest.raises(fm.FaceParsingFileError, match="t.safetensors is a damaged or incomplete safetensors file"):
        fm.load_face_parser(tmp_path / "t.safetensors")


def test_files_of_another_kind(tmp_path, official_like):
    _, sd = official_like
    raw = {
        "page.pth": (b"<!DOCTYPE html><html><body>Google Drive - Virus scan warning</body></html>", "web page"),
        "photo.pth": ((INPUTS / "personalize_cat_04.jpg").read_bytes(), "it is an image"),
        "notes.pth": (b"just some text", "not a PyTorch"),
    }
    for name, (content, msg) in raw.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(fm.FaceParsingFileError, match=msg):
            fm.load_face_parser(tmp_path / name)
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
        with pytest.raises(fm.FaceParsingFileError, match=msg):
            fm.load_face_parser(tmp_path / name)


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
        with pytest.raises(fm.FaceParsingFileError, match=r"holds pickled Python objects \(it asks to import "
                                                          r"(posix|os|nt)\.system\).*not unpickled for safety"):
            fm.load_face_parser(path)
        assert not marker.exists()
    torch.save({"cp.resnet.conv1.weight": torch.zeros(1), "cfg": types.SimpleNamespace(a=1)}, tmp_path / "obj.pth")
    with pytest.raises(fm.FaceParsingFileError, match="holds pickled Python objects"):
        fm.load_face_parser(tmp_path / "obj.pth")


# --- MediaPipe on a real face ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def astronaut():
    return torch.from_numpy(skdata.astronaut().astype("float32") / 255.0)[None]     # [1, 512, 512, 3]


@pytest.fixture(scope="module")
def astro_masks(astronaut):
    return {a: fm.face_attribute_masks(astronaut, (a,))[0] for a in fm.MEDIAPIPE_ATTRIBUTES}


@MEDIAPIPE_SKIP
class TestMediaPipeOnAPhoto:
    @pytest.mark.parametrize("attr", fm.MEDIAPIPE_ATTRIBUTES)
    def test_masks_are_binary_at_the_image_size(self, attr, astro_masks):
        m = astro_masks[attr]
        assert m.shape == (512, 512) and m.dtype == torch.float32
        assert set(m.unique().tolist()) == {0.0, 1.0}
        # every attribute lies on the astronaut's face (x 179..271, y 71..178 in the 512 px photo)
        x, y = centroid(m)
        assert 180 < x < 270 and 75 < y < 180, (attr, x, y)

    def test_the_regions_fit_together(self, astro_masks):
        m = {a: v.bool() for a, v in astro_masks.items()}
        face = m["face"]
        for a in ("eyes", "irises", "brows", "nose", "mouth", "lips", "skin"):
            assert not (m[a] & ~face).any(), f"{a} leaves the face oval"
        assert face.sum() > 6000                                      # a ~90 x 105 px face
        assert (m["eyes"] == (m["left eye"] | m["right eye"])).all() and not (m["left eye"] & m["right eye"]).any()
        assert not (m["irises"] & ~m["eyes"]).any() and 0 < m["irises"].sum() < m["eyes"].sum()
        assert not (m["lips"] & ~m["mouth"]).any() and m["lips"].sum() < m["mouth"].sum()
        assert not (m["skin"] & (m["eyes"] | m["brows"] | m["mouth"])).any()
        assert m["skin"].sum() > 0.7 * face.sum()
        y = {a: centroid(m[a])[1] for a in ("brows", "eyes", "nose", "mouth", "lips")}
        assert y["brows"] < y["eyes"] < y["nose"] < y["mouth"]            # top to bottom
        assert y["lips"] - y["eyes"] > 30
        # the person's left eye appears on the image's right (the astronaut faces the camera)
        assert centroid(m["left eye"])[0] > centroid(m["right eye"])[0] + 30
        assert abs(centroid(m["eyes"])[0] - centroid(m["mouth"])[0]) < 10

    def test_a_union_and_grow(self, astronaut, astro_masks):
        both = fm.face_attribute_masks(astronaut, fm.parse_attributes("eyes, lips"))[0]
        assert torch.equal(both, ((astro_masks["eyes"] + astro_masks["lips"]) > 0).float())
        grown = fm.face_attribute_masks(astronaut, ("eyes",), grow=4)[0]
        assert (grown >= astro_masks["eyes"]).all() and grown.sum() > 2 * astro_masks["eyes"].sum()
        shrunk = fm.face_attribute_masks(astronaut, ("face",), grow=-3)[0]
        assert (shrunk <= astro_masks["face"]).all() and 0 < shrunk.sum() < astro_masks["face"].sum()

    def test_a_crop_gives_the_same_mask_shifted(self, astronaut, astro_masks):
        crop = astronaut[:, 30:330, 100:380]                          # 300 x 280, not square
        m = fm.face_attribute_masks(crop, ("mouth",))
        assert m.shape == (1, 300, 280)
        want = astro_masks["mouth"][30:330, 100:380]
        inter = float((m[0] * want).sum())
        union = float(((m[0] + want) > 0).sum())
        assert inter / union > 0.8

    def test_largest_or_all_faces(self, astronaut):
        """Two astronauts side by side, the second smaller: largest keeps the first, all takes both."""
        import torch.nn.functional as F
        face = astronaut[:, 20:240, 110:340]                           # 220 x 230
        small = F.interpolate(face.permute(0, 3, 1, 2), size=(132, 138), mode="bilinear",
                              align_corners=False).permute(0, 2, 3, 1)
        canvas = torch.full((1, 220, 390, 3), 0.75)
        canvas[:, :, :230] = face
        canvas[:, 40:172, 240:378] = small
        largest = fm.face_attribute_masks(canvas, ("eyes", "mouth"), faces="largest")[0]
        every = fm.face_attribute_masks(canvas, ("eyes", "mouth"), faces="all")[0]
        assert largest[:, :230].sum() > 0 and largest[:, 230:].sum() == 0
        assert torch.equal(every[:, :230], largest[:, :230]) and every[:, 240:].sum() > 0
        assert every[:, 240:].sum() < every[:, :230].sum()

    @pytest.mark.parametrize("name", NO_FACE)
    def test_no_face_is_a_clear_error_or_an_empty_mask(self, name, astronaut):
        img = load_rgb(INPUTS / name)[None]
        with pytest.raises(fm.NoFaceError, match=r"image: no face was found in the image \(MediaPipe's face detector "
                                                 r"found none.*Set if_no_face to 'empty mask'"):
            fm.face_attribute_masks(img, ("eyes",))
        empty = fm.face_attribute_masks(img, ("eyes",), if_no_face="empty mask")
        assert empty.shape == (1, 512, 512) and empty.sum() == 0
        batch = torch.cat([astronaut, img])
        with pytest.raises(fm.NoFaceError, match="no face was found in image 2 of 2"):
            fm.face_attribute_masks(batch, ("eyes",))
        calls = []
        masks = fm.face_attribute_masks(batch, ("eyes",), if_no_face="empty mask", progress=calls.append)
        assert masks.shape == (2, 512, 512) and masks[0].sum() > 0 and masks[1].sum() == 0
        assert calls == [1, 2]
        assert torch.equal(masks[0], fm.face_attribute_masks(astronaut, ("eyes",))[0])

    def test_grey_and_rgba_images(self, astronaut):
        grey = astronaut.mean(-1, keepdim=True)
        rgba = torch.cat([astronaut, torch.ones_like(astronaut[..., :1])], -1)
        assert fm.face_attribute_masks(grey, ("eyes",)).sum() > 0
        assert torch.equal(fm.face_attribute_masks(rgba, ("eyes",)), fm.face_attribute_masks(astronaut, ("eyes",)))

    def test_interrupt_is_checked_per_image(self, astronaut):
        class Stop(Exception):
            pass

        def stop():
            raise Stop
        with pytest.raises(Stop):
            fm.face_attribute_masks(astronaut, ("eyes",), check_interrupt=stop)
