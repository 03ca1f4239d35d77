"""Segment Anything checkpoints (references/sam_checkpoint.py): the official layouts detected from the
weights' shapes, a tiny randomly initialised SAM (built with segment_anything's own classes, no download)
loading exactly, other containers and precisions, and the files that are refused (truncated, empty, of
another kind, pickled objects, incomplete). Skipped, saying why, when segment_anything or torchvision
cannot be imported."""
from __future__ import annotations

import pytest
import torch

from pack_paths import PACK_ROOT
from tiny_sam import build_tiny_sam, require_segment_anything

require_segment_anything()

from segment_anything import sam_model_registry
from segment_anything.utils.transforms import ResizeLongestSide

from personalize_pack.references import sam_checkpoint as SC

DOG = PACK_ROOT / "workflows" / "inputs" / "personalize_dog6_02.jpg"


# --- checkpoints: detection, loading, bad files -----------------------------------------------

@pytest.mark.parametrize("variant,embed,depth,heads", [("vit_b", 768, 12, 12), ("vit_l", 1024, 24, 16),
                                                       ("vit_h", 1280, 32, 16)])
def test_official_layouts_are_detected_from_shapes(variant, embed, depth, heads):
    with torch.device("meta"):                      # segment_anything's own builder, no memory, no download
        ref = sam_model_registry[variant]()
    sd = ref.state_dict()
    cfg = SC.detect_config(sd, "x.pth")
    assert (cfg.variant, cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.img_size) == (variant, embed, depth, heads, 1024)
    assert cfg.global_attn_indexes == SC.OFFICIAL[variant][4] and cfg.window_size == 14
    assert cfg.label == f"SAM ViT-{variant[-1].upper()}"
    ours = SC.build_network(cfg, "meta").state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in sd.items()}


def test_a_few_keys_are_not_a_sam():
    sd = {"image_encoder.patch_embed.proj.weight": torch.empty(768, 3, 16, 16, device="meta"),
          "image_encoder.pos_embed": torch.empty(1, 64, 64, 768, device="meta"),
          "mask_decoder.iou_token.weight": torch.empty(1, 256, device="meta")}
    with pytest.raises(SC.SamFileError, match="blocks are missing"):
        SC.detect_config(sd, "partial.pth")


def test_tiny_checkpoint_loads_exactly(tiny_sam_path, tiny_sam):
    cfg = tiny_sam.config
    assert cfg.variant == "custom" and "custom SAM (embed 32, depth 2" in cfg.label
    assert (cfg.img_size, cfg.patch_size, cfg.global_attn_indexes, cfg.window_size, cfg.decoder_depth) == (64, 16, (1,), 2, 1)
    ref = build_tiny_sam()
    got = tiny_sam.net.state_dict()
    for k, v in ref.state_dict().items():
        assert torch.equal(got[k], v), k
    assert torch.equal(tiny_sam.net.pixel_mean.flatten(), torch.tensor(SC.PIXEL_MEAN))
    assert not any(t.is_meta for t in [*tiny_sam.net.parameters(), *tiny_sam.net.buffers()])


def test_safetensors_and_nested_checkpoints(tmp_path):
    from safetensors.torch import save_file
    sd = build_tiny_sam(seed=1).state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "a.safetensors")
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "b.pth")
    torch.save(sd, tmp_path / "c.pth", _use_new_zipfile_serialization=False)     # legacy format: not memory-mapped
    for name in ("a.safetensors", "b.pth", "c.pth"):
        m = SC.load_sam(tmp_path / name)
        assert torch.equal(m.net.mask_decoder.mask_tokens.weight, sd["mask_decoder.mask_tokens.weight"])


def test_half_precision_checkpoint_runs_in_float32(tmp_path):
    sd = {k: v.half() for k, v in build_tiny_sam().state_dict().items()}
    torch.save(sd, tmp_path / "half.pth")
    m = SC.load_sam(tmp_path / "half.pth")
    assert all(p.dtype == torch.float32 for p in m.net.parameters())


