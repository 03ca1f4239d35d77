"""The adapters' effects in the world: FreeCure's Foundation-Aware Attention on an overfit LoRA, and
MIP-Adapter with the world's own IP-Adapter (``ip_adapter.py``). Like ``training_effects.py`` (whose
LoRA training and work folders they use), the pack's own nodes run inside ComfyUI and the world's scorer
reads the images.

FreeCure: a LoRA of one subject trained hard (until "a <colour> olis square" loses the colour), set on
the conditioning as a ComfyUI hook, with and without Foundation-Aware Attention whose foundation is the
base model (the LoRA-hook mode).

MIP-Adapter: the world's IP-Adapter with two and three references; MIP's merge by word maps, and by the
references' regions as masks, vs the plain IP-Adapter merge.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import data, measures
from .effects import Effect, _rng, _seed
from .runtime import World
from .training_effects import WORDS, SegMixRecipe, subject_renders, train_segmix_lora


@dataclass(frozen=True)
class FreeCureRecipe:
    """The overfit personalised model of the FreeCure experiment: a DreamBooth-style LoRA (plain noise
    loss, no Seg-Mix) of one subject in one colour, trained harder than the Seg-Mix budget (four times
    the learning rate, more steps) so that prompts asking another colour fail; FASA at FreeCure's SD1.x
    layers (output 6-11, every step) with its SD1.x weight and its SDXL one."""
    steps: int = 400
    rank: int = 8
    learning_rate: float = 4e-3
    images: int = 4
    seed: int = 42
    weights: tuple = (0.5, 1.5)          # FreeCure's SD1.x weight, then its SDXL one


FREECURE_SUBJECT = ("red", "striped", "square")
ASKED = ("blue", "green", "yellow", "purple", "teal")


def lora_hooks(name: str, strength: float = 1.0):
    """A LoRA file of the loras folder as ComfyUI's Create Hook LoRA node makes it (model strength only)."""
    import comfy.hooks
    import comfy.utils
    import folder_paths
    return comfy.hooks.create_hook_lora(comfy.utils.load_torch_file(folder_paths.get_full_path("loras", name),
                                                                    safe_load=True), strength, 0.0)


def freecure(world: World, n: int, recipe: FreeCureRecipe = FreeCureRecipe(), subject: tuple = FREECURE_SUBJECT) -> list:
    """FreeCure's claim on an overfit personalised model: a LoRA of ``subject`` ("olis <shape>") trained
    until "a <colour> olis <shape>" no longer draws the asked colour, set on the conditioning as a hook
    (so the model without it is the base model); then the same prompts with Foundation-Aware Attention
    in its LoRA-hook mode (the foundation branch: the base model from the same noise). FreeCure's two
    passes: the first samples the foundation (base model, same prompt, same seed) and takes the object
    of the subject's shape from it as the attribute mask (the colour covers the whole subject); the
    second samples the personalised model with FASA. Read: the asked colour on the subject's shape
    (attribute control), and the subject's pattern on it (identity beyond the asked attribute)."""
    import comfy.hooks

    from ..nodes.attention import FASA_PRESETS, FOUNDATION_MODES, FoundationAwareAttentionNode
    colour, pattern, shape = subject
    imgs, masks = subject_renders(subject, recipe.images, _rng(13, 0))
    lora_recipe = SegMixRecipe(steps=recipe.steps, rank=recipe.rank, learning_rate=recipe.learning_rate,
                               segmix_prob=0.0, loss="mse", seed=recipe.seed)
    name = train_segmix_lora(world, [(WORDS[0], subject, imgs, masks)],
                             f"world_overfit_{shape}_{recipe.steps}_{recipe.rank}_lr{recipe.learning_rate:g}", lora_recipe,
                             0.0)[2]
    hooks = lora_hooks(name)

    def hooked(text):
        return comfy.hooks.set_hooks_for_conditioning(world.cond(text), hooks)
    negative = hooked(world.settings.negative)
    rows: dict = {}

    def add(key, value):
        rows.setdefault(key, []).append(float(value))
    for i in range(n):
        seed = _seed(i)
        asked = ASKED[i % len(ASKED)]
        prompt = f"a {asked} {WORDS[0]} {shape}"
        base = world.read(world.decode(world.sample(prompt, [seed])))[0]
        obj = measures.of_shape(base, shape)
        mask = torch.from_numpy(obj.mask.astype(np.float32))[None] if obj is not None else torch.ones(1, data.SIZE, data.SIZE)
        models = [None] + [FoundationAwareAttentionNode.execute(world.model, mask, FOUNDATION_MODES[2], None, w,
                                                                FASA_PRESETS[1]).result[0] for w in recipe.weights]
        lat = [world.sample(prompt, [seed], m, positive=hooked(prompt), negative=negative) for m in models]
        lat.append(world.sample(f"a {WORDS[0]} {shape}", [seed], positive=hooked(f"a {WORDS[0]} {shape}"), negative=negative))
        *runs, own = world.read(world.decode(torch.cat(lat)))
        for key, found in zip(["lora"] + [f"fasa{w:g}" for w in recipe.weights], runs):
            f = measures.of_shape(found, shape)
            add(key + "_asked", f is not None and f.colour == asked)
            add(key + "_pattern", f is not None and f.pattern == pattern)
            add(key + "_subject_colour", f is not None and f.colour == colour)
        add("base_asked", obj is not None and obj.colour == asked)
        add("identity", measures.appearance_match(own, shape, colour, pattern))
    where = (f"{colour} {pattern} {shape} as 'olis {shape}'; LoRA {recipe.steps} steps rank {recipe.rank} lr "
             f"{recipe.learning_rate:g}; FASA {FASA_PRESETS[1]}; asked colours {', '.join(ASKED)}")
    out = []
    for k, w in enumerate(recipe.weights):
        tag, suffix = f"fasa{w:g}", "" if k == 0 else f"_w{w:g}"
        out += [Effect("freecure", "asked_colour" + suffix, rows[tag + "_asked"], rows["lora_asked"],
                       f"'a <colour> olis {shape}': the asked colour on the {shape}; the LoRA with FASA weight {w:g} "
                       f"(foundation: the base model) vs the LoRA alone ({where})",
                       extra={"base": measures.summary(rows["base_asked"])["mean"],
                              "subject_colour_with": measures.summary(rows[tag + "_subject_colour"])["mean"],
                              "subject_colour_without": measures.summary(rows["lora_subject_colour"])["mean"]}),
                Effect("freecure", "pattern_kept" + suffix, rows[tag + "_pattern"], rows["lora_pattern"],
                       f"the subject's pattern ({pattern}) on the {shape}: identity beyond the asked attribute; FASA "
                       f"weight {w:g} vs the LoRA alone", extra={"lora_identity": measures.summary(rows["identity"])["mean"]})]
    return out


