"""The effect of each technique in the pack's world (world/README.md): the world model (world/weights,
built into a ComfyUI checkpoint) sampled with and without each technique over the same seeds, the images
read by the world's scorer; the training techniques first train with the pack's Train nodes (their
files and job folders go to --work, and a second run with the same settings reuses them). One JSON line per effect:
``{"technique", "metric", "with", "without", "n", "p", ...}`` (means over seeds, their standard
deviations, a paired sign-flip test), then a summary line whose checks say whether each claim holds.

    COMFYUI_PATH=/path/to/ComfyUI python bench/effects.py               # every effect, 16 seeds
    COMFYUI_PATH=/path/to/ComfyUI python bench/effects.py --only dmsa   # one experiment
    COMFYUI_PATH=/path/to/ComfyUI python bench/effects.py --only segmix --seeds 12

Experiments: mrsa (fidelity, distractor leak, weight 0), mrsa_two (two subjects), dmsa, composer (about 22
minutes together on 2 CPU cores); mrsa_once (MRSA's references once per run, clean and at the middle step's
noise, against FreeCustom's every-step re-noising, on the mrsa experiment's scenes); segmix (four Seg-Mix LoRA trainings of 300 steps, about 9 minutes each
on 2 CPU cores, then the sampling); infusion (Train Infusion and a LoRA of the same photos, then sampling and
the Overfitting Metrics node); freecure (an overfit LoRA of 400 steps, about 12 minutes, set on the
conditioning as a hook, then FASA with the base model as foundation: about 18 minutes at 12 seeds); mip
(the world's IP-Adapter, built from world/weights, with one, two and three references: about 20 minutes at
12 seeds, most of it the seeded ViT-L encoding the references).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from harness import comfyui_path, csv_choice, emit, emit_summary, import_pack, log, setup_comfy

EXPERIMENTS = ("mrsa", "mrsa_two", "dmsa", "composer", "mrsa_once", "segmix", "infusion", "freecure", "mip")

# (technique, metric) -> (what the paper claims, test on the line); p < 0.05 where a difference is claimed
CLAIMS = {
    ("mrsa", "reference_fidelity"): ("MRSA raises reference fidelity", lambda e: e["with"] > e["without"] and e["p"] < 0.05),
    ("mrsa", "reference_embedding"): ("MRSA raises the embedding match", lambda e: e["with"] > e["without"] and e["p"] < 0.05),
    ("mrsa", "distractor_leak"): ("the mask keeps the distractor out (masked leaks less than whole-image)",
                                  lambda e: e["with"] < e["without"]),
    ("mrsa", "weight_zero_max_diff"): ("a weight-0 reference changes nothing", lambda e: e["with"] <= 1e-3),
    ("mrsa", "two_subjects_own_appearance"): ("two references: both subjects in their own appearance",
                                              lambda e: e["with"] > e["without"] and e["p"] < 0.05),
    ("dmsa", "structure_and_appearance_vs_mrsa"): ("DMSA mixes structure and appearance more often than MRSA",
                                                   lambda e: e["with"] > e["without"]),
    ("dmsa", "structure_and_appearance_vs_prompt"): ("DMSA mixes structure and appearance more often than the prompt",
                                                     lambda e: e["with"] > e["without"] and e["p"] < 0.05),
    ("composer", "placement"): ("mean-shifted noise places the subjects", lambda e: e["with"] > e["without"] and e["p"] < 0.05),
    ("composer", "gamma_zero_max_diff"): ("gamma 0 is RandomNoise", lambda e: e["with"] == 0.0),
    ("segmix", "both_own_appearance"): ("Seg-Mix: both subjects, each in its own appearance, more often",
                                        lambda e: e["with"] > e["without"] and e["p"] < 0.05),
    ("segmix", "identity_mixing"): ("Seg-Mix mixes the subjects' identities less", lambda e: e["with"] < e["without"]),
    ("segmix", "detect_compare"): ("Seg-Mix raises Detect-and-Compare", lambda e: e["with"] > e["without"] and e["p"] < 0.05),
    ("segmix", "missing_with_init"): ("mean-shifted initialisation finds subjects that go missing",
                                      lambda e: e["with"] < e["without"] and e["p"] < 0.05),
    ("infusion", "concept_fidelity"): ("Infusion learns the concept (fidelity above the base model)",
                                       lambda e: e["with"] > e["without"] and e["p"] < 0.05),
    ("infusion", "lfd"): ("prompts without the concept change less with Infusion than with a LoRA (LFD)",
                          lambda e: e["with"] < e["without"]),
    ("infusion", "w2"): ("Infusion's concept images stray less from the class than a LoRA's (W2)",
                         lambda e: e["with"] < e["without"]),
    ("freecure", "asked_colour"): ("FASA gives the overfit model's prompt its colour back",
                                   lambda e: e["with"] > e["without"] and e["p"] < 0.05),
    ("freecure", "pattern_kept"): ("FASA keeps the subject's identity beyond the asked attribute (pattern no rarer)",
                                   lambda e: e["with"] >= e["without"] - 0.1),
    ("freecure", "asked_colour_w1.5"): ("FASA at SDXL's weight 1.5 gives the prompt its colour back",
                                        lambda e: e["with"] > e["without"] and e["p"] < 0.05),
    ("mip", "one_reference_colour"): ("the world's IP-Adapter carries a reference's colour",
                                      lambda e: e["with"] > e["without"] and e["p"] < 0.05),
}
_MORE = lambda e: e["with"] > e["without"] and e["p"] < 0.05
_LESS = lambda e: e["with"] < e["without"] and e["p"] < 0.05
# MIP against the plain merge, with two and three references
for _metric, _claim, _test in (("confusion_{}", "MIP confuses {} references' objects less than the plain merge", _LESS),
                               ("own_colour_{}", "with MIP more of {} references' objects wear their own colour", _MORE),
                               ("confusion_{}_masks", "MIP with the references' regions as masks confuses {} objects "
                                                      "less", _LESS)):
    for _n, _count in ((2, "two"), (3, "three")):
        CLAIMS[("mip", _metric.format(_n))] = (_claim.format(_count), _test)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", type=csv_choice(EXPERIMENTS), default=list(EXPERIMENTS),
                    help="comma-separated experiments to run (default: all)")
    ap.add_argument("--seeds", type=int, default=16, help="seeds per experiment (default 16)")
    ap.add_argument("--comfyui", default=None)
    ap.add_argument("--checkpoint", default=None,
                    help="the built world checkpoint (default: built into ComfyUI's models/checkpoints)")
    ap.add_argument("--weights", default=None, help="folder of the world's weights (default: world/weights)")
    ap.add_argument("--work", default=None, help="folder for the trained files and job folders of the training "
                    "experiments (default: ComfyUI's output/personalize_world_effects)")
    opts = ap.parse_args(argv)
    t0 = time.perf_counter()
    root = comfyui_path(opts, "bench/effects.py")
    setup_comfy(root, "pytorch")
    import_pack()
    from personalize_pack.world import adapter_effects, checkpoint, effects, training_effects
    from personalize_pack.world.runtime import World
    path = Path(opts.checkpoint) if opts.checkpoint else root / "models" / "checkpoints" / checkpoint.CHECKPOINT_NAME
    weights = Path(opts.weights) if opts.weights else checkpoint.WEIGHTS
    if checkpoint.needs_build(path, weights):
        log(f"building the world checkpoint at {path} from {weights}")
        checkpoint.build(path, weights, overwrite=True)
    world = World.load(path, weights)
    experiments = {**effects.EXPERIMENTS, **training_effects.EXPERIMENTS, **adapter_effects.EXPERIMENTS}
    work = Path(opts.work) if opts.work else root / "output" / "personalize_world_effects"
    checks = {}
    for name in opts.only:
        log(f"{name}: {opts.seeds} seeds")
        with training_effects.work_folders(work):
            found = experiments[name](world, opts.seeds)
        for eff in found:
            line = eff.line()
            emit(line)
            claim = CLAIMS.get((line["technique"], line["metric"]))
            if claim is not None:
                checks[f"{line['technique']}.{line['metric']}"] = {"claim": claim[0], "applies": True,
                                                                    "met": bool(claim[1](line))}
    emit_summary(checks, t0, "", seeds=opts.seeds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