def test_truncated_and_empty_files(tiny_sam_path, tmp_path):
    data = tiny_sam_path.read_bytes()
    for cut in (len(data) // 2, len(data) - 30, 100):
        bad = tmp_path / f"cut{cut}.pth"
        bad.write_bytes(data[:cut])
        with pytest.raises(SC.SamFileError, match=r"cut\d+\.pth is damaged or incomplete \(a truncated download\?\)"):
            SC.load_sam(bad)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(SC.SamFileError, match="empty.pth is empty"):
        SC.load_sam(empty)
    from safetensors.torch import save_file
    save_file({"image_encoder.pos_embed": torch.zeros(1, 4, 4, 32)}, tmp_path / "t.safetensors")
    raw = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(raw[:-100])
    with pytest.raises(SC.SamFileError, match="t.safetensors is a damaged or incomplete safetensors file"):
        SC.load_sam(tmp_path / "t.safetensors")
    with pytest.raises(SC.SamFileError, match="does not exist.*sam_vit_b_01ec64.pth"):
        SC.load_sam(tmp_path / "nope.pth")


def test_files_of_the_wrong_kind(tmp_path):
    cases = {
        "page.pth": (b"<!DOCTYPE html><html><body>Sign in</body></html>", "web page"),
        "photo.pth": (DOG.read_bytes(), "it is an image"),
        "notes.pth": (b"just some text", "not a PyTorch"),
    }
    for name, (content, msg) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(SC.SamFileError, match=msg):
            SC.load_sam(tmp_path / name)
    # valid PyTorch files holding something else
    kinds = {
        "sd.pth": ({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)}, "not a Segment Anything"),
        "sam2.pth": ({"model": {"image_encoder.trunk.patch_embed.proj.weight": torch.zeros(2),
                                "sam_mask_decoder.iou_token.weight": torch.zeros(2)}}, "SAM 2"),
        "hq.pth": ({"image_encoder.patch_embed.proj.weight": torch.zeros(2), "mask_decoder.hf_token.weight":
                    torch.zeros(2)}, "SAM-HQ"),
        "mobile.pt": ({"image_encoder.layers.0.blocks.0.attn.qkv.weight": torch.zeros(2),
                       "mask_decoder.iou_token.weight": torch.zeros(2)}, "MobileSAM"),
        "hf.pth": ({"vision_encoder.patch_embed.projection.weight": torch.zeros(2)}, "Hugging Face"),
        "list.pth": ([torch.zeros(2)], "not a state dict"),
    }
    for name, (obj, msg) in kinds.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(SC.SamFileError, match=msg):
            SC.load_sam(tmp_path / name)


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"image_encoder.x": torch.zeros(1), "cfg": ResizeLongestSide(8)}, tmp_path / "obj.pth")
    with pytest.raises(SC.SamFileError, match="pickled Python objects"):
        SC.load_sam(tmp_path / "obj.pth")


def test_incomplete_state_dict(tmp_path):
    sd = build_tiny_sam().state_dict()
    del sd["mask_decoder.iou_prediction_head.layers.2.bias"]
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(SC.SamFileError, match=r"broken.pth does not match the custom SAM .* 1 missing .*1 unexpected"):
        SC.load_sam(tmp_path / "broken.pth")
    sd = build_tiny_sam().state_dict()
    sd["mask_decoder.iou_token.weight"] = torch.zeros(1, 48)        # contradicts the other shapes
    torch.save(sd, tmp_path / "odd.pth")
    with pytest.raises(SC.SamFileError, match=r"odd.pth does not fit the custom SAM .*iou_token"):
        SC.load_sam(tmp_path / "odd.pth")


def test_missing_package_message(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "segment_anything", None)        # import raises ModuleNotFoundError
    monkeypatch.setitem(sys.modules, "segment_anything.modeling", None)
    with pytest.raises(ImportError, match=r"segment-anything package, which is not installed.*-m pip install "
                                          r"segment-anything"):
        SC.import_sam_modeling()
