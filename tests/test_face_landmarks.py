"""Face attribute masks from ComfyUI core's FACE_LANDMARKS (references/face_landmarks.py): exact masks on
a synthetic landmark set in core's layout (one 'irises' set, pixel landmarks, image_size), the payload
checks, and on a real photograph the same masks as the mediapipe provider when both paths get the same
face (the astronaut photo; skipped, saying why, without mediapipe or scikit-image)."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from personalize_pack.references import face_attributes as fa
from personalize_pack.references import face_landmarks as fl
from personalize_pack.references import face_masks as fm
from personalize_pack.references import face_mesh as mesh
from synthetic_faces import payload, synthetic_face

try:
    SOLUTIONS = mesh.import_solutions()
    from skimage import data as skdata
    MP_ERROR = None
except Exception as exc:
    MP_ERROR = f"{type(exc).__name__}: {str(exc).split(';')[0][:160]}"


def masks(lm, attrs, shape=(1, 100, 100), **kw):
    return fl.landmark_masks(lm, shape, attrs, **kw)


def test_exact_masks_on_a_synthetic_landmark_set():
    pts, sets = synthetic_face()
    lm = payload([[pts]], sets)

    def m(*a):
        return masks(lm, a)[0].bool()
    assert int(m("face").sum()) == 80 * 80
    left = m("left eye")
    assert int(left.sum()) == 20 * 10 and left[35, 70] and not left[35, 30]     # the person's left: image right
    assert int(m("right eye").sum()) == 20 * 10 and m("right eye")[35, 30]
    assert torch.equal(m("eyes"), m("left eye") | m("right eye"))
    assert int(m("mouth").sum()) == 30 * 15 and int(m("lips").sum()) == 30 * 15 - 20 * 5
    # core's single irises set is split; each ring is cut by its own eye (10 wide x 10 high inside it)
    iris = m("irises")
    assert not (iris & ~m("eyes")).any() and iris[35, 70] and iris[35, 30] and not iris[35, 50]
    assert int(iris[:, 50:].sum()) == int(iris[:, :50].sum()) > 0
    assert int(m("brows").sum()) == 2 * 20 * 4
    assert m("nose")[50, 50]
    skin = m("skin")
    assert int(skin.sum()) == int(m("face").sum()) - int((m("eyes") | m("brows") | m("mouth")).sum())
    # the same polygons as the mediapipe path's drawing, given the same landmarks and regions
    regions = fl.regions_for_face(fl.check_connection_sets(sets), pts)
    for a in fa.MEDIAPIPE_ATTRIBUTES:
        assert np.array_equal(mesh.landmark_mask(regions, pts, (a,), 100, 100), m(a).numpy()), a


def test_landmarks_are_scaled_faces_ordered_and_frames_matched():
    pts, sets = synthetic_face()
    # core ran on a 200 x 200 image; the mask is 100 x 100
    big = payload([[pts * 2]], sets, size=(200, 200))
    assert torch.equal(masks(big, ("face", "eyes")), masks(payload([[pts]], sets), ("face", "eyes")))
    small = pts * 0.25 + 2          # a small second face, listed first
    two = payload([[small, pts]], sets)
    assert int(masks(two, ("face",))[0].sum()) == 80 * 80                       # largest: the big face
    both = masks(two, ("face",), faces="all")[0]
    assert int(both.sum()) == 80 * 80 + 20 * 20 - int((masks(payload([[small]], sets), ("face",))[0]
                                                       * masks(payload([[pts]], sets), ("face",))[0]).sum())
    # one frame per image; one frame for a whole batch; a face-free frame
    per = payload([[pts], [pts * 0.5]], sets)
    out = masks(per, ("face",), shape=(2, 100, 100))
    assert int(out[0].sum()) == 6400 and int(out[1].sum()) == 40 * 40
    assert torch.equal(masks(payload([[pts]], sets), ("face",), shape=(3, 100, 100))[2], out[0])
    with pytest.raises(fa.NoFaceError, match=r"face_landmarks: no face in image 2 of 2 .*if_no_face"):
        masks(payload([[pts], []], sets), ("eyes",), shape=(2, 100, 100))
    empty = masks(payload([[pts], []], sets), ("eyes",), shape=(2, 100, 100), if_no_face="empty mask")
    assert empty[0].sum() > 0 and empty[1].sum() == 0


def test_bad_landmarks_name_the_input():
    pts, sets = synthetic_face()
    with pytest.raises(ValueError, match="face_landmarks: landmarks of 2 images for a batch of 3"):
        masks(payload([[pts], [pts]], sets), ("eyes",), shape=(3, 100, 100))
    with pytest.raises(ValueError, match="face_landmarks: expected core's FACE_LANDMARKS"):
        masks([pts], ("eyes",))
    lacking = {k: v for k, v in sets.items() if k != "irises"}
    with pytest.raises(ValueError, match="face_landmarks: its connection_sets lack irises"):
        masks(payload([[pts]], lacking), ("eyes",))
    with pytest.raises(ValueError, match=r"face_landmarks: image 1's face 1's landmarks_xy has shape \(30, 2\)"):
        masks(payload([[pts[:30]]], sets), ("eyes",))
    nan = pts.copy()
    nan[3, 0] = np.nan
    with pytest.raises(ValueError, match="face_landmarks: image 1's face 1's landmarks contain NaN"):
        masks(payload([[nan]], sets), ("eyes",))
    with pytest.raises(ValueError, match="face_landmarks: image_size is None"):
        masks(dict(payload([[pts]], sets), image_size=None), ("eyes",))
    with pytest.raises(ValueError, match="attributes: provider 'mediapipe' cannot mask 'hair'"):
        masks(payload([[pts]], sets), ("hair",))


def test_without_landmarks_or_mediapipe_the_error_says_which_to_provide(monkeypatch):
    monkeypatch.setitem(sys.modules, "mediapipe", None)
    with pytest.raises(ImportError, match=r"face_landmarks: the mediapipe provider needs face landmarks\. Either "
                                          r"connect core's 'Detect Face Landmarks \(MediaPipe\)' node .*or install "
                                          r"the mediapipe package.*mediapipe==0\.10\.21"):
        fm.face_attribute_masks(torch.rand(1, 32, 32, 3), ("eyes",))
    # with landmarks, no mediapipe is needed
    pts, sets = synthetic_face()
    got = fm.face_attribute_masks(torch.rand(1, 100, 100, 3), ("eyes",), landmarks=payload([[pts]], sets), grow=1)
    assert int(got.sum()) == 2 * 22 * 12


@pytest.mark.skipif(MP_ERROR is not None, reason=f"mediapipe or scikit-image cannot be imported ({MP_ERROR}); see "
                                                 f"tools/run_tests.sh")
def test_core_layout_of_mediapipes_landmarks_gives_the_mediapipe_masks():
    """The same face through both paths: MediaPipe's landmarks of the astronaut, handed over in core's
    FACE_LANDMARKS layout (core's set names, both irises in one set), give exactly the masks of the
    mediapipe provider, attribute by attribute."""
    image = torch.from_numpy(skdata.astronaut().astype("float32") / 255.0)[None]
    with mesh.FaceLandmarker() as finder:
        faces = finder.faces(fa.to_uint8_rgb(image[0]), largest_only=True)
    assert len(faces) == 1 and faces[0].shape == (478, 2)
    c = SOLUTIONS.face_mesh_connections
    sets = {"face_oval": c.FACEMESH_FACE_OVAL, "left_eye": c.FACEMESH_LEFT_EYE, "right_eye": c.FACEMESH_RIGHT_EYE,
            "left_eyebrow": c.FACEMESH_LEFT_EYEBROW, "right_eyebrow": c.FACEMESH_RIGHT_EYEBROW,
            "lips": c.FACEMESH_LIPS, "irises": c.FACEMESH_IRISES, "nose": c.FACEMESH_NOSE,
            "tesselation": c.FACEMESH_TESSELATION}
    lm = payload([faces], {k: frozenset(v) for k, v in sets.items()}, size=(512, 512))
    for a in fa.MEDIAPIPE_ATTRIBUTES:
        ours = fm.face_attribute_masks(image, (a,), landmarks=lm)
        theirs = fm.face_attribute_masks(image, (a,))
        assert ours.sum() > 0 and torch.equal(ours, theirs), a
