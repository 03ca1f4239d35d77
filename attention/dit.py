"""DiT reference positions and subject tokens (FLUX and SD3; docs/algorithms.md §1.6, §2.7, §4.8).
Pure torch: ComfyUI's objects arrive as arguments.

The block runtime that hands the techniques a UNet-like view of a DiT's joint attention
(``PersonalizeBlock``, ``JointAttention``) is ``dit_blocks.py``; which blocks are patched is
``blocks.py``, the model family (``DiTSpec``, ``model_family``) ``families.py``.

Reference token positions (RoPE): the references run at the target's latent size, so their keys
carry the target's grid positions (*aligned*: a target token prefers reference tokens at the same
place). *Shifted* turns reference ``r``'s keys by ``(r + 1)`` grid widths along the column axis,
as if each reference stood beside the target in one wide image (a diptych): attention then
depends on content, not on where the subject sits, which is how a UNet's self-attention (no
positional encoding) treats FreeCustom's references. Shifted is the default.

Subject-only references (FLUX): a reference may run on the image tokens its subject touches only
(``subject_tokens``, ``select_tokens``), so it costs about its subject's share of the image.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..references.masks import layer_mask
from .families import DiTSpec
from .kernels import Rope

IMAGE_KEYS = "personalize_image_keys"       # (start, stop) of the target's image tokens among the keys
ROPE_KEY = "personalize_rope"                # RopeGrid of the call (RoPE models only)
SHIFTED, ALIGNED = "shifted (side by side)", "aligned"
POSITIONS = [SHIFTED, ALIGNED]
WHOLE, SUBJECT = "whole image", "subject only (faster)"
REFERENCE_TOKENS = [WHOLE, SUBJECT]

# --------------------------------------------------------------------------- positions

@dataclass(frozen=True)
class RopeGrid:
    """The RoPE of one call and the target's token grid: turns reference keys to other positions."""
    rope: Rope
    grid: tuple

    def positions(self, n: int) -> torch.Tensor:
        """Grid positions ``[n, 3+]`` (index 0, row, column) of the tokens ``0..n-1`` in raster order."""
        gw = self.grid[1]
        p = torch.zeros(n, len(self.rope.axes_dim), dtype=torch.float64)
        idx = torch.arange(n)
        p[:, 1] = (idx // gw).to(torch.float64)
        p[:, 2] = (idx % gw).to(torch.float64)
        return p

    def beside(self, k: torch.Tensor, slot: int) -> torch.Tensor:
        """Keys ``[..., N, h*d]`` moved ``slot`` grid widths to the right (shifted positions)."""
        delta = torch.zeros(len(self.rope.axes_dim), dtype=torch.float64)
        delta[2] = float(slot * self.grid[1])
        return self.rope.rotate(k, delta)

    def moved(self, k: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        """Keys ``[..., M, h*d]`` of the tokens ``src`` ``[M]`` moved to the positions of the tokens
        ``dst`` ``[M]`` (raster indices on the grid)."""
        n = int(max(int(src.max()), int(dst.max()))) + 1
        pos = self.positions(n).to(k.device)
        return self.rope.rotate(k, pos[dst.to(k.device)] - pos[src.to(k.device)])


def shift_reference(extra_options, k: torch.Tensor, slot: int, positions: str) -> torch.Tensor:
    """Reference keys at the positions a technique asked for (``SHIFTED`` moves reference ``slot``
    beside the target; ``ALIGNED``, UNets and models without RoPE keep them)."""
    grid = extra_options.get(ROPE_KEY)
    if grid is None or positions != SHIFTED:
        return k
    return grid.beside(k, slot)


# --------------------------------------------------------------------------- subject-only references

def subject_tokens(reference, latent_hw, spec: DiTSpec) -> torch.Tensor:
    """Raster indices of the image tokens the reference's subject touches at all (its mask fitted
    to the target latent, on the DiT's token grid). Every token when the subject touches none."""
    gh, gw = spec.grid(latent_hw)
    cover = layer_mask(reference.fitted(*latent_hw)[1], gh, gw, soft=True)
    idx = torch.nonzero(cover > 0, as_tuple=False).flatten()
    return idx if idx.numel() else torch.arange(gh * gw)


def select_tokens(idx: torch.Tensor):
    """A FLUX ``post_input`` patch keeping only the image tokens ``idx`` (with their RoPE ids, so
    every kept token keeps its grid position)."""
    def select(args):
        out = dict(args)
        out["img"] = args["img"][:, idx.to(args["img"].device)]
        if args.get("img_ids") is not None:
            out["img_ids"] = args["img_ids"][:, idx.to(args["img_ids"].device)]
        return out
    return select
