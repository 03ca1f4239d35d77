"""Each inference technique's effect in the world, measured over seeds with and without it. Every
experiment draws its subjects from its own generator (seeded by the experiment and the seed index),
runs the pack's own nodes on the world model inside ComfyUI, and reads the images with the world's
scorer. A result is one line: technique, metric, the per-seed values with and without, and a paired
test (``measures.paired_test``)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from . import data, measures
from .runtime import World

EFFECTS_SEED = 2026
MRSA_PRESET = "SD1.5 FreeCustom (output 6-11)"
DMSA_PRESET = "SD1.5 FreeMix"


@dataclass
class Effect:
    technique: str
    metric: str
    with_: list
    without: list
    note: str = ""
    extra: dict = field(default_factory=dict)

    def line(self) -> dict:
        w, wo = measures.summary(self.with_), measures.summary(self.without)
        return {"technique": self.technique, "metric": self.metric, "with": w["mean"], "without": wo["mean"],
                "with_sd": w["sd"], "without_sd": wo["sd"], "n": w["n"],
                "p": round(measures.paired_test(self.with_, self.without), 5), "note": self.note, **self.extra,
                "with_values": [round(float(v), 4) for v in self.with_],
                "without_values": [round(float(v), 4) for v in self.without]}


def _rng(experiment: int, i: int) -> np.random.Generator:
    return np.random.default_rng([EFFECTS_SEED, experiment, i])


def distinct_things(rng: np.random.Generator, n: int) -> list:
    """n (colour, pattern, shape) triples, pairwise different in every attribute."""
    while True:
        picks = [data.random_attributes(rng, allow_held_out=True) for _ in range(n)]
        if all(len({p[k] for p in picks}) == n for k in range(3)):
            return picks


def reference_scene(rng: np.random.Generator, attributes: list) -> tuple:
    """A reference image (float [H, W, 3]), its objects' masks and its full caption."""
    scene = data.sample_scene(rng, attributes=attributes)
    img, masks = data.render(scene)
    caption = data.join_phrases([data.describe(t, ("colour", "pattern")) for t in scene.things])
    return data.to_float(img), masks, caption, scene


def encode_reference(world: World, img: np.ndarray, mask: np.ndarray | None, caption: str, weight: float = 3.0,
                     references=None):
    """The pack's Reference Encode node on one image at the world's size."""
    from ..nodes.references import ReferenceEncode
    m = torch.ones(1, *img.shape[:2]) if mask is None else torch.from_numpy(mask.astype(np.float32))[None]
    return ReferenceEncode.execute(torch.from_numpy(img)[None], world.vae, m, world.cond(caption), references, weight,
                                   0.5, False, 0).result[0]


def mrsa_model(world: World, refs):
    from ..nodes.attention import MultiReferenceAttentionNode
    return MultiReferenceAttentionNode.execute(world.model, refs, MRSA_PRESET, "output:6-11", 0.0, 1.0, 1.0,
                                               0).result[0]


def _seed(i: int) -> int:
    return 1000 + i


def mrsa_single(world: World, n: int) -> list:
    """One reference (a subject beside a distractor, the subject's mask) and a prompt naming only the
    subject's shape: appearance of the subject with MRSA vs without; the distractor's leak with the
    mask vs the whole image as the reference; a second reference of weight 0 (the whole image) vs none.
    (A lone reference of weight 0 is refused by the node with a clear error, by design.)"""
    fid, fid0, emb, emb0, leak_masked, leak_whole, leak_plain, zero_diff = ([] for _ in range(8))
    for i in range(n):
        rng = _rng(1, i)
        (c, p, s), (dc, dp, ds) = distinct_things(rng, 2)
        img, masks, caption, _ = reference_scene(rng, [(c, p, s), (dc, dp, ds)])
        prompt = f"a {s}"
        ref_emb = world.scorer.embed_thing(img, masks[0])
        plain_lat = world.sample(prompt, [_seed(i)])
        masked_lat = world.sample(prompt, [_seed(i)], mrsa_model(world, encode_reference(world, img, masks[0], caption)))
        whole_lat = world.sample(prompt, [_seed(i)], mrsa_model(world, encode_reference(world, img, None, caption)))
        if i < 2:       # a reference of weight 0 beside it removes nothing else and adds nothing
            refs = encode_reference(world, img, masks[0], caption)
            refs = encode_reference(world, img, None, caption, 0.0, references=refs)
            zero = world.sample(prompt, [_seed(i)], mrsa_model(world, refs))
            zero_diff.append(float((zero - masked_lat).abs().max()))
        plain, masked, whole = world.read(world.decode(torch.cat([plain_lat, masked_lat, whole_lat])))
        fid.append(measures.appearance_match(masked, s, c, p))
        fid0.append(measures.appearance_match(plain, s, c, p))
        emb.append(measures.embedding_match(masked, s, ref_emb))
        emb0.append(measures.embedding_match(plain, s, ref_emb))
        leak = [measures.has_thing(f, shape=ds, appearance=(dc, dp)) for f in (masked, whole, plain)]
        leak_masked.append(float(leak[0]))
        leak_whole.append(float(leak[1]))
        leak_plain.append(float(leak[2]))
    return [Effect("mrsa", "reference_fidelity", fid, fid0, "share of the subject's colour and pattern on the "
                   "object of the prompted shape; with MRSA vs the prompt alone"),
            Effect("mrsa", "reference_embedding", emb, emb0, "cosine of the scorer's embeddings, subject vs output"),
            Effect("mrsa", "distractor_leak", leak_masked, leak_whole, "the distractor's shape or appearance in the "
                   "output; reference masked to the subject vs the whole reference image",
                   extra={"plain": measures.summary(leak_plain)["mean"]}),
            Effect("mrsa", "weight_zero_max_diff", zero_diff, [0.0] * len(zero_diff),
                   "largest latent difference, subject + a weight-0 reference vs the subject alone (0 up to rounding)")]


