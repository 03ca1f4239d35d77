"""Layer selection by ComfyUI block id and sigma gating (pure python/torch)."""
import pytest

from personalize_pack.attention.blocks import LAYER_PRESETS, discover_attention_blocks, parse_blocks, resolve_layers
from personalize_pack.attention.patch import SigmaRange

from fake_models import SD15, SDXL


def test_discovery_matches_real_layouts():
    found = discover_attention_blocks(SD15)
    assert sorted(found) == sorted([("input", i) for i in (1, 2, 4, 5, 7, 8)] + [("middle", 0)] +
                                   [("output", i) for i in range(3, 12)])
    assert discover_attention_blocks(SDXL)[("output", 0)] == 10


def test_presets_resolve_to_every_transformer():
    keys = resolve_layers("SD1.5 FreeCustom (output 6-11)", "", discover_attention_blocks(SD15))
    assert keys == tuple(("output", i, 0) for i in range(6, 12))
    keys = resolve_layers("SDXL high-res decoder (output 3-5)", "", discover_attention_blocks(SDXL))
    assert keys == tuple(("output", i, j) for i in range(3, 6) for j in range(2))
    assert len(resolve_layers("SDXL decoder (output 0-5)", "", discover_attention_blocks(SDXL))) == 36
    assert len(resolve_layers("all decoder blocks", "", discover_attention_blocks(SD15))) == 9
    assert set(LAYER_PRESETS) < set(__import__("personalize_pack.attention.blocks", fromlist=["x"]).PRESET_NAMES)


def test_custom_blocks_and_errors():
    assert parse_blocks("output:6-8, middle:0; input 7") == (("output", 6), ("output", 7), ("output", 8),
                                                              ("middle", 0), ("input", 7))
    with pytest.raises(ValueError, match="runs backwards"):
        parse_blocks("output:8-6")
    with pytest.raises(ValueError, match="no blocks"):
        parse_blocks(" , ")
    with pytest.raises(ValueError, match=r"output:0, output:1, output:2\)"):
        resolve_layers("SDXL decoder (output 0-5)", "", discover_attention_blocks(SD15))
    with pytest.raises(ValueError, match="unknown preset"):
        resolve_layers("SD3", "", discover_attention_blocks(SD15))
    with pytest.raises(ValueError, match="no UNet self-attention"):
        resolve_layers("custom", "output:1", {})


class Sampling:
    def percent_to_sigma(self, p):
        return 0.0 if p >= 1 else 14.6 * (1 - p) ** 2


def test_sigma_range():
    r = SigmaRange.from_percents(Sampling(), 0.0, 0.5)
    assert 14.6 in r and 3.65 in r and 3.0 not in r
    full = SigmaRange.from_percents(Sampling(), 0.0, 1.0)
    assert 0.0 in full and 0.03 in full
    with pytest.raises(ValueError, match="must not be after"):
        SigmaRange.from_percents(Sampling(), 0.6, 0.4)
    with pytest.raises(ValueError, match="0..1"):
        SigmaRange.from_percents(Sampling(), -0.1, 0.4)
