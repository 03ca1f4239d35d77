"""A tiny randomly initialised Segment Anything, built with segment_anything's own model classes
(no download): 64 px input, 16 px patches (a 4x4 image embedding), embed dim 32, two encoder blocks
(one windowed, one global), a one-layer two-way transformer. Its low-resolution masks are 16x16."""
from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

TINY = dict(img_size=64, patch=16, embed=32, depth=2, heads=2, window=2, globals_=(1,), prompt_dim=32,
            mask_in_chans=8, dec_depth=1, dec_mlp=64, iou_hidden=32)


def build_tiny_sam(seed: int = 0, **overrides):
    from segment_anything.modeling import (ImageEncoderViT, MaskDecoder, PromptEncoder, Sam,
                                           TwoWayTransformer)
    c = dict(TINY, **overrides)
    torch.manual_seed(seed)
    S = c["img_size"] // c["patch"]
    sam = Sam(
        image_encoder=ImageEncoderViT(depth=c["depth"], embed_dim=c["embed"], img_size=c["img_size"], mlp_ratio=4,
                                      norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=c["heads"],
                                      patch_size=c["patch"], qkv_bias=True, use_rel_pos=True,
                                      global_attn_indexes=c["globals_"], window_size=c["window"],
                                      out_chans=c["prompt_dim"]),
        prompt_encoder=PromptEncoder(embed_dim=c["prompt_dim"], image_embedding_size=(S, S),
                                     input_image_size=(c["img_size"], c["img_size"]),
                                     mask_in_chans=c["mask_in_chans"]),
        mask_decoder=MaskDecoder(num_multimask_outputs=3,
                                 transformer=TwoWayTransformer(depth=c["dec_depth"], embedding_dim=c["prompt_dim"],
                                                               mlp_dim=c["dec_mlp"], num_heads=8),
                                 transformer_dim=c["prompt_dim"], iou_head_depth=3,
                                 iou_head_hidden_dim=c["iou_hidden"]),
    )
    # random rel-pos tables and position embeddings (they start at zero) so every weight matters
    with torch.no_grad():
        for name, p in sam.named_parameters():
            if "rel_pos" in name or name.endswith("pos_embed"):
                p.normal_(0, 0.2)
    return sam.eval()


def save_tiny_sam(path, seed: int = 0, **overrides) -> Path:
    """Build the tiny SAM and save its state dict with ``torch.save`` (the official files' format)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(build_tiny_sam(seed, **overrides).state_dict(), path)
    return path


def require_segment_anything() -> None:
    """Skip the calling test module, saying what to install, when segment_anything or torchvision
    cannot be imported (call it at module level, before importing from them)."""
    import pytest
    try:
        import segment_anything  # noqa: F401
        import torchvision  # noqa: F401
    except Exception as exc:
        pytest.skip(f"segment_anything / torchvision cannot be imported ({type(exc).__name__}: {exc}); "
                    f"pip install segment-anything torchvision", allow_module_level=True)