def mrsa_two(world: World, n: int) -> list:
    """Two references, a prompt naming both shapes only: the share of subjects present in their own
    appearance (multi-concept composition)."""
    both, both0 = [], []
    for i in range(n):
        rng = _rng(2, i)
        things = distinct_things(rng, 2)
        refs = None
        for t in things:
            img, masks, caption, _ = reference_scene(rng, [t])
            refs = encode_reference(world, img, masks[0], caption, references=refs)
        prompt = f"a {things[0][2]} and a {things[1][2]}"
        lat = torch.cat([world.sample(prompt, [_seed(i)], mrsa_model(world, refs)), world.sample(prompt, [_seed(i)])])
        on, off = world.read(world.decode(lat))
        both.append(np.mean([measures.appearance_match(on, s, c, p) == 1.0 for c, p, s in things]))
        both0.append(np.mean([measures.appearance_match(off, s, c, p) == 1.0 for c, p, s in things]))
    return [Effect("mrsa", "two_subjects_own_appearance", both, both0, "share of the two subjects present with "
                   "their own colour and pattern; two references vs the prompt alone")]


def dmsa(world: World, n: int) -> list:
    """Structure reference (shape, place) and appearance reference (colour, pattern) of different
    subjects; prompt: the structure subject's shape, which is also the blend word. Success: the object
    of that shape sits inside the structure subject's mask and wears the appearance subject's colour and
    pattern. DMSA vs MRSA with both references vs the prompt alone."""
    from ..nodes.attention import DisentangleMixingAttentionNode
    ok = {"dmsa": [], "mrsa": [], "prompt": []}
    place = {"dmsa": [], "mrsa": [], "prompt": []}
    look = {"dmsa": [], "mrsa": [], "prompt": []}
    for i in range(n):
        rng = _rng(3, i)
        (c1, p1, s1), (c2, p2, s2) = distinct_things(rng, 2)
        img1, m1, cap1, _ = reference_scene(rng, [(c1, p1, s1)])
        img2, m2, cap2, _ = reference_scene(rng, [(c2, p2, s2)])
        r1 = encode_reference(world, img1, m1[0], cap1)
        r2 = encode_reference(world, img2, m2[0], cap2)
        prompt = f"a {s1}"
        dm = DisentangleMixingAttentionNode.execute(world.model, r1, r2, world.clip, prompt, s1, DMSA_PRESET).result[0]
        both = encode_reference(world, img2, m2[0], cap2, references=r1)
        lat = torch.cat([world.sample(prompt, [_seed(i)], dm), world.sample(prompt, [_seed(i)], mrsa_model(world, both)),
                         world.sample(prompt, [_seed(i)])])
        for key, found in zip(("dmsa", "mrsa", "prompt"), world.read(world.decode(lat))):
            f = measures.of_shape(found, s1)
            at = f is not None and measures.placed(found, s1, m1[0])
            wears = f is not None and f.appearance == (c2, p2)
            place[key].append(float(at))
            look[key].append(float(wears))
            ok[key].append(float(at and wears))
    note = ("object of the structure subject's shape inside its mask, in the appearance subject's colour and pattern")
    return [Effect("dmsa", "structure_and_appearance_vs_mrsa", ok["dmsa"], ok["mrsa"], note + "; DMSA vs MRSA with both"),
            Effect("dmsa", "structure_and_appearance_vs_prompt", ok["dmsa"], ok["prompt"], note + "; DMSA vs prompt alone"),
            Effect("dmsa", "appearance_vs_mrsa", look["dmsa"], look["mrsa"], "appearance subject's colour and pattern"),
            Effect("dmsa", "structure_place_vs_prompt", place["dmsa"], place["prompt"], "inside the structure mask")]


