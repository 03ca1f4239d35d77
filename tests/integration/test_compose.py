"""The MuDI Subject and Subject Composer nodes inside a real ComfyUI: schema (tooltips, category,
output types), the nodes' execute on the shipped masked photos (as Load Image gives them), the chain,
image batches, and bad inputs. Skipped without ComfyUI (set COMFYUI_PATH)."""
from __future__ import annotations

import json

import pytest
import torch

from comfy_sampling import load_image, load_mask
from pack_paths import PACK_ROOT

INPUTS = PACK_ROOT / "workflows" / "inputs"


@pytest.fixture(scope="module")
def mudi():
    import comfy_host
    comfy_host.init_nodes_with_pack()
    from personalize_pack.nodes import mudi
    return mudi


def photo(stem, size=512):
    return load_image(INPUTS / f"{stem}.jpg", size), load_mask(INPUTS / f"{stem}_mask.jpg", size)


def two_subjects(mudi):
    node = mudi.PersonalizeSubject
    subjects = node.execute(*photo("personalize_cat_04"), "cat").result[0]
    return node.execute(*photo("personalize_dog6_02"), "dog", subjects).result[0]


def test_schema_tooltips_and_outputs(mudi):
    assert [c.GET_SCHEMA().node_id for c in mudi.NODES] == ["PersonalizeSubject", "PersonalizeSubjectComposer",
                                                            "PersonalizeMeanShiftedNoise"]
    for cls, display in ((mudi.PersonalizeSubject, "Subject (MuDI)"),
                         (mudi.PersonalizeSubjectComposer, "Subject Composer (MuDI)")):
        schema = cls.GET_SCHEMA()
        assert schema.node_id == cls.__name__ and schema.display_name == display
        assert schema.category == "personalize/mudi" and schema.description
        assert all(i.tooltip for i in schema.inputs), [i.id for i in schema.inputs if not i.tooltip]
    assert list(mudi.PersonalizeSubject.RETURN_TYPES) == ["PERSONALIZE_SUBJECTS"]
    assert list(mudi.PersonalizeSubjectComposer.RETURN_TYPES) == ["IMAGE", "MASK", "STRING"]
    req = mudi.PersonalizeSubjectComposer.INPUT_TYPES()["required"]
    assert req["width"][1]["default"] == 1024 and req["scale_min"][1]["default"] == 0.75
    assert req["placement"][1]["options"] == ["random", "left to right"]


def test_registered_with_the_pack(mudi):
    import nodes
    assert nodes.NODE_CLASS_MAPPINGS["PersonalizeSubjectComposer"].GET_SCHEMA().category == "personalize/mudi"


def test_compose_shipped_photos(mudi):
    subjects = two_subjects(mudi)
    assert [s.name for s in subjects] == ["cat", "dog"]
    comp = mudi.PersonalizeSubjectComposer
    image, masks, layout = comp.execute(subjects, 1024, 768, "random", 0.75, 1.0, 0.0, "white", 11, 32).result
    assert image.shape == (1, 768, 1024, 3) and image.dtype == torch.float32
    assert masks.shape == (2, 768, 1024) and masks.dtype == torch.float32
    assert 0 <= float(image.min()) and float(image.max()) <= 1
    lay = json.loads(layout)
    assert lay["canvas"]["width"] == 1024 and lay["canvas"]["height"] == 768
    assert [s["name"] for s in lay["subjects"]] == ["cat", "dog"] and sorted(lay["order"]) == [0, 1]
    for i, s in enumerate(lay["subjects"]):
        x0, y0, x1, y1 = s["box"]
        assert 0 <= x0 < x1 <= 1024 and 0 <= y0 < y1 <= 768
        assert 0.75 * s["max_scale"] - 1e-6 <= s["scale"] <= s["max_scale"] + 1e-6
        assert s["visible_pixels"] == int(masks[i].sum()) > 0
    assert (image[0][masks.sum(0) == 0] == 1).all()
    again = comp.execute(subjects, 1024, 768, "random", 0.75, 1.0, 0.0, "white", 11, 32).result
    assert torch.equal(again[0], image) and again[2] == layout
    ltr = comp.execute(subjects, 1024, 1024, "left to right", 0.75, 1.0, 0.0, "black", 0, 32).result
    boxes = [s["box"] for s in json.loads(ltr[2])["subjects"]]
    assert boxes[0][2] <= 512 <= boxes[1][0]


def test_batches_and_bad_inputs(mudi):
    node = mudi.PersonalizeSubject
    (cat, cat_m), (dog, dog_m) = photo("personalize_cat_04", 128), photo("personalize_dog6_02", 128)
    both = node.execute(torch.cat([cat, dog]), torch.cat([cat_m, dog_m]), "pet").result[0]
    assert [s.name for s in both] == ["pet 1", "pet 2"]
    unnamed = node.execute(cat, cat_m, "", both).result[0]
    assert unnamed[-1].name == "subject 3"
    with pytest.raises(ValueError, match="mask: 3 masks for 2 images"):
        node.execute(torch.cat([cat, dog]), torch.cat([cat_m, dog_m, dog_m]), "pet")
    with pytest.raises(ValueError, match="cat: the mask is empty"):
        node.execute(cat, torch.zeros_like(cat_m), "cat")
    with pytest.raises(ValueError, match="cat: the mask is 64x64 px but the image is 128x128 px"):
        node.execute(cat, cat_m[:, :64, :64], "cat")
    comp = mudi.PersonalizeSubjectComposer
    with pytest.raises(ValueError, match="no room for 3 subjects"):
        comp.execute(unnamed, 64, 256, "random", 0.75, 1.0, 0.0, "white", 0, 32)
    with pytest.raises(ValueError, match="no subjects"):
        comp.execute((), 256, 256, "random", 0.75, 1.0, 0.0, "white", 0, 32)
