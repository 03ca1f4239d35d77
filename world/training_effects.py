"""The training techniques' effects in the world: models trained by the pack's own Train nodes (the
training child process, as a user's graph runs them), then sampled over seeds and read by the world's
scorer, beside the same training without the technique at the same budget.

Seg-Mix (MuDI): two new subjects of one shape that differ in colour and pattern (two combinations the
world model never saw, ``data.HELD_OUT``), named by rare words ("olis square", "hta square"), a few
renders of each alone. One LoRA is trained with Seg-Mix (``segmix_prob`` 0.3, MuDI's recipe), one
without (0.0), everything else equal; then "a olis square and a hta square" is sampled with each.

Infusion: Train Infusion on renders of one new concept written with its class word ("a star"), beside a
LoRA of the same renders; fidelity, a second object kept, and the Overfitting Metrics node's LFD.

FreeCure and MIP-Adapter, which use these trainings, are in ``adapter_effects.py``.

The experiments train into the folders :func:`work_folders` points ComfyUI at; run again with the same
settings, a training node finds its finished checkpoint and only writes the file again.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import data, measures
from .effects import Effect, _rng, _seed
from .runtime import World

WORDS = ("olis", "hta")


@dataclass(frozen=True)
class SegMixRecipe:
    """The training settings of the Seg-Mix experiment: MuDI's recipe (rank, DCO beta 1000, batch 1 x
    accumulation 2, Seg-Mix 0.3 at scale 0.75-1.0) at the world's size; steps and learning rate scaled
    to a budget two CPU cores train in minutes."""
    steps: int = 300
    rank: int = 8
    learning_rate: float = 1e-3
    images: int = 4
    segmix_prob: float = 0.3
    loss: str = "dco"
    seed: int = 42


def subject_pair(shape: str = "square") -> list:
    """Two held-out (colour, pattern, shape) of ``shape`` that differ in colour and in pattern."""
    combos = [t for t in data.HELD_OUT if t[2] == shape]
    for i, a in enumerate(combos):
        for b in combos[i + 1:]:
            if a[0] != b[0] and a[1] != b[1] and "plain" not in (a[1], b[1]):
                return [a, b]
    raise ValueError(f"no two held-out {shape}s differ in colour and pattern")


def subject_renders(thing: tuple, k: int, rng: np.random.Generator) -> tuple:
    """``k`` scenes of ``thing`` alone: images ``[k, 128, 128, 3]`` and masks ``[k, 128, 128]``."""
    imgs, masks = [], []
    for _ in range(k):
        img, m = data.render(data.sample_scene(rng, attributes=[thing]))
        imgs.append(torch.from_numpy(data.to_float(img)))
        masks.append(torch.from_numpy(m[0].astype(np.float32)))
    return torch.stack(imgs), torch.stack(masks)


def train_segmix_lora(world: World, subjects: list, name: str, recipe: SegMixRecipe, segmix_prob: float):
    """The pack's Seg-Mix Dataset and Train Seg-Mix LoRA nodes on ``subjects`` (``(word, thing, images,
    masks)``); returns the MODEL with the LoRA applied, the node's report and the LoRA's file name."""
    from ..nodes.training import SegMixDataset, TrainSegMixLoRA
    ds = None
    for word, thing, imgs, masks in subjects:
        ds = SegMixDataset.execute(imgs, masks, f"{word} {thing[2]}", "a {}", word, ds).result[0]
    out = TrainSegMixLoRA.execute(world.model, world.clip, world.vae, ds, output_name=name, steps=recipe.steps,
                                  rank=recipe.rank, learning_rate=recipe.learning_rate, segmix_prob=segmix_prob,
                                  loss=recipe.loss, resolution=data.SIZE, batch_size=1, gradient_accumulation=2,
                                  gradient_checkpointing=False, seed=recipe.seed, checkpoint_every=recipe.steps)
    return out.result[1], out.result[4], out.result[0]


def _own(found: list, thing: tuple) -> bool:
    c, p, s = thing
    return any(f.shape == s and f.appearance == (c, p) for f in found)


def _mixed(found: list, things: list) -> bool:
    """An object of the subjects' shape wearing one subject's colour with the other's pattern."""
    (ca, pa, s), (cb, pb, _) = things
    return any(f.shape == s and f.appearance in ((ca, pb), (cb, pa)) for f in found)


