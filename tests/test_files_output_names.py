"""files/output_names.py: the one check of an output file name a user types."""
from __future__ import annotations

import pytest

from personalize_pack.files.output_names import output_path


@pytest.mark.parametrize("name", ["a/b", "a\\b", "..", "../x", "x..y", "", "   ", "/etc/passwd", "C:evil", ".hidden",
                                  "a\0b", "tab\there", "sub/../../x"])
def test_output_name_rejected(tmp_path, name):
    with pytest.raises(ValueError) as info:
        output_path(tmp_path, name, ".safetensors")
    assert "output name" in str(info.value)


def test_output_name_accepted(tmp_path):
    assert output_path(tmp_path, "my_lora", ".safetensors") == tmp_path / "my_lora.safetensors"
    assert output_path(tmp_path, "my lora-v2.safetensors", ".safetensors") == tmp_path / "my lora-v2.safetensors"
    assert output_path(tmp_path, " toy ", "safetensors") == tmp_path / "toy.safetensors"
    with pytest.raises(ValueError):
        output_path(tmp_path, None, ".safetensors")
