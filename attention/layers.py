"""Layer selection by ComfyUI block id, and schedule gating by sigma. Pure torch / python.

A UNet self-attention layer is addressed as ComfyUI addresses its patches:
``(block_name, block_id, block_index)``, e.g. ``("output", 6, 0)``; a *block* is the 2-tuple.
"""
from __future__ import annotations

import re

# Presets name blocks; every transformer inside a chosen block is patched.
LAYER_PRESETS: dict[str, tuple[tuple[str, int], ...]] = {
    # FreeCustom's default for SD1.5: up_blocks.2 and up_blocks.3 (layer_idx 10..15).
    "SD1.5 FreeCustom (output 6-11)": tuple(("output", i) for i in range(6, 12)),
    # SDXL has no FreeCustom configuration. The analogue of "the two highest-resolution decoder
    # stages with attention" is up_blocks.0 and up_blocks.1 (output 0-5).
    "SDXL decoder (output 0-5)": tuple(("output", i) for i in range(0, 6)),
    # The cheaper SDXL choice: only the highest-resolution decoder stage (64x64 at 1024 px).
    "SDXL high-res decoder (output 3-5)": tuple(("output", i) for i in range(3, 6)),
}
ALL_DECODER = "all decoder blocks"
CUSTOM = "custom"
PRESET_NAMES = list(LAYER_PRESETS) + [ALL_DECODER, CUSTOM]

_BLOCK_RE = re.compile(r"^\s*(input|middle|output)\s*[: ]\s*(\d+)(?:\s*-\s*(\d+))?\s*$")


def parse_ranges(text: str, pattern: re.Pattern, what: str, example: str) -> tuple[tuple[str, int], ...]:
    """``(name, i)`` for every entry of a list like ``"output:6-11, input:7"`` (``,`` or ``;``
    between entries), each matched by ``pattern`` (groups: name, first, optional last), in order
    and without repeats. ``what`` names the input in errors, ``example`` shows the syntax."""
    out: list[tuple[str, int]] = []
    for part in filter(None, (p.strip() for p in text.replace(";", ",").split(","))):
        m = pattern.match(part)
        if not m:
            raise ValueError(f"{what}: cannot read '{part}'; write blocks like {example}")
        a = int(m.group(2))
        b = int(m.group(3)) if m.group(3) is not None else a
        if b < a:
            raise ValueError(f"{what}: range '{part}' runs backwards")
        out.extend((m.group(1), i) for i in range(a, b + 1))
    if not out:
        raise ValueError(f"{what}: no blocks given")
    return tuple(dict.fromkeys(out))


def parse_blocks(text: str) -> tuple[tuple[str, int], ...]:
    """Parse ``"output:6-11, input:7, middle:0"`` into block ids."""
    return parse_ranges(text, _BLOCK_RE, "custom_blocks", "'output:6-11, input:7, middle:0'")


def discover_attention_blocks(diffusion_model) -> dict[tuple[str, int], int]:
    """``{(block_name, block_id): number of transformer blocks}`` of a ComfyUI UNet (openaimodel
    ``UNetModel``), found by walking ``input_blocks``, ``middle_block`` and ``output_blocks``."""
    found: dict[tuple[str, int], int] = {}

    def depth_of(block) -> int:
        n = 0
        for layer in block:
            blocks = getattr(layer, "transformer_blocks", None)
            if blocks is not None and type(layer).__name__ == "SpatialTransformer":
                n += len(blocks)
        return n

    for name, seq in (("input", getattr(diffusion_model, "input_blocks", None)),
                      ("output", getattr(diffusion_model, "output_blocks", None))):
        for i, block in enumerate(seq or []):
            d = depth_of(block)
            if d:
                found[(name, i)] = d
    middle = getattr(diffusion_model, "middle_block", None)
    if middle is not None:
        d = depth_of(middle)
        if d:
            found[("middle", 0)] = d
    return found


