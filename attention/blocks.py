"""Which attention blocks a technique patches: the one owner of block selection, for UNet and DiT
models. Pure python / torch: ComfyUI's objects arrive as arguments.

A UNet self-attention layer is addressed as ComfyUI addresses its patches:
``(block_name, block_id, block_index)``, e.g. ``("output", 6, 0)``; a *block* is the 2-tuple. A DiT
block is ``("double_block", i)`` or ``("single_block", i)`` (ComfyUI's ``patches_replace["dit"]``
keys; SD3's joint blocks are its double blocks).

Each technique has its presets as data: a ``BlockPresets`` (the node's options, in order, and one
resolver per family). ``resolve(diffusion_model, presets, preset, custom)`` finds the model's family
and returns ``(DiTSpec or None, keys)``, so a node never branches on the family itself.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from .families import DOUBLE, FAMILY_NAMES, SINGLE, DiTSpec, model_family

CUSTOM = "custom"
ALL_DECODER = "all decoder blocks"
NO_UNET = ("model: no UNet self-attention blocks found; this technique needs an SD1.x/SD2.x/SDXL-style UNet "
           "model")


# --------------------------------------------------------------------------- reading block lists

_BLOCK_RE = re.compile(r"^\s*(input|middle|output)\s*[: ]\s*(\d+)(?:\s*-\s*(\d+))?\s*$")
_DIT_RE = re.compile(r"^\s*(double|single|joint)\s*[: ]\s*(\d+)(?:\s*-\s*(\d+))?\s*$")


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


def parse_dit_blocks(text: str, what: str = "custom_blocks") -> tuple:
    """``"double:0-18, single:0-37"`` as block keys ``("double_block", i)`` / ``("single_block", i)``
    (``joint:`` is SD3's name for the double blocks)."""
    found = parse_ranges(text, _DIT_RE, what, "'double:0-18, single:0-37' (FLUX) or 'joint:12-23' (SD3)")
    return tuple(dict.fromkeys((SINGLE if name == "single" else DOUBLE, i) for name, i in found))


# --------------------------------------------------------------------------- UNet blocks

def _spatial_transformers(block):
    for layer in block:
        blocks = getattr(layer, "transformer_blocks", None)
        if blocks is not None and type(layer).__name__ == "SpatialTransformer":
            yield from blocks


def _unet_blocks(diffusion_model):
    """``(name, id, block)`` of a ComfyUI UNet: input blocks, output blocks, then the middle block."""
    for name, seq in (("input", getattr(diffusion_model, "input_blocks", None)),
                      ("output", getattr(diffusion_model, "output_blocks", None))):
        for i, block in enumerate(seq or []):
            yield name, i, block
    middle = getattr(diffusion_model, "middle_block", None)
    if middle is not None:
        yield "middle", 0, middle


def discover_attention_blocks(diffusion_model) -> dict[tuple[str, int], int]:
    """``{(block_name, block_id): number of transformer blocks}`` of a ComfyUI UNet (openaimodel
    ``UNetModel``), found by walking ``input_blocks``, ``middle_block`` and ``output_blocks``."""
    found = {}
    for name, i, block in _unet_blocks(diffusion_model):
        d = sum(1 for _ in _spatial_transformers(block))
        if d:
            found[(name, i)] = d
    return found


def transformer_blocks(diffusion_model) -> dict[tuple[str, int, int], object]:
    """``{(block_name, block_id, block_index): transformer block module}`` of a ComfyUI UNet, in
    IP-Adapter's processor order: input blocks, then output blocks, then the middle block (the order
    of diffusers' ``attn_processors``, docs/algorithms.md §0.2), each by id and index."""
    return {(name, i, j): tb for name, i, block in _unet_blocks(diffusion_model)
            for j, tb in enumerate(_spatial_transformers(block))}


def cross_attention_modules(diffusion_model) -> dict[tuple[str, int, int], object]:
    """``{key: attn2 module}`` of a ComfyUI UNet in ``transformer_blocks`` order: the blocks whose
    cross-attention has a key projection (empty for a model without UNet cross-attention)."""
    if diffusion_model is None:
        return {}
    out = {k: getattr(tb, "attn2", None) for k, tb in transformer_blocks(diffusion_model).items()}
    return {k: a for k, a in out.items() if a is not None and getattr(a, "to_k", None) is not None}


def expand_blocks(blocks, available: dict[tuple[str, int], int], what: str = "layers"
                  ) -> tuple[tuple[str, int, int], ...]:
    """Every ``(block, id, index)`` transformer key of ``blocks`` (2-tuples) in a model whose
    attention blocks are ``available``; a block the model lacks is an error that starts with
    ``what`` (e.g. ``"layers: preset 'X'"``)."""
    if not available:
        raise ValueError(NO_UNET)
    missing = [b for b in blocks if b not in available]
    if missing:
        have = ", ".join(f"{n}:{i}" for n, i in sorted(available))
        miss = ", ".join(f"{n}:{i}" for n, i in missing)
        raise ValueError(f"{what} names blocks this model does not have "
                         f"({miss}). Its attention blocks are: {have}. Pick the preset for your "
                         f"model family or a custom block list.")
    return tuple((n, i, j) for n, i in blocks for j in range(available[(n, i)]))


def check_dit_keys(keys, spec: DiTSpec, what: str, preset: str) -> tuple:
    """``keys`` when the model has every one of them; a clear error otherwise."""
    have = set(spec.keys())
    missing = [k for k in keys if k not in have]
    if missing:
        name = FAMILY_NAMES.get(spec.family, spec.family)
        miss = ", ".join(f"{k[0].split('_')[0]}:{k[1]}" for k in missing[:6])
        single = f" and single blocks 0-{spec.single - 1}" if spec.single else " and no single blocks"
        raise ValueError(f"{what}: this {name} model has double blocks 0-{spec.double - 1}{single}; it lacks {miss}")
    if not keys:
        raise ValueError(f"{what}: preset '{preset}' selects no block of this model")
    return keys


def prompt_encoders(spec: DiTSpec | None) -> tuple:
    """The tokenizers (``clip.tokenize`` keys, first found wins) whose tokens lay out the text of
    the model's conditioning: T5's on FLUX, CLIP-L's otherwise."""
    return ("t5xxl", "l") if spec is not None and spec.family in ("flux", "chroma") else ("l",)


# --------------------------------------------------------------------------- one entry point

@dataclass(frozen=True)
class BlockPresets:
    """The block choice of one technique: its preset names (the node's options, in this order) and
    one resolver per family, ``unet(preset, custom, available)`` (``available`` from
    ``discover_attention_blocks``) and ``dit(preset, custom, spec)``."""
    options: tuple
    unet: Callable
    dit: Callable


def resolve(diffusion_model, presets: BlockPresets, preset: str, custom: str = "") -> tuple:
    """``(spec, keys)``: the model's ``DiTSpec`` (None for a UNet) and the block keys of ``preset``
    (or of the ``custom`` list) of a technique's ``presets`` in this model."""
    spec = model_family(diffusion_model)
    if spec is None:
        return None, presets.unet(preset, custom, discover_attention_blocks(diffusion_model))
    return spec, presets.dit(preset, custom, spec)


# --------------------------------------------------------------------------- MRSA: "layers"

# UNet presets name blocks; every transformer inside a chosen block is patched.
LAYER_PRESETS: dict[str, tuple[tuple[str, int], ...]] = {
    # FreeCustom's default for SD1.5: up_blocks.2 and up_blocks.3 (layer_idx 10..15).
    "SD1.5 FreeCustom (output 6-11)": tuple(("output", i) for i in range(6, 12)),
    # SDXL has no FreeCustom configuration. The analogue of "the two highest-resolution decoder
    # stages with attention" is up_blocks.0 and up_blocks.1 (output 0-5).
    "SDXL decoder (output 0-5)": tuple(("output", i) for i in range(0, 6)),
    # The cheaper SDXL choice: only the highest-resolution decoder stage (64x64 at 1024 px).
    "SDXL high-res decoder (output 3-5)": tuple(("output", i) for i in range(3, 6)),
}
PRESET_NAMES = list(LAYER_PRESETS) + [ALL_DECODER, CUSTOM]

FLUX_SINGLE = "FLUX dev/schnell: single blocks"
FLUX_DOUBLE = "FLUX dev/schnell: double blocks"
FLUX_ALL = "FLUX dev/schnell: all blocks"
SD3_LATE = "SD3/SD3.5: later half of the joint blocks"
SD3_ALL = "SD3/SD3.5: all joint blocks"
FLUX2_SINGLE, FLUX2_DOUBLE, FLUX2_ALL = ("FLUX.2 dev/klein: single blocks", "FLUX.2 dev/klein: double blocks",
                                         "FLUX.2 dev/klein: all blocks")
CHROMA_SINGLE, CHROMA_DOUBLE, CHROMA_ALL = "Chroma: single blocks", "Chroma: double blocks", "Chroma: all blocks"
QWEN_LATE, QWEN_ALL = "Qwen-Image: later half of the blocks", "Qwen-Image: all blocks"
FAMILY_PRESETS = {"flux": [FLUX_SINGLE, FLUX_DOUBLE, FLUX_ALL], "sd3": [SD3_LATE, SD3_ALL],
                  "flux2": [FLUX2_SINGLE, FLUX2_DOUBLE, FLUX2_ALL], "chroma": [CHROMA_SINGLE, CHROMA_DOUBLE, CHROMA_ALL],
                  "qwen": [QWEN_LATE, QWEN_ALL]}
DIT_PRESETS = [p for ps in FAMILY_PRESETS.values() for p in ps]
# Each DiT preset as data: the block keys it takes from a model's DiTSpec.
_SINGLES = lambda spec: tuple((SINGLE, i) for i in range(spec.single))
_DOUBLES = lambda spec: tuple((DOUBLE, i) for i in range(spec.double))
_LATER_HALF = lambda spec: tuple((DOUBLE, i) for i in range(spec.double // 2, spec.double))
_EVERY = lambda spec: spec.keys()
_DIT_PICKS: dict[str, Callable] = {
    FLUX_SINGLE: _SINGLES, FLUX_DOUBLE: _DOUBLES, FLUX_ALL: _EVERY,
    FLUX2_SINGLE: _SINGLES, FLUX2_DOUBLE: _DOUBLES, FLUX2_ALL: _EVERY,
    CHROMA_SINGLE: _SINGLES, CHROMA_DOUBLE: _DOUBLES, CHROMA_ALL: _EVERY,
    SD3_ALL: _EVERY, SD3_LATE: _LATER_HALF, QWEN_ALL: _EVERY, QWEN_LATE: _LATER_HALF,
}


def resolve_layers(preset: str, custom: str, available: dict[tuple[str, int], int]
                   ) -> tuple[tuple[str, int, int], ...]:
    """The ``(block, id, index)`` keys to patch for a preset (or custom list) in a UNet whose
    attention blocks are ``available``. A block missing from the model is an error."""
    if not available:
        raise ValueError(NO_UNET)
    if preset in DIT_PRESETS:
        family = next(FAMILY_NAMES[f] for f, ps in FAMILY_PRESETS.items() if preset in ps)
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


def resolve_dit_blocks(preset: str, custom: str, spec: DiTSpec, custom_name: str = CUSTOM,
                       what: str = "layers") -> tuple:
    """The block keys of a DiT preset (FLUX.1, FLUX.2, Chroma: every block of a kind the model has,
    FLUX.1 dev and schnell and Chroma have 19 double and 38 single blocks, FLUX.2 dev 8 and 48, FLUX.2
    klein 4B 5 and 20; SD3 and Qwen-Image, whose blocks are all double-stream: the later half or all
    of them) or of a custom list (``parse_dit_blocks``, checked against the model)."""
    name = FAMILY_NAMES.get(spec.family, spec.family)
    if preset in DIT_PRESETS and preset not in FAMILY_PRESETS.get(spec.family, ()):
        raise ValueError(f"{what}: preset '{preset}' is not for this {name} model; choose one of "
                         f"{FAMILY_PRESETS.get(spec.family)} or '{custom_name}'")
    if preset in _DIT_PICKS:
        keys = _DIT_PICKS[preset](spec)
    elif preset == custom_name:
        keys = parse_dit_blocks(custom)
        what = "custom_blocks"
    else:
        raise ValueError(f"{what}: preset '{preset}' is for UNet models, but this is a {name} model "
                         f"({spec.double} double and {spec.single} single blocks); choose one of "
                         f"{FAMILY_PRESETS.get(spec.family)} or '{custom_name}' with blocks like "
                         f"'double:0-18, single:0-37' (FLUX) or 'joint:12-23' (SD3)")
    return check_dit_keys(keys, spec, what, preset)


LAYER_OPTIONS = [p for p in PRESET_NAMES if p != CUSTOM] + DIT_PRESETS + [CUSTOM]
MRSA_BLOCKS = BlockPresets(tuple(LAYER_OPTIONS), resolve_layers, resolve_dit_blocks)


# --------------------------------------------------------------------------- FASA: "layers"

SDXL_FREECURE = "SDXL FreeCure (output 1.6-9, 2-5)"
SD15_FREECURE = "SD1.5 FreeCure (output 6-11)"
FLUX_FREECURE = "FLUX/SD3 FreeCure analogue (last 30% of blocks)"
FASA_PRESETS = [SDXL_FREECURE, SD15_FREECURE, FLUX_FREECURE, ALL_DECODER, CUSTOM]


def fasa_layer_keys(preset: str, custom: str, available: dict) -> tuple:
    """FASA's attn1 keys on a UNet. FreeCure's SDXL layers are the transformer-block indices 50-69
    of the execution order: ``output 1`` blocks 6-9, then every block of ``output 2-5`` (§4.4);
    its SD1.x layers are up_blocks 2-3, ``output 6-11``."""
    if preset == SDXL_FREECURE:
        depth = available.get(("output", 1), 0)
        if depth < 10:
            raise ValueError(f"layers: preset '{preset}' needs SDXL's decoder (output block 1 with 10 "
                             f"transformer blocks); this model has {depth}. Use the SD1.5 preset for SD1.x "
                             f"models, or 'custom'")
        rest = expand_blocks([("output", i) for i in range(2, 6)], available, f"layers: preset '{preset}'")
        return tuple(("output", 1, j) for j in range(6, 10)) + rest
    if preset == SD15_FREECURE:
        return expand_blocks([("output", i) for i in range(6, 12)], available, f"layers: preset '{preset}'")
    if preset == ALL_DECODER:
        return expand_blocks([b for b in available if b[0] == "output"], available, f"layers: preset '{preset}'")
    if preset == CUSTOM:
        return expand_blocks(parse_blocks(custom), available, "custom_blocks")
    if preset == FLUX_FREECURE:
        raise ValueError(f"layers: preset '{preset}' is for DiT models (FLUX, FLUX.2, Chroma, Qwen-Image, SD3), "
                         f"but this model is a UNet; choose "
                         f"'{SDXL_FREECURE}' or '{SD15_FREECURE}'")
    raise ValueError(f"layers: unknown preset '{preset}'; choose one of {FASA_PRESETS}")


def dit_fasa_keys(preset: str, custom: str, spec: DiTSpec) -> tuple:
    """FASA's block keys on a DiT (every DiT family). The FreeCure analogue (docs/algorithms.md §4.8; my
    choice, FreeCure ships no DiT code) takes the last 30% of the blocks in execution order, as
    FreeCure's SDXL layers are the last 20 of 70 transformer blocks: FLUX.1 dev/schnell single
    blocks 20-37, SD3.5 large joint blocks 26-37. ``custom`` reads blocks like ``single:20-37,
    double:18`` (``joint:`` for SD3)."""
    if preset == FLUX_FREECURE:
        keys = spec.keys()
        return keys[int(0.7 * len(keys)):]
    if preset == CUSTOM:
        return resolve_dit_blocks(CUSTOM, custom, spec)
    raise ValueError(f"layers: preset '{preset}' is for UNet models, but this is a {FAMILY_NAMES[spec.family]} model; "
                     f"choose '{FLUX_FREECURE}' or 'custom' with blocks like 'single:20-37'")


FASA_BLOCKS = BlockPresets(tuple(FASA_PRESETS), fasa_layer_keys, dit_fasa_keys)


# --------------------------------------------------------------------------- DMSA: "preset"

@dataclass(frozen=True)
class DMSAPreset:
    """Blocks and schedule fractions of one model family. ``*_percents`` are ``(start, end)``
    fractions of the schedule (``SigmaRange.from_percents``); ``norm_percents`` None = no spatial
    normalisation."""
    structure_blocks: tuple
    appearance_blocks: tuple
    map_blocks: tuple
    structure_percents: tuple = (0.0, 1.0)
    appearance_percents: tuple = (0.4, 1.0)
    structure_weight: float = 3.0
    threshold: float = 0.2
    norm_percents: tuple | None = None

    def keys(self, available: dict) -> tuple[tuple, tuple, tuple]:
        """``(structure_keys, appearance_keys, map_keys)`` of every transformer of the preset's
        blocks in a model whose attention blocks are ``available`` (``discover_attention_blocks``)."""
        return (expand_blocks(self.structure_blocks, available, "structure layers: the preset"),
                expand_blocks(self.appearance_blocks, available, "appearance layers: the preset"),
                expand_blocks(self.map_blocks, available, "blend-map layers: the preset"))


def _out(a: int, b: int) -> tuple:
    return tuple(("output", i) for i in range(a, b + 1))


DMSA_PRESETS: dict[str, DMSAPreset] = {
    # FreeMix's inference.py: layer_idx 8..15 = output 4-11; structure_layer 13 = appearance phase
    # on output 9-11 (64x64 at 512 px) from structure_step 20 of 50 (40 % of the schedule);
    # mask weight 3.0; threshold 0.2; norm_step 50 = off. Maps: the 16x16-at-512 blocks
    # (1/4 of the latent side): input 7, 8 and output 3, 4, 5.
    "SD1.5 FreeMix": DMSAPreset(structure_blocks=_out(4, 11), appearance_blocks=_out(9, 11),
                                map_blocks=(("input", 7), ("input", 8)) + _out(3, 5)),
    # SDXL analogue (FreeMix has no SDXL version). SDXL's decoder has attention in two stages,
    # output 0-2 (32x32 at 1024 px, 10 transformers each) and output 3-5 (64x64, 2 each). FreeMix's
    # structure set is "the decoder from its second block on" — a superset of FreeCustom's, whose
    # SDXL analogue in this pack is the whole decoder, output 0-5 — so structure = output 0-5.
    # Appearance = the highest-resolution decoder stage, output 3-5 (FreeMix: output 9-11). Maps:
    # the blocks at 1/4 of the latent side like FreeMix's 16x16-at-512, i.e. 32x32 at 1024:
    # input 7, 8 and output 0, 1, 2, every transformer of them (50 maps per step, averaged).
    "SDXL FreeMix analogue": DMSAPreset(structure_blocks=_out(0, 5), appearance_blocks=_out(3, 5),
                                        map_blocks=(("input", 7), ("input", 8)) + _out(0, 2)),
}
FLUX_DMSA = "FLUX dev/schnell FreeMix analogue"
SD3_DMSA = "SD3/SD3.5 FreeMix analogue"
CHROMA_DMSA = "Chroma FreeMix analogue"
DIT_DMSA = {"flux": FLUX_DMSA, "sd3": SD3_DMSA, "chroma": CHROMA_DMSA}
NO_BLEND_WORD = ("Disentangle-Mixing Attention does not reach {name} yet: it finds the blend word's region from the "
                 "word's text tokens, and {name}'s text encoder (a chat template around the prompt{pad}) puts them "
                 "where the pack cannot locate them. Use it on FLUX.1, Chroma, SD3 or an SD1.x/SDXL UNet; "
                 "Multi-Reference and Foundation-Aware Attention do reach {name}")


def dit_dmsa_keys(spec: DiTSpec) -> tuple[tuple, tuple, tuple]:
    """``(structure, appearance, map)`` block keys of the FreeMix analogue on a FLUX model
    (docs/algorithms.md §2.7; my choice, FreeMix has no DiT code): the structure phase in every
    single block (the later half of the network, as FreeMix's decoder blocks), the appearance phase
    in the last third of the single blocks (FreeMix: the last, highest-resolution decoder stage),
    the blend-word maps from the image-to-text attention of every double block (where text and
    image streams are still separate). FLUX.1 dev/schnell and Chroma: single 0-37, single 25-37,
    double 0-18. SD3/SD3.5 (joint blocks only): structure in the later half, appearance in the last third, maps
    from the first half."""
    if spec.family == "sd3":
        n = spec.double
        if n < 2:
            raise ValueError(f"preset '{SD3_DMSA}': needs at least 2 joint blocks; this model has {n}")
        return (tuple((DOUBLE, i) for i in range(n // 2, n)), tuple((DOUBLE, i) for i in range((2 * n) // 3, n)),
                tuple((DOUBLE, i) for i in range(n // 2)))
    if spec.single < 1 or spec.double < 1:
        raise ValueError(f"preset '{DIT_DMSA[spec.family]}': needs double and single blocks; this model has {spec.double} "
                         f"double and {spec.single} single blocks")
    structure = tuple((SINGLE, i) for i in range(spec.single))
    appearance = tuple((SINGLE, i) for i in range((2 * spec.single) // 3, spec.single))
    maps = tuple((DOUBLE, i) for i in range(spec.double))
    return structure, appearance, maps


def dmsa_unet_keys(preset: str, custom: str, available: dict) -> tuple[tuple, tuple, tuple]:
    """``(structure, appearance, map)`` keys of a UNet DMSA preset (``custom`` is unused)."""
    if preset in DIT_DMSA.values():
        raise ValueError(f"preset: '{preset}' is for DiT models, but this model is a UNet; choose one of "
                         f"{list(DMSA_PRESETS)}")
    if preset not in DMSA_PRESETS:
        raise ValueError(f"preset: unknown '{preset}'; choose one of {list(DMSA_PRESETS)}")
    return DMSA_PRESETS[preset].keys(available)


def dmsa_dit_keys(preset: str, custom: str, spec: DiTSpec) -> tuple[tuple, tuple, tuple]:
    """``(structure, appearance, map)`` keys of the DiT DMSA preset of the model's family."""
    if spec.family not in DIT_DMSA:
        name = FAMILY_NAMES.get(spec.family, spec.family)
        raise ValueError("model: " + NO_BLEND_WORD.format(
            name=name, pad=", padded at the front to 512 tokens" if spec.family == "flux2" else ""))
    if preset != DIT_DMSA[spec.family]:
        kind = "UNet" if preset in DMSA_PRESETS else "other"
        raise ValueError(f"preset: '{preset}' is for {kind} models, but this is a {FAMILY_NAMES[spec.family]} "
                         f"model; choose '{DIT_DMSA[spec.family]}'")
    return dit_dmsa_keys(spec)


DMSA_BLOCKS = BlockPresets(tuple(DMSA_PRESETS) + tuple(DIT_DMSA.values()), dmsa_unet_keys, dmsa_dit_keys)
