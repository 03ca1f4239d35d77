"""training/infusion.py's load_offsets_cached: Apply Infusion re-run with another prompt or strength
reuses the file it read, and reads it again once it changed on disk."""
import os

import torch

from personalize_pack.training.infusion import InfusionOffsets, load_offsets_cached, save_offsets

WIDTHS = {("input", 1, 0): 8, ("middle", 0, 0): 16, ("output", 3, 0): 8}


def offsets(seed: int) -> InfusionOffsets:
    m = InfusionOffsets(WIDTHS)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return m


def test_an_unchanged_file_is_read_once(tmp_path):
    path = save_offsets(tmp_path / "cat.safetensors", offsets(0), "cat", "SD1.x")
    first = load_offsets_cached(path, name="infusion_name: 'cat.safetensors'")
    assert first.concept_word == "cat" and first.family == "SD1.x"
    assert load_offsets_cached(path, name="infusion_name: 'cat.safetensors'") is first
    assert load_offsets_cached(str(path), name="infusion_name: 'cat.safetensors'") is first

    save_offsets(path, offsets(1), "dog", "SD1.x")               # replaced on disk: read again
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    second = load_offsets_cached(path, name="infusion_name: 'cat.safetensors'")
    assert second is not first and second.concept_word == "dog"
    key = ("input", 1, 0)
    assert not torch.equal(second.offsets.delta(key)[1], first.offsets.delta(key)[1])
