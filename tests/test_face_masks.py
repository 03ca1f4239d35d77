"""The face attribute mask dispatcher (references/face_masks.py): the option checks that come before
either provider runs, and the preview overlay. The providers' own tests are in test_face_mesh.py
(mediapipe) and test_bisenet.py (BiSeNet)."""
from __future__ import annotations

import pytest
import torch

from personalize_pack.references import face_attributes as fa
from personalize_pack.references import face_masks as fm

# --- masks: overlay, options ----------------------------------------------------------------------

def test_overlay_and_bad_options():
    img = torch.rand(2, 8, 9, 3)
    mask = torch.zeros(2, 8, 9)
    mask[:, 2:5, 2:5] = 1
    prev = fa.overlay(img, mask)
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
