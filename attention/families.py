"""Which DiT family a ComfyUI diffusion model is, and what each part of the pack reaches in it
(docs/native-references.md §3 has the hooks per family). Pure python / torch: ComfyUI's objects
arrive as arguments.

* ``dit_spec`` reads the family and its block counts, patch size and RoPE from the model object:
  FLUX.1 (dev/schnell/Kontext/Fill) and FLUX.2 (dev/klein) share ComfyUI's ``Flux`` class and block
  loop (FLUX.2: global modulation, 4 RoPE axes, patch 1), SD3/SD3.5 (MMDiT), Qwen-Image (and
  Qwen-Image-Edit; double-stream blocks only), Chroma (FLUX.1's blocks, no ``post_input`` patch).
* ``model_family`` is the subset the self-attention techniques (MRSA, DMSA, FASA) reach: all of them.
* ``native_reference_spec`` is the subset whose forward takes reference latents
  (``ReferenceLatent`` / ``TextEncodeQwenImageEditPlus``) and publishes their token counts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .kernels import Rope

DOUBLE, SINGLE = "double_block", "single_block"


def is_dit_key(key) -> bool:
    return isinstance(key, tuple) and len(key) == 2 and key[0] in (DOUBLE, SINGLE)


@dataclass(frozen=True)
class DiTSpec:
    """What the DiT path needs to know about a model: ``family`` ("flux", "flux2", "sd3", "qwen",
    "chroma"), its double and single block counts, patch size and RoPE (None for models with
    absolute positions). Qwen-Image's transformer blocks are its double blocks."""
    family: str
    double: int
    single: int
    patch: int
    rope: Rope | None

    def keys(self) -> tuple:
        return tuple((DOUBLE, i) for i in range(self.double)) + tuple((SINGLE, i) for i in range(self.single))

    def order(self, key) -> int:
        """Position of a block in execution order (double blocks run before single blocks)."""
        return key[1] if key[0] == DOUBLE else self.double + key[1]

    def grid(self, latent_hw) -> tuple[int, int]:
        h, w = latent_hw
        return math.ceil(h / self.patch), math.ceil(w / self.patch)

    def image_tokens(self, latent_hw) -> int:
        gh, gw = self.grid(latent_hw)
        return gh * gw

    @property
    def min_text_tokens(self) -> int:
        """The text length the model pads every prompt to, at the front (FLUX.2: 512, ComfyUI's
        ``model_base.Flux2.extra_conds``); 0 where prompts keep their length."""
        return 512 if self.family == "flux2" else 0

    @property
    def token_subsets(self) -> bool:
        """Whether the model runs a ``post_input`` patch that may select image tokens (with RoPE ids,
        so every kept token keeps its position): FLUX.1, FLUX.2, Qwen-Image."""
        return self.family in ("flux", "flux2", "qwen")


SUPPORTED = ("SD1.x/SD2.x/SDXL UNets, FLUX.1 (dev, schnell, Kontext and their fine-tunes), FLUX.2 (dev, klein), "
             "Chroma, Qwen-Image and SD3/SD3.5 (MMDiT)")
FAMILY_NAMES = {"flux": "FLUX", "flux2": "FLUX.2", "sd3": "SD3", "qwen": "Qwen-Image", "chroma": "Chroma"}
SELF_ATTENTION_FAMILIES = ("flux", "flux2", "sd3", "chroma", "qwen")
NATIVE_FAMILIES = ("flux", "flux2", "qwen")
NATIVE_SUPPORTED = "FLUX.1 Kontext, FLUX.2 dev/klein (ReferenceLatent) and Qwen-Image-Edit (TextEncodeQwenImageEditPlus)"


def _comfy_class(diffusion_model, name: str, module: str) -> bool:
    cls = type(diffusion_model)
    return cls.__name__ == name and cls.__module__.startswith(module)


def _rope(theta, axes_dim) -> Rope:
    return Rope(float(theta), tuple(int(a) for a in axes_dim))


def dit_spec(diffusion_model) -> DiTSpec | None:
    """The ``DiTSpec`` of a ComfyUI diffusion model, None for a UNet; a clear error for any other
    architecture."""
    if hasattr(diffusion_model, "input_blocks") and hasattr(diffusion_model, "output_blocks"):
        return None
    cls = type(diffusion_model)
    params = getattr(diffusion_model, "params", None)
    double, single = getattr(diffusion_model, "double_blocks", None), getattr(diffusion_model, "single_blocks", None)
    if params is not None and double is not None and single is not None:
        for family, name, module in (("flux", "Flux", "comfy.ldm.flux"), ("chroma", "Chroma", "comfy.ldm.chroma.")):
            if _comfy_class(diffusion_model, name, module):
                if family == "flux" and getattr(params, "global_modulation", False):
                    family = "flux2"
                return DiTSpec(family, len(double), len(single), int(diffusion_model.patch_size),
                               _rope(params.theta, params.axes_dim))
    if _comfy_class(diffusion_model, "OpenAISignatureMMDITWrapper", "comfy.ldm.modules.diffusionmodules") \
            and hasattr(diffusion_model, "joint_blocks"):
        # SD3/SD3.5: joint blocks only (ComfyUI calls them "double_block"), absolute positions
        return DiTSpec("sd3", len(diffusion_model.joint_blocks), 0, int(diffusion_model.patch_size), None)
    if _comfy_class(diffusion_model, "QwenImageTransformer2DModel", "comfy.ldm.qwen_image") \
            and hasattr(diffusion_model, "transformer_blocks"):
        pe = diffusion_model.pe_embedder
        return DiTSpec("qwen", len(diffusion_model.transformer_blocks), 0, int(diffusion_model.patch_size),
                       _rope(pe.theta, pe.axes_dim))
    raise ValueError(f"model: {cls.__name__} ({cls.__module__}) is not supported yet by the pack's attention "
                     f"techniques; they support {SUPPORTED}, and native reference control on {NATIVE_SUPPORTED}")


def model_family(diffusion_model) -> DiTSpec | None:
    """The ``DiTSpec`` of a model the self-attention techniques reach (None for a UNet); a clear
    error for any other architecture (it may lack the hooks the DiT path relies on, or lay its
    tokens out differently)."""
    spec = dit_spec(diffusion_model)
    if spec is not None and spec.family not in SELF_ATTENTION_FAMILIES:
        raise ValueError(f"model: this is a {FAMILY_NAMES[spec.family]} model; the pack's self-attention techniques "
                         f"support {SUPPORTED}")
    return spec


def native_reference_spec(diffusion_model) -> DiTSpec:
    """The ``DiTSpec`` of a model that takes reference latents natively; a clear error otherwise."""
    spec = dit_spec(diffusion_model)
    if spec is None or spec.family not in NATIVE_FAMILIES:
        what = "a UNet (SD1.x/SD2.x/SDXL)" if spec is None else f"a {FAMILY_NAMES[spec.family]} model"
        raise ValueError(f"model: this is {what}, which takes no reference images of its own; native reference "
                         f"control works on {NATIVE_SUPPORTED}. For this model use Multi-Reference Attention or "
                         f"the MIP-Adapter nodes")
    return spec
