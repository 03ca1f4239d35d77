"""The mediapipe provider (references/face_mesh.py): what a missing or too new mediapipe says, the
polygon geometry through the face mesh, and MediaPipe masks on a real photograph (the astronaut photo
that ships in scikit-image, public domain). The photo tests skip, saying why, when mediapipe or
scikit-image cannot be imported; tools/run_tests.sh installs both."""
from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch

from pack_paths import PACK_ROOT
from personalize_pack.references import face_attributes as fa
from personalize_pack.references import face_masks as fm
from personalize_pack.references import face_mesh as mesh

INPUTS = PACK_ROOT / "workflows" / "inputs"
NO_FACE = ("personalize_mip_2_dice.jpg", "personalize_cat_04.jpg")     # dice pips and a cat: no human face

try:
    mesh.import_solutions()
    MEDIAPIPE_ERROR = None
except Exception as exc:
    MEDIAPIPE_ERROR = f"{type(exc).__name__}: {str(exc).split(';')[0][:160]}"
try:
    from skimage import data as skdata
    SKIMAGE_ERROR = None
except Exception as exc:
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


# --- importing mediapipe ---------------------------------------------------------------------------

def test_missing_mediapipe_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mediapipe", None)           # import raises ModuleNotFoundError
    with pytest.raises(ImportError, match=r"mediapipe package, which is not installed.*-m pip install --no-deps "
                                          r"mediapipe==0\.10\.21.*protobuf>=4\.25\.3,<5"):
        mesh.import_solutions()


def test_mediapipe_without_legacy_solutions(monkeypatch):
    fake = types.ModuleType("mediapipe")
    fake.__version__ = "1.2.2"
    fake.__path__ = []
    monkeypatch.setitem(sys.modules, "mediapipe", fake)
    monkeypatch.setitem(sys.modules, "mediapipe.python", None)
    with pytest.raises(ImportError, match=r"mediapipe 1\.2\.2 has no legacy solutions.*mediapipe==0\.10\.21"):
        mesh.import_solutions()


# --- polygon geometry ---------------------------------------------------------------------------

def test_edge_paths_kinds():
    loop = {(3, 1), (1, 2), (2, 4), (4, 3)}
    chains = {(10, 11), (11, 12), (20, 21), (22, 21)}
    graph = {(30, 31), (31, 32), (31, 33)}
    parts = mesh.edge_paths(loop | chains | graph)
    assert ((1, 2, 4, 3), "loop") in parts or ((1, 3, 4, 2), "loop") in parts
    assert ((10, 11, 12), "path") in parts and ((20, 21, 22), "path") in parts
    assert ((30, 31, 32, 33), "graph") in parts
    assert len(parts) == 4


def test_polygon_helpers():
    square = np.array([[0, 0], [4, 0], [4, 3], [0, 3]], dtype=float)
    assert mesh.polygon_area(square) == 12 and mesh.polygon_area(square[::-1]) == 12
    inner = np.array([[1, 1], [2, 2], [3, 1], [2, 1.5]])
    hull = mesh.convex_hull(np.concatenate([square, inner]))
    assert mesh.polygon_area(hull) == 12 and len(hull) == 4
    # an eyebrow: an upper and a lower chain, both left to right; stitched they enclose the brow
    pts = np.array([[0, 1], [2, 0], [4, 1], [0, 2], [2, 1.5], [4, 2]], dtype=float)
    order = mesh.stitch_paths([(0, 1, 2), (3, 4, 5)], pts)
    assert order == [0, 1, 2, 5, 4, 3]
    mask = mesh.fill_polygons([square + 2], 10, 10)                  # x 2..6, y 2..5: pixel edges
    want = np.zeros((10, 10), bool)
    want[2:5, 2:6] = True
    assert (mask == want).all()
    tri = mesh.fill_polygons([np.array([[0, 0], [8, 0], [0, 8]], float)], 10, 10)
    assert tri.sum() == 28 and tri[0, 6] and not tri[0, 7] and tri[6, 0] and not tri[7, 0]    # centres below x + y = 8
    ring = mesh.fill_polygons([square * 2, square * 2 + 12], 20, 20)   # several polygons: their union
    assert ring.sum() == 2 * 8 * 6
    clipped = mesh.fill_polygons([np.array([[-5, -5], [30, -5], [30, 3], [-5, 3]], float)], 10, 10)
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
    r = mesh.FaceMeshRegions.from_connections(c)

    def m(*attrs):
        return mesh.landmark_mask(r, pts, attrs, 100, 100)
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
        mesh.FaceMeshRegions.from_connections(types.SimpleNamespace(**{k: v for k, v in vars(c).items()
                                                                      if k != "FACEMESH_NOSE"}))


# --- MediaPipe on a real face ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def astronaut():
    return torch.from_numpy(skdata.astronaut().astype("float32") / 255.0)[None]     # [1, 512, 512, 3]


@pytest.fixture(scope="module")
def astro_masks(astronaut):
    return {a: fm.face_attribute_masks(astronaut, (a,))[0] for a in fa.MEDIAPIPE_ATTRIBUTES}


@MEDIAPIPE_SKIP
class TestMediaPipeOnAPhoto:
    @pytest.mark.parametrize("attr", fa.MEDIAPIPE_ATTRIBUTES)
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
        both = fm.face_attribute_masks(astronaut, fa.parse_attributes("eyes, lips"))[0]
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
        with pytest.raises(fa.NoFaceError, match=r"image: no face was found in the image \(MediaPipe's face detector "
                                                 r"found none.*Set if_no_face to 'empty mask'"):
            fm.face_attribute_masks(img, ("eyes",))
        empty = fm.face_attribute_masks(img, ("eyes",), if_no_face="empty mask")
        assert empty.shape == (1, 512, 512) and empty.sum() == 0
        batch = torch.cat([astronaut, img])
        with pytest.raises(fa.NoFaceError, match="no face was found in image 2 of 2"):
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
