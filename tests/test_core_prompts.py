"""Boxes and points from other ComfyUI nodes (references/core_prompts.py): core's BOUNDING_BOX in its
three shapes, the JSON points of core's SAM3 Detect, and the messages that name the input."""
from __future__ import annotations

import json

import pytest

from personalize_pack.references import core_prompts as cp


def test_bounding_box_writes_cores_layout():
    assert cp.bounding_box(10, 20, 40, 60) == {"x": 10.0, "y": 20.0, "width": 30.0, "height": 40.0}
    assert cp.bounding_box(1, 2, 3, 5, "cat", 0.75) == {"x": 1.0, "y": 2.0, "width": 2.0, "height": 3.0,
                                                        "label": "cat", "score": 0.75}


def test_boxes_per_image_accepts_cores_three_shapes():
    a = {"x": 10, "y": 5, "width": 20, "height": 30, "label": "face", "score": 0.9}
    b = {"x": 0, "y": 0, "width": 8, "height": 8}
    assert cp.boxes_per_image(a, 3, 64, 48) == [[(10.0, 5.0, 30.0, 35.0)]] * 3            # one dict: every image
    assert cp.boxes_per_image([a, b], 2, 64, 48) == [[(10.0, 5.0, 30.0, 35.0), (0.0, 0.0, 8.0, 8.0)]] * 2
    per = cp.boxes_per_image([[a], [], [b, a]], 3, 64, 48)                                   # one list per image
    assert per == [[(10.0, 5.0, 30.0, 35.0)], [], [(0.0, 0.0, 8.0, 8.0), (10.0, 5.0, 30.0, 35.0)]]
    assert cp.boxes_per_image([[b]], 4, 64, 48) == [[(0.0, 0.0, 8.0, 8.0)]] * 4              # one list for all
    assert cp.boxes_per_image([], 2, 64, 48) == [[], []]                                    # nothing detected


def test_boxes_are_clipped_to_the_image():
    # a detector box running past the right and bottom edges keeps its part inside the 48 x 64 image
    got = cp.boxes_per_image({"x": -4.5, "y": 50, "width": 60, "height": 30}, 1, 64, 48)
    assert got == [[(0.0, 50.0, 48.0, 64.0)]]


def test_bad_boxes_name_the_input():
    with pytest.raises(ValueError, match=r"bboxes: 2 lists of boxes \(one per image\) for 3 images"):
        cp.boxes_per_image([[], []], 3, 64, 64)
    with pytest.raises(ValueError, match=r"bboxes: image 2's box 1 .* lies outside the 64x32 image"):
        cp.boxes_per_image([[], [{"x": 70, "y": 0, "width": 5, "height": 5}]], 2, 32, 64)
    with pytest.raises(ValueError, match="bboxes: box 1 has width 0 and height 5"):
        cp.boxes_per_image({"x": 1, "y": 1, "width": 0, "height": 5}, 1, 64, 64)
    with pytest.raises(ValueError, match=r"bboxes: box 1 x is nan; expected a finite number"):
        cp.boxes_per_image([{"x": float("nan"), "y": 1, "width": 3, "height": 5}], 1, 64, 64)
    with pytest.raises(ValueError, match=r"bboxes: box 2 is \[1, 2, 3, 4\]; expected a box"):
        cp.boxes_per_image([[{"x": 1, "y": 1, "width": 3, "height": 5}, [1, 2, 3, 4]]], 1, 64, 64)
    with pytest.raises(ValueError, match="bboxes: expected ComfyUI's BOUNDING_BOX .* got str"):
        cp.boxes_per_image("0,0,4,4", 1, 64, 64)
    with pytest.raises(ValueError, match="negative_boxes: box 1 is"):
        cp.boxes_per_image([{"x": 1}], 1, 64, 64, "negative_boxes")


def test_points_json_of_cores_sam3_format():
    text = json.dumps([{"x": 12, "y": 30}, {"x": 63.5, "y": 0}])
    assert cp.parse_coords(text, 32, 64) == [(12.0, 30.0), (63.5, 0.0)]
    assert cp.parse_coords("", 32, 64) == [] and cp.parse_coords("[]", 32, 64) == []
    assert cp.parse_coords(None, 32, 64) == []
    assert cp.parse_coords('{"x": 1, "y": 2}', 32, 64) == [(1.0, 2.0)]
    assert cp.parse_coords([{"x": 3, "y": 4}], 32, 64) == [(3.0, 4.0)]


def test_bad_points_name_the_input():
    with pytest.raises(ValueError, match="positive_coords: '12,30' is not JSON"):
        cp.parse_coords("12,30", 32, 64)
    with pytest.raises(ValueError, match=r"negative_coords: point 2 \(5, 40\) lies outside the 64x32 image"):
        cp.parse_coords('[{"x": 1, "y": 1}, {"x": 5, "y": 40}]', 32, 64, "negative_coords")
    with pytest.raises(ValueError, match=r"positive_coords: point 1 is \[1, 2\]; expected"):
        cp.parse_coords("[[1, 2]]", 32, 64)
    with pytest.raises(ValueError, match="positive_coords: point 1 y is '3'; expected a finite number"):
        cp.parse_coords('[{"x": 1, "y": "3"}]', 32, 64)
    with pytest.raises(ValueError, match="positive_coords: expected a list of points"):
        cp.parse_coords("7", 32, 64)