class _CachedVision:
    """A CLIP vision model whose ``encode_image`` results are kept per image (the ViT-L the world's
    adapter reads takes about 2 s an image on two CPU cores; each reference is encoded by several
    conditions)."""

    def __init__(self, model):
        self.model, self._seen = model, {}
        self.image_mean, self.image_size = model.image_mean, model.image_size

    def encode_image(self, image, crop=True):
        key = (image.numpy().tobytes(), tuple(image.shape), crop)
        if key not in self._seen:
            self._seen[key] = self.model.encode_image(image, crop=crop)
        return self._seen[key]


def _concat_ip_adapter(world: World, adapter, clip_vision, prompts: tuple):
    """The plain IP-Adapter merge of several image prompts: every reference's tokens concatenated into
    one image prompt (what IP-Adapter does with several images, and what cubiq's pack does by default),
    attended by every pixel alike; the pack's MIP patch with one prompt and no word maps is exactly that."""
    from ..attention.install import install_technique
    from ..attention.mip import EncodedPrompt, MultiImagePromptAttention, adapter_layers
    from ..attention.patch import SigmaRange
    from ..references.image_prompt import encode_image_prompts
    tokens, uncond = encode_image_prompts(adapter, clip_vision, prompts)
    none = torch.zeros(0, adapter.context_dim)
    joint = EncodedPrompt("all references", torch.cat(tokens), torch.cat([uncond] * len(tokens)), none, none)
    layers, keys = adapter_layers(world.model, adapter)
    tech = MultiImagePromptAttention([joint], layers, keys, SigmaRange.from_percents(
        world.model.model.model_sampling, 0.0, 1.0), adapter.default_scale)
    return install_technique(world.model, tech)


def _colours(found: list, things: list) -> tuple[float, float]:
    """Share of the objects drawn in their own reference's colour, and share drawn (by shape) in another
    reference's colour: object confusion."""
    own = confused = 0
    for c, _, s in things:
        hits = [f for f in found if f.shape == s]
        own += any(f.colour == c for f in hits)
        confused += any(f.colour in {o[0] for o in things if o[0] != c} for f in hits)
    return own / len(things), confused / len(things)


