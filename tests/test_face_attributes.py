"""Face attributes (references/face_attributes.py): attribute names, their other spellings and the
prompt words that name them, what each provider can draw, the BiSeNet classes behind each attribute,
and mask growing."""
from __future__ import annotations

import pytest
import torch

from personalize_pack.references import face_attributes as fa

# --- attribute names and prompt words ----------------------------------------------------------

def test_parse_attribute_lists():
    assert fa.parse_attributes("hair, eyes") == ("hair", "eyes")
    assert fa.parse_attributes(" Eyebrows;LIPS\nleft_eye , left-eye, eye ") == ("brows", "lips", "left eye", "eyes")
    assert fa.parse_attributes("glasses, eyeglasses, Spectacles") == ("glasses",)
    assert fa.parse_attributes("from prompt, ears", "a woman with red hair and blue eyes") == ("eyes", "hair", "ears")
    with pytest.raises(ValueError, match="attributes: empty; name the face attributes"):
        fa.parse_attributes(" , ")
    with pytest.raises(ValueError, match=r"attributes: unknown 'beard'; known: face, skin, eyes"):
        fa.parse_attributes("eyes, beard")
    with pytest.raises(ValueError, match="prompt: attributes says 'from prompt' but the prompt is empty"):
        fa.parse_attributes("from prompt", "  ")
    with pytest.raises(ValueError, match="prompt: no face attribute word in 'a man on a beach'"):
        fa.parse_attributes("from prompt", "a man on a beach")


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
    assert set(fa.attributes_from_prompt(prompt)) == set(want)
    got = fa.attributes_from_prompt(prompt)
    assert list(got) == [a for a in fa.ATTRIBUTES if a in got]      # canonical order, each once


def test_providers_say_what_they_cannot_do():
    fa.check_supported(fa.MEDIAPIPE_ATTRIBUTES, "mediapipe")
    fa.check_supported(tuple(fa.BISENET_ATTRIBUTES), "bisenet")
    with pytest.raises(ValueError, match=r"provider 'mediapipe' cannot mask 'hair', 'glasses'\. MediaPipe finds face "
                                         r"landmarks only.*Use the bisenet provider.*79999_iter\.pth"):
        fa.check_supported(("eyes", "hair", "glasses"), "mediapipe")
    for attr in ("hat", "ears", "neck", "earrings", "necklace", "cloth"):
        with pytest.raises(ValueError, match="bisenet provider"):
            fa.check_supported((attr,), "mediapipe")
    with pytest.raises(ValueError, match=r"provider 'bisenet' cannot mask 'irises', 'left eye'.*mediapipe provider "
                                         r"draws irises, left eye"):
        fa.check_supported(("irises", "left eye"), "bisenet")
    with pytest.raises(ValueError, match="provider: unknown 'dlib'"):
        fa.check_supported(("eyes",), "dlib")


def test_bisenet_attribute_classes():
    labels = fa.BISENET_LABELS
    assert len(labels) == 19 and labels[0] == "background"
    # FreeCure's map: hair 17, eyes 4 and 5, glasses 6
    assert fa.BISENET_ATTRIBUTES["hair"] == (17,) and fa.BISENET_ATTRIBUTES["eyes"] == (4, 5)
    assert fa.BISENET_ATTRIBUTES["glasses"] == (6,)
    named = {"skin": "skin", "glasses": "eye_g", "earrings": "ear_r", "nose": "nose", "neck": "neck",
             "necklace": "neck_l", "cloth": "cloth", "hair": "hair", "hat": "hat"}
    for attr, label in named.items():
        assert [labels[i] for i in fa.BISENET_ATTRIBUTES[attr]] == [label]
    assert [labels[i] for i in fa.BISENET_ATTRIBUTES["brows"]] == ["l_brow", "r_brow"]
    assert [labels[i] for i in fa.BISENET_ATTRIBUTES["lips"]] == ["u_lip", "l_lip"]
    assert [labels[i] for i in fa.BISENET_ATTRIBUTES["mouth"]] == ["mouth", "u_lip", "l_lip"]
    assert [labels[i] for i in fa.BISENET_ATTRIBUTES["ears"]] == ["l_ear", "r_ear"]
    assert fa.bisenet_labels_for(("hair", "eyes", "glasses")) == (4, 5, 6, 17)



# --- masks: growing, overlay, options ----------------------------------------------------------

def test_grow_and_shrink():
    m = torch.zeros(1, 15, 15)
    m[0, 7, 7] = 1
    assert int(fa.grow_mask(m, 1).sum()) == 9                       # 3x3 square
    assert int(fa.grow_mask(m, 2).sum()) == 21                      # then a cross step: 5x5 without its corners
    g = fa.grow_mask(m, 4)
    assert torch.equal(g[0], g[0].flip(0)) and torch.equal(g[0], g[0].T)     # symmetric
    assert g[0, 7, 3] == 1 and g[0, 7, 2] == 0                      # reaches exactly 4 pixels along the axes
    sq = torch.zeros(2, 12, 12)
    sq[:, 2:9, 3:10] = 1
    assert torch.equal(fa.grow_mask(sq, -1)[0], torch.nn.functional.pad(torch.ones(5, 5), (4, 3, 3, 4)))
    assert int(fa.grow_mask(sq, -4).sum()) == 0
    assert torch.equal(fa.grow_mask(sq, 0), sq)
    edge = torch.zeros(1, 6, 6)
    edge[0, :, :3] = 1                                              # touching the border: not eroded from there
    assert torch.equal(fa.grow_mask(edge, -1)[0, :, :2], torch.ones(6, 2))
    assert set(fa.grow_mask(sq, 3).unique().tolist()) == {0.0, 1.0}
