"""The world model's quality bar: for prompts whose combination of attributes never appeared in
training (``data.HELD_OUT``), how often the prompted shape and colour are both present, read by the
scorer at the default sampler settings. Also the same for trained combinations, for comparison, and
the prompt fidelity (the world's CLIP-T) of both."""
from __future__ import annotations

import numpy as np

from . import data, measures
from .runtime import World


def prompts(held_out: bool, limit: int | None = None) -> list:
    """(colour, pattern, shape) triples: the held-out ones, or as many trained ones spread over the
    attributes."""
    if held_out:
        return list(data.HELD_OUT)[:limit]
    trained = [(c, p, s) for c in data.COLOURS for p in data.PATTERNS for s in data.SHAPES
               if not data.held_out(c, p, s)]
    step = max(1, len(trained) // (limit or len(trained)))
    return trained[::step][:limit]


def measure(world: World, triples: list, seeds_per_prompt: int = 4, first_seed: int = 0) -> dict:
    rows = []
    for k, (c, p, s) in enumerate(triples):
        seeds = [first_seed + k * seeds_per_prompt + j for j in range(seeds_per_prompt)]
        found = world.read(world.images(f"a {c} {p} {s}", seeds))
        for f in found:
            rows.append({"shape_colour": measures.shape_and_colour(f, c, s),
                         "shape": any(x.shape == s for x in f),
                         "all_three": any(x.shape == s and x.colour == c and x.pattern == p for x in f),
                         "prompt_fidelity": measures.prompt_fidelity(f, [(c, p, s)]),
                         "one_object": len(f) == 1})
    return {key: float(np.mean([r[key] for r in rows])) for key in rows[0]} | {"samples": len(rows)}


def table(results: dict) -> str:
    keys = ["shape_colour", "shape", "all_three", "prompt_fidelity", "one_object", "samples"]
    head = "| prompts | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys)
    lines = [head] + [f"| {name} | " + " | ".join(f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k])
                                                 for k in keys) + " |" for name, r in results.items()]
    return "\n".join(lines)