def mip(world: World, n: int, counts: tuple = (2, 3)) -> list:
    """MIP-Adapter with the world's IP-Adapter (``world/ip_adapter.py``, built into the work folder's
    ``ipadapter``): for ``k`` in ``counts``, ``k`` references of distinct shapes and colours (each a
    render of the object alone) and the prompt naming their shapes ("a square and a circle"); MIP's
    per-pixel merge (entity = the shape word) vs the plain IP-Adapter merge of the same references
    (their tokens concatenated), same noise; read: each object in its own reference's colour, and in
    another reference's colour (confusion). MIP also runs with each reference's region given as a mask
    (MIP-Adapter Reference's ``mask``), taken from the prompt-alone image of the same seed as FreeCure
    takes its masks from a first pass (a reference whose shape that image lacks keeps its word map).
    And one reference alone, with and without the adapter: whether it carries the colour at all."""
    import folder_paths

    from ..nodes.mip import MIPAdapterApply, MIPAdapterLoader, MIPAdapterReference
    from . import ip_adapter
    path = Path(folder_paths.get_folder_paths("ipadapter")[0]) / ip_adapter.ADAPTER_NAME
    ip_adapter.build(path)
    adapter = MIPAdapterLoader.execute(ip_adapter.ADAPTER_NAME).result[0]
    vision = _CachedVision(ip_adapter.load_vision())
    rows: dict = {}
    for k in (1, *counts):
        for i in range(n):
            rng = _rng(12, 100 * k + i)
            things = _distinct_colours(rng, k)
            images = [torch.from_numpy(data.to_float(data.render(data.sample_scene(rng, attributes=[t]))[0]))[None]
                      for t in things]
            prompt = data.join_phrases([f"a {s}" for _, _, s in things])
            seed = _seed(i)
            alone = world.read(world.decode(world.sample(prompt, [seed])))[0]
            prompts = masked = ()
            for (_, _, s), img in zip(things, images):
                obj = measures.of_shape(alone, s)
                region = None if obj is None else torch.from_numpy(obj.mask.astype(np.float32))[None]
                prompts = MIPAdapterReference.execute(img, s, 1.0, "center", None, prompts).result[0]
                masked = MIPAdapterReference.execute(img, s, 1.0, "center", region, masked).result[0]
            models = {"mip": MIPAdapterApply.execute(world.model, adapter, vision, world.clip, prompt, prompts).result[0]}
            if k > 1:
                models["masks"] = MIPAdapterApply.execute(world.model, adapter, vision, world.clip, prompt,
                                                          masked).result[0]
                models["plain"] = _concat_ip_adapter(world, adapter, vision, prompts)
            found = world.read(world.decode(torch.cat([world.sample(prompt, [seed], m) for m in models.values()])))
            for tag, f in [("alone", alone), *zip(models, found)]:
                own, confused = _colours(f, things)
                rows.setdefault((k, tag, "own"), []).append(own)
                rows.setdefault((k, tag, "confused"), []).append(confused)
    out = [Effect("mip", "one_reference_colour", rows[(1, "mip", "own")], rows[(1, "alone", "own")],
                  "one reference, prompt 'a <shape>': the object in the reference's colour; with the world's "
                  "IP-Adapter vs the prompt alone")]
    for k in counts:
        def base(what):
            return {"prompt_alone": measures.summary(rows[(k, "alone", what)])["mean"]}
        out += [Effect("mip", f"own_colour_{k}", rows[(k, "mip", "own")], rows[(k, "plain", "own")],
                       f"{k} references, the prompt naming their shapes: share of the objects in their own "
                       f"reference's colour; MIP's merge (word maps) vs the plain IP-Adapter merge (tokens "
                       f"concatenated)", extra=base("own")),
                Effect("mip", f"confusion_{k}", rows[(k, "mip", "confused")], rows[(k, "plain", "confused")],
                       f"{k} references: share of the objects in another reference's colour; MIP vs plain",
                       extra=base("confused")),
                Effect("mip", f"own_colour_{k}_masks", rows[(k, "masks", "own")], rows[(k, "plain", "own")],
                       f"{k} references: own colour; MIP with each reference's region as its mask (from the "
                       f"prompt-alone image) vs the plain merge"),
                Effect("mip", f"confusion_{k}_masks", rows[(k, "masks", "confused")], rows[(k, "plain", "confused")],
                       f"{k} references: another reference's colour; MIP with masks vs the plain merge")]
    return out


def _distinct_colours(rng: np.random.Generator, k: int) -> list:
    """``k`` (colour, pattern, shape) with distinct shapes and colours far apart on the colour wheel
    (the world's colour misses are neighbours: red/orange/pink, green/teal/blue)."""
    groups = (("red", "orange", "pink"), ("yellow",), ("green", "teal"), ("blue", "purple"))
    picked = rng.choice(len(groups), size=k, replace=False)
    colours = [str(rng.choice(groups[g])) for g in picked]
    shapes = rng.choice(data.SHAPES, size=k, replace=False)
    return [(c, str(rng.choice(data.PATTERNS)), str(s)) for c, s in zip(colours, shapes)]


EXPERIMENTS = {"freecure": freecure, "mip": mip}