def transformer_blocks(diffusion_model) -> dict[tuple[str, int, int], object]:
    """``{(block_name, block_id, block_index): transformer block module}`` of a ComfyUI UNet, in
    IP-Adapter's processor order: input blocks, then output blocks, then the middle block (the order
    of diffusers' ``attn_processors``, docs/algorithms.md §0.2), each by id and index."""
    found: dict[tuple[str, int, int], object] = {}

    def add(name, i, block):
        j = 0
        for layer in block:
            blocks = getattr(layer, "transformer_blocks", None)
            if blocks is not None and type(layer).__name__ == "SpatialTransformer":
                for tb in blocks:
                    found[(name, i, j)] = tb
                    j += 1

    for name, seq in (("input", getattr(diffusion_model, "input_blocks", None)),
                      ("output", getattr(diffusion_model, "output_blocks", None))):
        for i, block in enumerate(seq or []):
            add(name, i, block)
    middle = getattr(diffusion_model, "middle_block", None)
    if middle is not None:
        add("middle", 0, middle)
    return found


def resolve_layers(preset: str, custom: str, available: dict[tuple[str, int], int]
                   ) -> tuple[tuple[str, int, int], ...]:
    """The ``(block, id, index)`` keys to patch for a preset (or custom list) in a model whose
    attention blocks are ``available``. A block missing from the model is an error."""
    if not available:
        raise ValueError("model: no UNet self-attention blocks found; this technique needs an "
                         "SD1.x/SD2.x/SDXL-style UNet model")
    from .dit import DIT_PRESETS  # noqa: PLC0415
    if preset in DIT_PRESETS:
        family = "FLUX" if preset.startswith("FLUX") else "SD3"
        raise ValueError(f"layers: preset '{preset}' is for {family} models, but this model is a UNet; choose one of "
                         f"{[p for p in PRESET_NAMES if p != CUSTOM]} or custom")
    if preset == CUSTOM:
        blocks = parse_blocks(custom)
    elif preset == ALL_DECODER:
        blocks = tuple(b for b in available if b[0] == "output")
    elif preset in LAYER_PRESETS:
        blocks = LAYER_PRESETS[preset]
    else:
        raise ValueError(f"layers: unknown preset '{preset}'; choose one of {PRESET_NAMES}")
    return expand_blocks(blocks, available, f"layers: preset '{preset}'")


def expand_blocks(blocks, available: dict[tuple[str, int], int], what: str = "layers"
                  ) -> tuple[tuple[str, int, int], ...]:
    """Every ``(block, id, index)`` transformer key of ``blocks`` (2-tuples) in a model whose
    attention blocks are ``available``; a block the model lacks is an error that starts with
    ``what`` (e.g. ``"layers: preset 'X'"``)."""
    if not available:
        raise ValueError("model: no UNet self-attention blocks found; this technique needs an "
                         "SD1.x/SD2.x/SDXL-style UNet model")
    missing = [b for b in blocks if b not in available]
    if missing:
        have = ", ".join(f"{n}:{i}" for n, i in sorted(available))
        miss = ", ".join(f"{n}:{i}" for n, i in missing)
        raise ValueError(f"{what} names blocks this model does not have "
                         f"({miss}). Its attention blocks are: {have}. Pick the preset for your "
                         f"model family or a custom block list.")
    return tuple((n, i, j) for n, i in blocks for j in range(available[(n, i)]))


class SigmaRange:
    """Gate by sigma: a technique is active while ``sigma_end <= sigma <= sigma_start``, the
    sigmas of the start/end fractions of the schedule. Works for any sampler and step count."""

    def __init__(self, sigma_start: float, sigma_end: float):
        self.sigma_start = float(sigma_start)
        self.sigma_end = float(sigma_end)

    @classmethod
    def from_percents(cls, model_sampling, start: float, end: float) -> "SigmaRange":
        if not 0.0 <= start <= 1.0 or not 0.0 <= end <= 1.0:
            raise ValueError(f"start_percent/end_percent must lie in 0..1, got {start}, {end}")
        if start > end:
            raise ValueError(f"start_percent ({start}) must not be after end_percent ({end})")
        s0 = float(model_sampling.percent_to_sigma(start))
        s1 = float(model_sampling.percent_to_sigma(end))
        if end >= 1.0:
            s1 = 0.0
        return cls(s0, s1)

    def __contains__(self, sigma: float) -> bool:
        return self.sigma_end <= float(sigma) <= self.sigma_start