def _segmix_pair(world: World, n: int, recipe: SegMixRecipe, shape: str, index: int) -> dict:
    """One subject pair of ``shape``: the two LoRAs trained, then ``n`` seeds sampled (see :func:`segmix`)."""
    from ..nodes.mudi import MeanShiftedNoiseNode, PersonalizeSubject, PersonalizeSubjectComposer
    things = subject_pair(shape)
    rng = _rng(10, index)
    subjects = [(w, t, *subject_renders(t, recipe.images, rng)) for w, t in zip(WORDS, things)]
    refs = [torch.stack([world.scorer.embed_thing(img.numpy(), m.numpy() > 0.5) for img, m in zip(imgs, masks)])
            for _, _, imgs, masks in subjects]
    tag = f"world_segmix_{shape}_{recipe.steps}_{recipe.rank}_{recipe.loss}"
    with_model = train_segmix_lora(world, subjects, tag + "_on", recipe, recipe.segmix_prob)[0]
    without_model = train_segmix_lora(world, subjects, tag + "_off", recipe, 0.0)[0]
    pair_prompt = f"a {WORDS[0]} {shape} and a {WORDS[1]} {shape}"
    comp = None
    for _, t, imgs, masks in subjects:
        comp = PersonalizeSubject.execute(imgs[:1], masks[:1], " ".join(t), comp).result[0]
    rows = {k: [] for k in ("both", "both0", "mix", "mix0", "dc", "dc0", "solo", "solo0", "base_solo", "init", "init0")}
    for i in range(n):
        seed = _seed(i)
        lat = [world.sample(pair_prompt, [seed], with_model), world.sample(pair_prompt, [seed], without_model)]
        image, cmasks, _ = PersonalizeSubjectComposer.execute(comp, data.SIZE, data.SIZE, "random", 0.75, 1.0, 0.0,
                                                             "white", seed, 8).result
        shifted = MeanShiftedNoiseNode.execute(with_model, 1.0, seed, image, world.vae, None, cmasks).result[0]
        lat.append(world.sample(pair_prompt, [seed], with_model,
                                noise=shifted.generate_noise({"samples": torch.zeros(1, 4, 16, 16)})))
        k = i % 2                                   # each subject alone, alternating over the seeds
        solo_prompt = f"a {WORDS[k]} {shape}"
        lat += [world.sample(solo_prompt, [seed], with_model), world.sample(solo_prompt, [seed], without_model),
                world.sample(solo_prompt, [seed])]
        on, off, init, solo, solo0, base = world.read(world.decode(torch.cat(lat)))
        rows["both"].append(float(all(_own(on, t) for t in things)))
        rows["both0"].append(float(all(_own(off, t) for t in things)))
        rows["mix"].append(float(_mixed(on, things)))
        rows["mix0"].append(float(_mixed(off, things)))
        rows["dc"].append(measures.detect_compare(on, refs))
        rows["dc0"].append(measures.detect_compare(off, refs))
        rows["init"].append(float(sum(not _own(init, t) for t in things)) / 2)
        rows["init0"].append(float(sum(not _own(on, t) for t in things)) / 2)
        rows["solo"].append(measures.appearance_match(solo, shape, *things[k][:2]))
        rows["solo0"].append(measures.appearance_match(solo0, shape, *things[k][:2]))
        rows["base_solo"].append(measures.appearance_match(base, shape, *things[k][:2]))
    rows["things"] = things
    return rows


def segmix(world: World, n: int, recipe: SegMixRecipe = SegMixRecipe(), shapes: tuple = ("square", "circle")) -> list:
    """Seg-Mix LoRA vs the same LoRA without Seg-Mix (module docstring), for a subject pair of each of
    ``shapes`` (a training run each, with and without: the spread covers training as well as sampling),
    ``n`` seeds per pair: both subjects in their own appearance, identity mixing, Detect-and-Compare;
    each subject alone; and mean-shifted initialisation (the two subjects composed, gamma 1) on top of
    the Seg-Mix LoRA. The values are listed pair after pair."""
    pairs = [_segmix_pair(world, n, recipe, shape, j) for j, shape in enumerate(shapes)]

    def cat(key):
        return [v for rows in pairs for v in rows[key]]

    def per_pair(key):
        return [round(float(np.mean(rows[key])), 4) for rows in pairs]

    where = (f"pairs {'; '.join(f'{a[0]} {a[1]} vs {b[0]} {b[1]} {a[2]}s' for a, b in (r['things'] for r in pairs))}; "
             f"{n} seeds each; {recipe.steps} steps, rank {recipe.rank}, lr {recipe.learning_rate:g}, {recipe.loss}")

    def effect(metric, key, note, **extra):
        return Effect("segmix", metric, cat(key), cat(key + "0"), note,
                      extra={"per_pair_with": per_pair(key), "per_pair_without": per_pair(key + "0"), **extra})
    return [
        effect("both_own_appearance", "both", f"both subjects present, each in its own colour and pattern; Seg-Mix "
               f"LoRA vs LoRA without ({where})"),
        effect("identity_mixing", "mix", "an object with one subject's colour and the other's pattern; Seg-Mix vs "
               "without"),
        effect("detect_compare", "dc", "MuDI's Detect-and-Compare with the world's objects and embeddings (0 "
               "unless exactly two objects); Seg-Mix vs without"),
        effect("subject_alone_fidelity", "solo", "one subject's prompt: share of its colour and pattern on its "
               "shape; Seg-Mix vs without", base=measures.summary(cat("base_solo"))["mean"]),
        effect("missing_with_init", "init", "share of the two subjects not found in their own appearance; Seg-Mix "
               "LoRA with mean-shifted initialisation (gamma 1) vs without"),
    ]


