"""A randomly initialised file in the layout of ComfyUI core's face landmarker weights
(``mediapipe_face_fp32.safetensors``, read by ``comfy_extras.nodes_mediapipe.FaceLandmarkerModel``):
both detectors, the mesh and blendshape networks from core's own classes, MediaPipe's FACEMESH_* edge
sets under core's ``topology.*`` names, and placeholder canonical geometry. Its landmarks are meaningless;
it lets the tests run core's real Detect Face Landmarks node and take its real output containers."""
from __future__ import annotations

import torch


def tiny_face_landmarker_state_dict(connections, seed: int = 0) -> dict[str, torch.Tensor]:
    """``connections``: mediapipe's ``face_mesh_connections`` module (the edge sets core's file carries)."""
    from comfy_extras.mediapipe.face_landmarker import FaceLandmarker
    torch.manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for variant in ("short", "full"):
        net = FaceLandmarker(device="cpu", dtype=torch.float32, operations=None, detector_variant=variant)
        for key, tensor in net.state_dict().items():
            sd[f"detector_{variant}.{key[len('detector.'):]}" if key.startswith("detector.") else key] = tensor
    c = connections
    for name, edges in (("face_oval", c.FACEMESH_FACE_OVAL), ("left_eye", c.FACEMESH_LEFT_EYE),
                        ("right_eye", c.FACEMESH_RIGHT_EYE), ("left_eyebrow", c.FACEMESH_LEFT_EYEBROW),
                        ("right_eyebrow", c.FACEMESH_RIGHT_EYEBROW), ("lips", c.FACEMESH_LIPS),
                        ("irises", c.FACEMESH_IRISES), ("nose", c.FACEMESH_NOSE),
                        ("tesselation", c.FACEMESH_TESSELATION)):
        sd[f"topology.{name}"] = torch.tensor(sorted(edges), dtype=torch.int32)
    picks = torch.arange(0, 468, 7)
    sd["canonical_vertices"] = torch.randn(478, 3)
    sd["procrustes_indices"] = picks
    sd["procrustes_weights"] = torch.ones(len(picks))
    return sd
