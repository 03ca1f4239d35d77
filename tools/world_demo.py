"""The world demo (``python tools/world.py demo``): on a ComfyUI tree with no model downloads, build the world
checkpoint from the pack's weights when it is missing, run the shipped world MRSA workflow
(workflows/World model - FreeCustom MRSA.json) headless twice with the same seed, once as
shipped and once with Multi-Reference Attention bypassed (its MODEL input passes through, as Ctrl+B does in the
editor), and score both images with the world's scorer.

Reference fidelity is ``world.measures.appearance_match``: on the object of each reference subject's shape
(the largest, when there are several), the share of the subject's colour and pattern it wears (0 when no
object of that shape is found); the embedding match is the cosine of the scorer's embeddings of that object
and of the reference subject; a subject is present when some object has its shape, colour and pattern.

What lands in ``--out``: ``world_demo_plain.png`` and ``world_demo_mrsa.png`` (the two results, the workflow
embedded), ``world_demo_scores.json``, the references in ``inputs/`` and ComfyUI's own output folders
``plain/`` and ``mrsa/``."""
from __future__ import annotations

import copy
import json
import shutil
import sys
import tempfile
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:    # tools/ is not a package: its modules import by path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import run_workflow as rw
from pack_import import import_pack
from workflows import settings

import_pack()
from personalize_pack.files.atomic import atomic_write_text
from personalize_pack.world import checkpoint, measures, scorer

WORKFLOW = settings.workflow_path(settings.WORLD_FREECUSTOM["stem"])
MRSA_NODE = "PersonalizeMultiReferenceAttention"
CONDITIONS = {"plain": "plain (MRSA bypassed)", "mrsa": "with MRSA"}
SCORES_FILE = "world_demo_scores.json"


def subjects() -> list[dict]:
    """The workflow's reference subjects: shape, colour, pattern and the shipped image and mask."""
    out = []
    for subject, image, mask, _caption in settings.WORLD_FREECUSTOM["refs"]:
        colour, pattern, shape = settings.WORLD_SUBJECTS[subject]
        out.append({"shape": shape, "colour": colour, "pattern": pattern, "image": image, "mask": mask})
    return out


def without_mrsa(workflow: dict) -> dict:
    """The same graph with Multi-Reference Attention bypassed: the sampler gets the checkpoint's model."""
    plain = copy.deepcopy(workflow)
    nodes = [n for n in plain["nodes"] if n["type"] == MRSA_NODE]
    if len(nodes) != 1:
        raise ValueError(f"{WORKFLOW.name}: expected one {MRSA_NODE} node, found {len(nodes)}")
    nodes[0]["mode"] = 4
    return plain


def sampler_seed(workflow: dict) -> int:
    return int(next(n for n in workflow["nodes"] if n["type"] == "KSampler")["widgets_values"][0])


def read_rgb(path: Path):
    import numpy as np
    from PIL import Image
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def reference_embeddings(reader: scorer.Scorer, folder: Path, subs: list) -> list:
    """The scorer's embedding of each reference subject (its image under its mask)."""
    return [reader.embed_thing(read_rgb(folder / s["image"]), read_rgb(folder / s["mask"])[..., 0] > 127)
            for s in subs]


def score(reader: scorer.Scorer, image, subs: list, embeddings: list) -> dict:
    """What the world's scorer reads in one result (uint8 [H, W, 3]) about the reference subjects."""
    found = reader.read(image)
    per = {s["shape"]: measures.appearance_match(found, s["shape"], s["colour"], s["pattern"]) for s in subs}
    emb = [measures.embedding_match(found, s["shape"], e) for s, e in zip(subs, embeddings)]
    shapes = sum(measures.of_shape(found, s["shape"]) is not None for s in subs)
    present = sum(any((f.shape, f.colour, f.pattern) == (s["shape"], s["colour"], s["pattern"]) for f in found)
                  for s in subs)
    return {"reference_fidelity": round(sum(per.values()) / len(per), 4),
            "per_subject": per,
            "reference_embedding": round(sum(emb) / len(emb), 4),
            "shapes_found": shapes,
            "subjects_present": present,
            "found": [{"shape": f.shape, "colour": f.colour, "pattern": f.pattern,
                       "centre": [round(f.cx, 1), round(f.cy, 1)]} for f in found]}