@dataclass(frozen=True)
class InfusionRecipe:
    """Infusion (the official learning rate, batch 4, key and value offsets) at a budget two CPU cores
    train in minutes, beside a DreamBooth-style LoRA of the same photos (plain MSE, no Seg-Mix) as the
    customisation Infusion is compared with."""
    steps: int = 150
    learning_rate: float = 0.01
    batch_size: int = 4
    gradient_accumulation: int = 1
    images: int = 4
    lora_steps: int = 150
    lora_rank: int = 8
    lora_learning_rate: float = 1e-3
    seed: int = 42


INFUSION_CONCEPT = ("teal", "striped", "star")          # held out: the world model never drew it
OTHERS = (("blue", "circle"), ("green", "square"), ("red", "triangle"), ("yellow", "diamond"))


def _concept_features(world: World, images: torch.Tensor, shape: str) -> torch.Tensor:
    """The scorer's embedding of the object of ``shape`` in each image (images without one left out)."""
    feats = [f.embedding for found in world.read(images.detach().cpu().numpy())
             for f in [measures.of_shape(found, shape)] if f]
    return torch.stack(feats) if feats else torch.zeros(0)


def infusion(world: World, n: int, recipe: InfusionRecipe = InfusionRecipe(), concept: tuple = INFUSION_CONCEPT) -> list:
    """Train Infusion on renders of a new ``concept`` (its class word is its shape), and a LoRA of the
    same renders named "olis <shape>"; over ``n`` seeds: the concept's appearance from "a <shape>"
    (base, Infusion) and "a olis <shape>" (LoRA); a second object named beside the concept ("a star and
    a blue circle") kept in its own colour; and the Overfitting Metrics node's LFD of each against the
    base model on prompts without the concept, plus W2 of the concept's features (the world's scorer
    embedding of the object of the concept's shape; the node takes CLIP or DINO, which the world lacks,
    so W2 uses the same ``metrics.overfitting.w2_distance`` on the scorer's features)."""
    from ..metrics.overfitting import w2_distance
    from ..metrics.overfitting_comfy import encode_prompts, generate_images
    from ..nodes.infusion import InfusionApply
    from ..nodes.overfitting import OverfittingMetrics
    from ..nodes.training import TrainInfusion
    colour, pattern, shape = concept
    imgs, masks = subject_renders(concept, recipe.images, _rng(11, 0))
    name = TrainInfusion.execute(world.model, world.clip, world.vae, imgs, shape, masks,
                                 f"world_infusion_{shape}_{recipe.steps}", steps=recipe.steps,
                                 learning_rate=recipe.learning_rate, batch_size=recipe.batch_size,
                                 gradient_accumulation=recipe.gradient_accumulation, resolution=data.SIZE,
                                 offsets="kv", seed=recipe.seed, checkpoint_every=recipe.steps).result[0]
    prompt, lora_prompt = f"a {shape}", f"a {WORDS[0]} {shape}"
    infused = InfusionApply.execute(world.model, name, world.clip, prompt, shape, 1.0).result[0]
    lora_recipe = SegMixRecipe(steps=recipe.lora_steps, rank=recipe.lora_rank, learning_rate=recipe.lora_learning_rate,
                               segmix_prob=0.0, loss="mse", seed=recipe.seed)
    lora = train_segmix_lora(world, [(WORDS[0], concept, imgs, masks)],
                             f"world_dreambooth_{shape}_{recipe.lora_steps}_{recipe.lora_rank}", lora_recipe, 0.0)[0]
    fid = {"base": [], "infusion": [], "lora": []}
    kept = {"base": [], "infusion": [], "lora": []}
    for i in range(n):
        seed = _seed(i)
        oc, os_ = OTHERS[i % len(OTHERS)]
        pair, lora_pair = f"{prompt} and a {oc} {os_}", f"{lora_prompt} and a {oc} {os_}"
        lat = [world.sample(prompt, [seed]), world.sample(prompt, [seed], infused), world.sample(lora_prompt, [seed], lora),
               world.sample(pair, [seed]), world.sample(pair, [seed], infused), world.sample(lora_pair, [seed], lora)]
        found = world.read(world.decode(torch.cat(lat)))
        for key, solo, two in zip(("base", "infusion", "lora"), found[:3], found[3:]):
            fid[key].append(measures.appearance_match(solo, shape, colour, pattern))
            kept[key].append(float(any(f.shape == os_ and f.colour == oc for f in two)))
    without = "\n".join(f"a {c} {s}" for c, s in OTHERS)
    lfd = {}
    for key, model in (("infusion", infused), ("lora", lora)):
        lfd[key] = float(OverfittingMetrics.execute(world.model, model, world.clip, world.vae, without, "", levels=4,
                                                    samples=2, steps=world.settings.steps, cfg=world.settings.cfg,
                                                    resolution=data.SIZE, seed=0).result[0])
    w2 = {}
    neg, base_pos = encode_prompts(world.clip, ["", prompt])
    for key, model, text in (("infusion", infused, prompt), ("lora", lora, lora_prompt)):
        pos = encode_prompts(world.clip, [text])[0]
        with torch.no_grad():
            feats = [_concept_features(world, generate_images(m, world.vae, c, neg, 8, world.settings.steps,
                                                              world.settings.cfg, 0, data.SIZE), shape)
                     for m, c in ((world.model, base_pos), (model, pos))]
        w2[key] = (float(w2_distance(*feats)["w2"]) if min(len(f) for f in feats) >= 2 else float("nan"))
    where = f"{colour} {pattern} {shape}; Infusion {recipe.steps} steps, LoRA {recipe.lora_steps} steps rank {recipe.lora_rank}"
    return [
        Effect("infusion", "concept_fidelity", fid["infusion"], fid["base"], f"share of the concept's colour and "
               f"pattern on its shape from 'a {shape}'; Infusion vs the base model ({where})",
               extra={"lora": measures.summary(fid["lora"])["mean"]}),
        Effect("infusion", "concept_fidelity_vs_lora", fid["infusion"], fid["lora"], "the same; Infusion vs the "
               "LoRA prompted with its identifier"),
        Effect("infusion", "other_object_kept", kept["infusion"], kept["lora"], "a second object named beside the "
               "concept drawn in its own colour; Infusion vs LoRA", extra={"base": measures.summary(kept["base"])["mean"]}),
        Effect("infusion", "lfd", [lfd["infusion"]], [lfd["lora"]], "Overfitting Metrics' latent Fisher divergence "
               "against the base model on prompts without the concept (4 prompts x 2 samples x 4 levels); Infusion "
               "(its offsets sit at the token where Apply Infusion's prompt has the class word) vs LoRA"),
        Effect("infusion", "w2", [w2["infusion"]], [w2["lora"]], "2-Wasserstein distance of the scorer's features of "
               "the concept's object, customised vs base model, 8 images each; Infusion vs LoRA"),
    ]


EXPERIMENTS = {"segmix": segmix, "infusion": infusion}


@contextmanager
def work_folders(work: Path):
    """ComfyUI's loras, model_patches, ipadapter, clip_vision and output folders pointed at ``work`` while the block runs (the
    experiments' trained files and job folders go there, not into the user's ComfyUI), then put back."""
    import folder_paths
    for kind in ("ipadapter", "clip_vision"):
        if kind not in folder_paths.folder_names_and_paths:
            folder_paths.folder_names_and_paths[kind] = ([], folder_paths.supported_pt_extensions)
    saved = {kind: list(folder_paths.folder_names_and_paths[kind][0])
             for kind in ("loras", "model_patches", "ipadapter", "clip_vision")}
    old_output = folder_paths.get_output_directory()
    try:
        for kind in saved:
            path = work / kind
            path.mkdir(parents=True, exist_ok=True)
            folder_paths.add_model_folder_path(kind, str(path), is_default=True)
        (work / "output").mkdir(parents=True, exist_ok=True)
        folder_paths.set_output_directory(str(work / "output"))
        yield work
    finally:
        for kind, paths in saved.items():
            folder_paths.folder_names_and_paths[kind][0][:] = paths
        folder_paths.set_output_directory(old_output)
