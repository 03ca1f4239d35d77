"""A made-up face in the layout of ComfyUI core's FACE_LANDMARKS (``comfy_extras/nodes_mediapipe.py``):
landmarks in pixels, core's connection set names with both irises in one set, ``image_size``. Its
regions are rectangles and chains whose masks can be counted by hand. Shared by the face tests."""
from __future__ import annotations

import numpy as np


def ring(ids):
    return frozenset((ids[i], ids[(i + 1) % len(ids)]) for i in range(len(ids)))


def synthetic_face(dx=0.0, dy=0.0, s=1.0):
    """Landmarks ``[48, 2]`` and core's connection sets of a made-up face in a 100 x 100 image: an 80 x 80
    square face, 20 x 10 eyes (the person's left eye on the image's right), irises as 10 x 20 boxes that
    the eyelids cut, two-chain brows, an outer and an inner lip loop; ids above 40 are unused points."""
    P = {}

    def box(ids, x0, y0, x1, y1):
        for i, p in zip(ids, [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]):
            P[i] = p
        return ring(ids)
    sets = {"face_oval": box([0, 1, 2, 3], 10, 10, 90, 90),
            "left_eye": box([4, 5, 6, 7], 60, 30, 80, 40), "right_eye": box([8, 9, 10, 11], 20, 30, 40, 40),
            # core's one set for both irises, the right eye's ring listed first
            "irises": box([16, 17, 18, 19], 25, 25, 35, 45) | box([12, 13, 14, 15], 65, 25, 75, 45),
            "left_eyebrow": frozenset({(20, 21), (22, 23)}), "right_eyebrow": frozenset({(24, 25), (26, 27)}),
            "lips": box([28, 29, 30, 31], 35, 65, 65, 80) | box([32, 33, 34, 35], 40, 70, 60, 75),
            "nose": frozenset({(36, 37), (37, 38), (37, 39)})}
    sets["tesselation"] = sets["face_oval"]
    P.update({20: (60, 20), 21: (80, 20), 22: (60, 24), 23: (80, 24), 24: (20, 20), 25: (40, 20), 26: (20, 24),
              27: (40, 24), 36: (50, 35), 37: (50, 55), 38: (44, 60), 39: (56, 60)})
    P.update({i: (50, 50) for i in range(40, 48)})
    pts = np.array([P[i] for i in range(48)], dtype=np.float64) * s + (dx, dy)
    return pts, sets


def payload(frames, sets, size=(100, 100)):
    return {"frames": [[{"landmarks_xy": p, "bbox_xyxy": np.r_[p.min(0), p.max(0)], "score": 0.9} for p in f]
                       for f in frames], "image_size": size, "connection_sets": sets}