def table(report: dict) -> str:
    """The scores as a markdown table, one row per condition."""
    subs = report["subjects"]
    head = (["condition"] + [f"{s['shape']} ({s['colour']} {s['pattern']})" for s in subs]
            + ["reference fidelity", "embedding match", "shapes found", "subjects present"])
    rows = []
    for key, label in CONDITIONS.items():
        c = report["conditions"][key]
        rows.append([label] + [f"{c['per_subject'][s['shape']]:.2f}" for s in subs]
                    + [f"{c['reference_fidelity']:.2f}", f"{c['reference_embedding']:.2f}",
                       f"{c['shapes_found']}/{len(subs)}", f"{c['subjects_present']}/{len(subs)}"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def import_comfyui(root: Path, cpu: bool) -> None:
    """ComfyUI's core with PyTorch's attention (deterministic on the CPU; ComfyUI's own choice on a GPU)."""
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from comfy.cli_args import args
    if "comfy.model_management" not in sys.modules:
        args.use_pytorch_cross_attention = True
    rw.import_comfyui(root, cpu)


def run_demo(comfyui=None, weights: Path = checkpoint.WEIGHTS, out: Path = Path("world_demo"), models=None,
             seed: int | None = None, rebuild: bool = False, cpu: bool = False, log=print) -> dict:
    """Build the checkpoint if needed, run both conditions, write the images and the scores; returns the
    report (the JSON's content). Raises WorkflowError, FileNotFoundError or ValueError with what is wrong."""
    root = rw.find_comfyui(comfyui)
    weights, out = Path(weights), Path(out)
    reader = scorer.Scorer.from_state(checkpoint.read_part(checkpoint.SCORER_FILE, weights))
    import_comfyui(root, cpu)
    models_dir = Path(models) if models else root / "models"
    ckpt = models_dir / "checkpoints" / checkpoint.CHECKPOINT_NAME
    if rebuild or checkpoint.needs_build(ckpt, weights):
        log(f"building the world checkpoint from {weights} at {ckpt}")
        checkpoint.build(ckpt, weights, overwrite=True)
    else:
        log(f"using the world checkpoint {ckpt} (--rebuild to make it again from {weights})")

    workflow = json.loads(WORKFLOW.read_text(encoding="utf-8"))
    seed = sampler_seed(workflow) if seed is None else int(seed)
    out.mkdir(parents=True, exist_ok=True)
    subs = subjects()
    report = {"workflow": WORKFLOW.name, "checkpoint": str(ckpt), "weights": str(weights), "seed": seed,
              "prompt": settings.WORLD_FREECUSTOM["prompt"],
              "metric": "reference fidelity: on the object of each reference subject's shape, the share of the "
                        "subject's colour and pattern it wears (world.measures.appearance_match), averaged over "
                        "the subjects; embedding match: cosine of the world scorer's embeddings; subjects present: "
                        "objects with a subject's shape, colour and pattern",
              "subjects": [{k: s[k] for k in ("shape", "colour", "pattern")} for s in subs], "conditions": {}}
    embeddings = None
    with tempfile.TemporaryDirectory(prefix="world_demo_") as tmp:
        for key, graph in (("plain", without_mrsa(workflow)), ("mrsa", workflow)):
            log(f"--- {CONDITIONS[key]}, seed {seed}")
            path = Path(tmp) / f"{key}.json"
            path.write_text(json.dumps(graph), encoding="utf-8")
            outputs = rw.run_workflow(path, root, output_dir=out / key, models_dir=models,
                                      input_dir=out / "inputs", overrides={"KSampler.seed": seed}, log=log)
            saved = [i for o in outputs.values() for i in o.get("images", []) if i.get("type") == "output"]
            if len(saved) != 1:
                raise ValueError(f"expected one saved image from {WORKFLOW.name}, got {len(saved)}")
            image = out / f"world_demo_{key}.png"
            shutil.copyfile(out / key / saved[0].get("subfolder", "") / saved[0]["filename"], image)
            if embeddings is None:
                embeddings = reference_embeddings(reader, out / "inputs", subs)
            report["conditions"][key] = {"label": CONDITIONS[key], "image": image.name,
                                         **score(reader, read_rgb(image), subs, embeddings)}
    atomic_write_text(out / SCORES_FILE, json.dumps(report, indent=2) + "\n")
    log(f"wrote {out / 'world_demo_plain.png'}, {out / 'world_demo_mrsa.png'} and {out / SCORES_FILE}")
    return report