def composer(world: World, n: int) -> list:
    """Two subjects composed on a canvas (Subject Composer, random placement), mean-shifted noise with
    gamma 1 vs plain noise of the same seed; prompt naming both subjects fully. Success: each subject's
    shape found with its centre inside the place the composer gave it. Gamma 0 vs plain noise."""
    from ..nodes.mudi import MeanShiftedNoiseNode, PersonalizeSubject, PersonalizeSubjectComposer
    hit, hit0, zero_diff = [], [], []
    for i in range(n):
        rng = _rng(4, i)
        things = distinct_things(rng, 2)
        subjects = None
        for t in things:
            img, masks, _, _ = reference_scene(rng, [t])
            subjects = PersonalizeSubject.execute(torch.from_numpy(img)[None], torch.from_numpy(masks[0].astype(np.float32))[None],
                                                  t[2], subjects).result[0]
        image, cmasks, _ = PersonalizeSubjectComposer.execute(subjects, 128, 128, "random", 0.75, 1.0, 0.0, "white",
                                                             _seed(i), 8).result
        prompt = data.join_phrases([f"a {c} {p} {s}" for c, p, s in things])
        lat = {"samples": torch.zeros(1, 4, 16, 16)}
        shifted = MeanShiftedNoiseNode.execute(world.model, 1.0, _seed(i), image, world.vae, None, cmasks).result[0]
        out = torch.cat([world.sample(prompt, [_seed(i)], noise=shifted.generate_noise(lat)), world.sample(prompt, [_seed(i)])])
        if i < 2:
            zero = MeanShiftedNoiseNode.execute(world.model, 0.0, _seed(i), image, world.vae, None, cmasks).result[0]
            zero_diff.append(float((zero.generate_noise(lat) - world.noise([_seed(i)])).abs().max()))
        on, off = world.read(world.decode(out))
        regions = [m.numpy() > 0.5 for m in cmasks]
        hit.append(np.mean([measures.placed(on, t[2], r) for t, r in zip(things, regions)]))
        hit0.append(np.mean([measures.placed(off, t[2], r) for t, r in zip(things, regions)]))
    return [Effect("composer", "placement", hit, hit0, "share of subjects whose shape is found inside its composed "
                   "place; mean-shifted noise (gamma 1) vs plain noise"),
            Effect("composer", "gamma_zero_max_diff", zero_diff, [0.0] * len(zero_diff),
                   "largest noise difference, gamma 0 vs RandomNoise (must be 0)")]


def mrsa_once(world: World, n: int) -> list:
    """MRSA's references run once per run (Reference Reuse 'once per run') at two noise levels, clean
    (reference_noise 1.0) and the middle step's (0.5), against FreeCustom's re-noising at every step,
    on the scenes and prompts of the MRSA experiment: the subject's embedding match, its colour and
    pattern, and whether the prompted shape is drawn at all."""
    from ..nodes.reference_cache import ONCE, ReferenceReuseNode
    levels = {"once_clean": 1.0, "once_mid": 0.5}
    emb = {k: [] for k in ("per_step", *levels, "plain")}
    look = {k: [] for k in emb}
    drawn = {k: [] for k in emb}
    for i in range(n):
        rng = _rng(1, i)                                   # the MRSA experiment's subjects
        (c, p, s), other = distinct_things(rng, 2)
        img, masks, caption, _ = reference_scene(rng, [(c, p, s), other])
        prompt = f"a {s}"
        ref_emb = world.scorer.embed_thing(img, masks[0])
        per_step = mrsa_model(world, encode_reference(world, img, masks[0], caption))
        models = {"per_step": per_step, "plain": None}
        for name, level in levels.items():
            models[name] = ReferenceReuseNode.execute(per_step, references_run=ONCE, keep_across_runs=False,
                                                      reference_noise=level).result[0]
        lat = torch.cat([world.sample(prompt, [_seed(i)], m) for m in models.values()])
        for name, found in zip(models, world.read(world.decode(lat))):
            emb[name].append(measures.embedding_match(found, s, ref_emb))
            look[name].append(measures.appearance_match(found, s, c, p))
            drawn[name].append(float(measures.of_shape(found, s) is not None))
    out = []
    for name, level in levels.items():
        note = f"references once per run at reference_noise {level} vs re-noised every step (FreeCustom)"
        extra = {"plain": measures.summary(emb["plain"])["mean"]}
        out += [Effect("mrsa_once", f"{name}_embedding", emb[name], emb["per_step"], note, extra=extra),
                Effect("mrsa_once", f"{name}_appearance", look[name], look["per_step"], note,
                       extra={"plain": measures.summary(look["plain"])["mean"]}),
                Effect("mrsa_once", f"{name}_shape_drawn", drawn[name], drawn["per_step"], note,
                       extra={"plain": measures.summary(drawn["plain"])["mean"]})]
    return out


EXPERIMENTS = {"mrsa": mrsa_single, "mrsa_two": mrsa_two, "dmsa": dmsa, "composer": composer, "mrsa_once": mrsa_once}
