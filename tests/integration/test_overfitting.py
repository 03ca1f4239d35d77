"""Infusion's overfitting metrics inside a real ComfyUI on the tiny random SD1.5 model
(metrics/overfitting_comfy.py, the Overfitting Metrics node, ``tools/evaluate.py overfitting``): base
vs base is exactly 0, a random LoRA and an Apply Infusion patch give LFD > 0, the LFD equals a
computation written here with ComfyUI's own model call, Infusion leaves the negative-prompt path
alone, seeds, errors, and the command run headless. Tiny sizes (64 px, 2 levels, 2 samples, 2 steps).
Skipped when no ComfyUI tree is found (set COMFYUI_PATH)."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from comfy_sampling import encode, sample
from pack_paths import PACK_ROOT, comfyui_root

ROOT = comfyui_root()

WITHOUT = ["a photo of a dog on the grass", "a city street at night"]
WITH = ["a photo of a cat on the beach"]
INFUSION_PROMPT = "a photo of a cat on the beach"
TINY = dict(levels=2, samples=2, steps=2, seed=0, size=64)


def oc():
    from personalize_pack.metrics import overfitting_comfy
    return overfitting_comfy


def random_lora(model, rank=4, scale=0.05, seed=0) -> dict:
    """A LoRA in the kohya/ComfyUI key format (training/lora.py's ``lora_key``) on every
    self-attention query and cross-attention key/value projection, with random down and up."""
    from personalize_pack.training.lora import lora_key
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for path, m in model.model.diffusion_model.named_modules():
        if isinstance(m, torch.nn.Linear) and path.endswith(("attn1.to_q", "attn2.to_k", "attn2.to_v")):
            name = lora_key(path)
            sd[f"{name}.lora_down.weight"] = torch.randn(rank, m.in_features, generator=g) / rank
            sd[f"{name}.lora_up.weight"] = torch.randn(m.out_features, rank, generator=g) * scale
            sd[f"{name}.alpha"] = torch.tensor(float(rank))
    assert len(sd) == 3 * 3 * 16          # 16 transformer blocks in the tiny SD1.5
    return sd


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory, sd15):
    from safetensors.torch import save_file
    path = tmp_path_factory.mktemp("overfitting_lora") / "random_lora.safetensors"
    save_file(random_lora(sd15[0]), str(path))
    return path


@pytest.fixture(scope="module")
def lora_model(sd15, lora_file):
    import comfy.model_management
    import comfy.sd
    import comfy.utils
    model, clip, _ = sd15
    patched, _ = comfy.sd.load_lora_for_models(model, clip, comfy.utils.load_torch_file(str(lora_file)), 1.0, 0.0)
    assert len(patched.patches) == 3 * 16
    yield patched
    comfy.model_management.unload_model_and_clones(patched)     # the shared weights unpatched for other tests


@pytest.fixture(scope="module")
def infusion_file(tiny_dir, sd15):
    """A random Infusion file in a registered ``model_patches`` folder."""
    import folder_paths
    from personalize_pack.attention.infusion import cross_attention_widths
    from personalize_pack.training.infusion import InfusionOffsets, save_offsets
    widths, family = cross_attention_widths(sd15[0])
    m = InfusionOffsets(widths, kv="kv")
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    d = tiny_dir / "overfitting_patches"
    path = save_offsets(d / "overfit_cat.safetensors", m, "cat", family)
    folder_paths.add_model_folder_path("model_patches", str(d))
    return path


@pytest.fixture(scope="module")
def infused(sd15, infusion_file):
    from personalize_pack.nodes.infusion import InfusionApply
    model, clip, _ = sd15
    return InfusionApply.execute(model, "overfit_cat.safetensors", clip, INFUSION_PROMPT, "cat", 1.0).result[0]


@pytest.fixture(scope="module")
def dino():
    from tiny_scorers import tiny_dino
    return tiny_dino()


def metrics(base, custom, sd15, eval_model=None, without=WITHOUT, with_=WITH, **kw):
    _, clip, vae = sd15
    args = dict(TINY)
    args.update(kw)
    return oc().overfitting_metrics(base, custom, clip, vae, eval_model, without, with_, **args)


def numbers(report) -> dict:
    d = report["lfd_details"]
    return {"lfd": report["lfd"], "w2": report["w2"], "levels": [(r["sigma"], r["lfd"], r["eps_mse"])
                                                                 for r in d["per_level"]],
            "prompts": [(r["prompt"], r["lfd"]) for r in d["per_prompt"]], "w2d": report["w2_details"]}


# ------------------------------------------------------------------------------------------------

def test_base_vs_base_is_exactly_zero(sd15, dino):
    model = sd15[0]
    for custom in (model, model.clone()):
        r = metrics(model, custom, sd15, dino)
        assert r["lfd"] == 0.0 and r["lfd_details"]["eps_mse"] == 0.0
        assert r["w2"] == 0.0                                  # identical generations, identical features
        w = r["w2_details"]
        assert w["mean_term"] == 0.0 and w["cov_term"] == 0.0 and w["n_base"] == w["n_custom"] == 2
        assert w["dim"] == 128 and w["features"] == "DINO CLS embeddings"
    levels = r["lfd_details"]["per_level"]
    assert len(levels) == 2 and levels[0]["sigma"] > levels[1]["sigma"]
    sched = model.model.model_sampling.sigmas
    assert all(float((sched - lv["sigma"]).abs().min()) < 1e-5 * lv["sigma"] for lv in levels)
    assert r["lfd_details"]["count"] == len(WITHOUT) * 2 * 2
    assert [p["text"] for p in r["lfd_details"]["per_prompt"]] == WITHOUT


def test_random_lora_lfd_matches_a_direct_computation(sd15, lora_model, dino):
    """LFD > 0 for a random LoRA, and equal to the definition computed here: the base model's
    latents from comfy_sampling's sampler call, the noise H1 draws (one randn per level from a CPU
    generator seeded with the seed), ε̂ = (x_t − apply_model(x_t, σ))/σ of each loaded patcher."""
    import comfy.model_management as mm
    from personalize_pack.metrics.overfitting import timestep_levels
    model, clip, _ = sd15
    r = metrics(model, lora_model, sd15, dino)
    assert r["lfd"] > 0 and all(lv["lfd"] > 0 and lv["eps_mse"] > 0 for lv in r["lfd_details"]["per_level"])
    assert r["w2"] > 0 and math.isclose(r["w2"] ** 2, r["w2_details"]["mean_term"] + r["w2_details"]["cov_term"],
                                        rel_tol=1e-9)

    neg = encode(clip, "")
    conds = [encode(clip, p)[0][0] for p in WITHOUT]
    x0 = torch.cat([model.model.process_latent_in(sample(model, encode(clip, p), neg, size=(8, 8), batch=2, steps=2,
                                                         cfg=7.5, seed=i).float())
                    for i, p in enumerate(WITHOUT)])
    ctx = torch.cat([c.expand(2, -1, -1) for c in conds])
    sigmas = timestep_levels(model.model.model_sampling.sigmas, 2)
    g = torch.Generator().manual_seed(0)
    noises = [torch.randn(x0.shape, generator=g) for _ in sigmas]

    def eps(mp):
        mm.load_models_gpu([mp])
        out = []
        for s, n in zip(sigmas, noises):
            xt = x0 + s * n
            sig = torch.full((x0.shape[0],), s)
            with torch.no_grad():
                den = mp.model.apply_model(xt, sig, c_crossattn=ctx, transformer_options={"cond_or_uncond": [0]})
            out.append((xt - den.float()) / s)
        return out

    e_base, e_lora = eps(model), eps(lora_model)
    per_level = [float((((c.double() - b.double()) / s) ** 2).mean()) for b, c, s in zip(e_base, e_lora, sigmas)]
    want = sum(per_level) / len(per_level)
    assert math.isclose(r["lfd"], want, rel_tol=1e-5)
    for lv, w in zip(r["lfd_details"]["per_level"], per_level):
        assert math.isclose(lv["lfd"], w, rel_tol=1e-5)


def test_same_seed_same_numbers_other_seed_differs(sd15, lora_model):
    a = metrics(sd15[0], lora_model, sd15)
    b = metrics(sd15[0], lora_model, sd15)
    c = metrics(sd15[0], lora_model, sd15, seed=1)
    assert numbers(a) == {**numbers(b), "w2": numbers(a)["w2"]} and math.isnan(a["w2"]) and math.isnan(b["w2"])
    assert c["lfd"] != a["lfd"]


def test_infusion_changes_the_cond_path_only(sd15, infused):
    """Apply Infusion's patch acts on the positive-prompt rows (LFD > 0 with ``cond_or_uncond = [0]``)
    and leaves the negative-prompt rows exactly as the base model has them."""
    from personalize_pack.metrics.overfitting import latent_fisher_divergence
    model, clip, _ = sd15
    r = metrics(model, infused, sd15, without=[INFUSION_PROMPT, "a city street at night"])
    assert r["lfd"] > 0 and all(p["lfd"] > 0 for p in r["lfd_details"]["per_prompt"])
    conds = oc().encode_prompts(clip, [INFUSION_PROMPT])
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    levels = [10.0, 1.0]
    for label, zero in ((1, True), (0, False)):
        out = latent_fisher_divergence(oc().eps_predictor(model, conds, cond_label=label),
                                       oc().eps_predictor(infused, conds, cond_label=label), x0, [0, 0], levels)
        assert (out["lfd"] == 0.0) == zero, (label, out["lfd"])


def test_node_outputs_progress_and_missing_eval_model(sd15, lora_model):
    import comfy.utils
    from personalize_pack.nodes.overfitting import OverfittingMetrics
    model, clip, vae = sd15
    seen = []
    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview=None, *a, **k: seen.append((value, total)))
    try:
        out = OverfittingMetrics.execute(model, lora_model, clip, vae, "\n".join(WITHOUT) + "\n\n", "", levels=2,
                                         samples=2, steps=2, cfg=7.5, resolution=64, seed=0).result
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
    lfd, w2, report = out
    assert lfd > 0 and math.isnan(w2)
    assert lfd == metrics(model, lora_model, sd15)["lfd"]
    assert "| level |" in report and "sigma" in report and "eps-MSE" in report
    assert "W2 = NaN" in report and "no eval_model" in report
    total = len(WITHOUT) * 2 * 2 * 2 + 2 * len(WITHOUT) * 2 * 2     # sampling rows + LFD rows
    assert seen and seen[-1] == (total, total) and all(t == total for _, t in seen)
    assert [v for v, _ in seen] == sorted(v for v, _ in seen)


def test_errors(sd15, sdxl, dino):
    model, clip, vae = sd15
    E = oc().OverfittingError
    with pytest.raises(E, match=r"different model families: base_model is a SD15 model .*768-wide.*custom_model is a "
                                r"\w+ model .*2048-wide"):
        metrics(model, sdxl, sd15)
    with pytest.raises(E, match=r"base_model is a \w+ model .*2048.*custom_model is a SD15"):
        metrics(sdxl, model, sd15)
    with pytest.raises(E, match="prompts_without: empty"):
        metrics(model, model, sd15, without=" \n \n")
    with pytest.raises(E, match="prompts_with: empty"):
        metrics(model, model, sd15, dino, with_="")
    with pytest.raises(E, match="at least 2 per model"):
        metrics(model, model, sd15, dino, samples=1)
    with pytest.raises(E, match="custom_model: expected a ComfyUI MODEL"):
        metrics(model, clip, sd15)
    with pytest.raises(E, match="eval_model: expected a CLIP or DINO model"):
        metrics(model, model, sd15, eval_model="dino")


# ------------------------------------------------------------------------------------------------ command

TOOL = PACK_ROOT / "tools" / "evaluate.py"


def test_command_runs_headless_and_writes_the_json(tiny_sd15_path, lora_file, infusion_file, dino, tmp_path):
    dino_path = tmp_path / "tiny_dino.pth"
    torch.save(dino.state_dict(), dino_path)
    prompts = tmp_path / "without.txt"
    prompts.write_text("a photo of a dog on the grass\n\na city street at night\n")
    out = tmp_path / "report.json"
    p = subprocess.run([sys.executable, str(TOOL), "overfitting", "--comfyui", str(ROOT), "--checkpoint",
                        str(tiny_sd15_path), "--lora", str(lora_file), "--infusion", str(infusion_file),
                        "--concept-word", "cat", "--eval-model", str(dino_path), "--prompts-without", str(prompts),
                        "--prompts-without", "a bowl of fruit", "--prompts-with", INFUSION_PROMPT, "--levels", "2",
                        "--samples", "2", "--steps", "2", "--size", "64", "--cpu", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["prompts_without"] == WITHOUT + ["a bowl of fruit"] and report["prompts_with"] == [INFUSION_PROMPT]
    assert report["lfd"] > 0 and report["w2"] > 0 and report["w2_details"]["features"] == "DINO CLS embeddings"
    assert len(report["lfd_details"]["per_level"]) == 2 and report["lfd_details"]["count"] == 3 * 2 * 2
    assert report["inputs"]["lora"] == str(lora_file.resolve()) and report["settings"]["size"] == 64
    assert f"LFD = {report['lfd']:.6g}" in p.stdout and f"W2 = {report['w2']:.6g}" in p.stdout
    assert "| level |" in p.stdout and "100%" in p.stderr


def test_command_bad_arguments(tmp_path, tiny_sd15_path, capsys):
    from personalize_pack.metrics import cli as ev
    base = ["overfitting", "--checkpoint", str(tiny_sd15_path), "--prompts-without", "a dog"]
    for extra, message in [([], "give the customised model: --lora FILE and/or --infusion FILE"),
                           (["--lora", str(tmp_path / "none.safetensors")], "none.safetensors: no such file"),
                           (["--infusion", str(tiny_sd15_path), "--shrinkage", "2"], "--shrinkage: expected auto"),
                           (["--infusion", str(tiny_sd15_path), "--levels", "0"], "--levels: expected an integer")]:
        assert ev.main(base + extra) == 2, extra
        assert message in capsys.readouterr().err
    assert ev.main(["overfitting", "--checkpoint", str(tiny_sd15_path), "--lora", str(tiny_sd15_path)]) == 2
    assert "--prompts-without: give prompts" in capsys.readouterr().err
    assert ev.main(["overfitting", "--help"]) == 0
    assert "latent Fisher divergence (LFD)" in " ".join(capsys.readouterr().out.split())
