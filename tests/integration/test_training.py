"""Seg-Mix LoRA training end to end in a real ComfyUI, on the CPU, with the tiny SD1.5: the node writes
the job folder, the child process trains (ComfyUI's own UNet and VAE rebuilt there), the LoRA lands in
models/loras in the format core's LoraLoader reads, and it changes sampling. Also: the loss falls on a
fixed batch (an overfit check), validation previews, resume after a killed run, Cancel. Skipped without
ComfyUI (set COMFYUI_PATH)."""
from __future__ import annotations

import json
import os
import time

import pytest
import torch
from safetensors.torch import load_file

from comfy_sampling import encode, load_image, load_mask, sample

from training_nodes import INPUTS, dataset, node, train, training_folders


@pytest.fixture(scope="module")
def env(sd15, tmp_path_factory):
    import comfy_host
    comfy_host.init_nodes_with_pack()
    with training_folders(tmp_path_factory) as (loras, patches, out):
        yield sd15, loras, out


def test_lora_trains_in_the_child_and_core_loraloader_applies_it(env):
    (model, clip, vae), loras, out = env
    lora_name, patched, curve, previews, report = train(model, clip, vae, dataset(), "tiny_segmix",
                                                        validation_prompt="a photo of olis cat and hta dog",
                                                        validate_every=2)
    assert lora_name == "tiny_segmix.safetensors" and (loras / lora_name).is_file()
    assert "4 steps" in report
    assert curve.shape[0] == 1 and curve.shape[-1] == 3
    assert previews.shape[0] == 2 and previews.shape[1:3] == (64, 64)          # steps 2 and 4
    # core's LoraLoader reads the file: every key maps, and sampling changes
    import nodes
    import comfy.lora
    sd = load_file(str(loras / lora_name))
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    bases = {k.rsplit(".", 2)[0] if k.endswith(("lora_up.weight", "lora_down.weight")) else k.rsplit(".", 1)[0]
             for k in sd}
    assert bases and all(b in key_map for b in bases)
    attentions = sum(type(m).__name__ == "CrossAttention" for m in model.model.diffusion_model.modules())
    assert len(bases) == 4 * attentions   # to_q, to_k, to_v, to_out.0 of every attn1 and attn2
    m2, _ = nodes.LoraLoader().load_lora(model, clip, lora_name, 1.0, 0.0)
    pos, neg = encode(clip, "a photo of olis cat"), encode(clip, "")
    plain = sample(model, pos, neg)
    with_lora = sample(m2, pos, neg)
    assert (with_lora - plain).abs().max() > 1e-4
    torch.testing.assert_close(sample(patched, pos, neg), with_lora)            # the node's MODEL output = LoraLoader
    torch.testing.assert_close(sample(model, pos, neg), plain)                  # the input MODEL is unchanged


def test_loss_falls_on_a_fixed_batch(env):
    (model, clip, vae), loras, out = env
    # fixed_batch is a job option, not a node input: run the job folder the node wrote, with it set
    from personalize_pack.nodes.training import job_folder
    from personalize_pack.training.runner import run_job
    train(model, clip, vae, dataset(), "tiny_overfit", steps=1, loss="mse", segmix_prob=0.0)
    job = job_folder("segmix_lora", "tiny_overfit")
    cfg = json.loads(open(os.path.join(job, "job.json")).read())
    cfg.update(steps=20, fixed_batch=True, learning_rate=2e-2, resume=False, output=str(loras / "tiny_overfit2.safetensors"))
    with open(os.path.join(job, "job.json"), "w") as f:
        json.dump(cfg, f)
    losses = run_job(job)["losses"]
    assert len(losses) == 20
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    # about 1.06 -> 0.89 here: a steady fall, more than 10 %, ending below every early step
    assert last < 0.9 * first and losses[-1] < min(losses[:5]), losses


def test_killed_run_resumes_and_cancel_leaves_nothing(env):
    (model, clip, vae), loras, out = env
    from personalize_pack.nodes.training import job_folder
    from personalize_pack.training.runner import TrainingCancelled, run_job
    # one uninterrupted run as the reference
    train(model, clip, vae, dataset(), "tiny_ref", steps=6, checkpoint_every=2)
    ref = (loras / "tiny_ref.safetensors").read_bytes()
    # the same job under another name, cancelled after its first checkpoint
    train(model, clip, vae, dataset(), "tiny_resume", steps=1)          # writes the job folder
    job = job_folder("segmix_lora", "tiny_resume")
    cfg = json.loads(open(os.path.join(job, "job.json")).read())
    cfg.update(steps=6, checkpoint_every=2, resume=False)
    with open(os.path.join(job, "job.json"), "w") as f:
        json.dump(cfg, f)
    os.remove(loras / "tiny_resume.safetensors")
    seen = []
    with pytest.raises(TrainingCancelled):
        run_job(job, seen.append, lambda: any(e.get("event") == "checkpoint" for e in seen))
    assert not (loras / "tiny_resume.safetensors").exists()
    assert not [p for p in os.listdir(loras) if p.startswith(".tiny_resume") or p.endswith(".tmp")]
    # the child stops at the next step boundary after SIGTERM: its last checkpoint may be newer than the
    # last event read; the checkpoint on disk says where the resume starts
    from personalize_pack.training.checkpoint import load_checkpoint
    done = load_checkpoint(cfg["state_dir"]).step
    assert 2 <= done < 6 and done >= max(e["step"] for e in seen if e.get("event") == "checkpoint")
    cfg["resume"] = True
    with open(os.path.join(job, "job.json"), "w") as f:
        json.dump(cfg, f)
    result = run_job(job)
    assert result["resumed_from"] == done and result["steps"] == 6
    # the resumed LoRA equals the uninterrupted one (same seed, data, model; deterministic on the CPU)
    from safetensors.torch import load
    a, b = load(ref), load((loras / "tiny_resume.safetensors").read_bytes())
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_bad_input(env):
    (model, clip, vae), loras, out = env
    ds = node("PersonalizeSegMixDataset")
    img, msk = load_image(INPUTS / "personalize_cat_04.jpg"), load_mask(INPUTS / "personalize_cat_04_mask.jpg")
    with pytest.raises(ValueError, match="masks: .* masks for"):
        ds.execute(img, load_mask(INPUTS / "personalize_cat_04_mask.jpg", 32), "olis cat", "a photo of {}")
    with pytest.raises(ValueError, match="empty"):
        ds.execute(img, torch.zeros_like(msk), "olis cat", "a photo of {}")
    with pytest.raises(ValueError, match="masks: 2 masks for 1 images"):
        ds.execute(img, torch.cat([msk, msk]), "olis cat", "a photo of {}")
    with pytest.raises(ValueError, match="phrase"):
        ds.execute(img, msk, "  ", "a photo of {}")
    one = ds.execute(img, msk, "olis cat", "a photo of {}").result[0]
    with pytest.raises(ValueError, match="segmix_prob"):
        train(model, clip, vae, one, "x")
    for name in ("../evil", "sub/evil", "..", ""):
        with pytest.raises(ValueError, match="output name"):
            train(model, clip, vae, dataset(), name)
    with pytest.raises(ValueError, match="dataset"):
        train(model, clip, vae, (), "x")


def test_infusion_trains_and_apply_infusion_uses_it(env):
    (model, clip, vae), loras, out = env
    import folder_paths
    from personalize_pack.nodes.training import job_folder
    from personalize_pack.training.infusion import load_offsets
    from personalize_pack.training.runner import run_job
    patches = folder_paths.get_folder_paths("model_patches")[0]
    imgs = torch.cat([load_image(INPUTS / "personalize_cat_04.jpg"), load_image(INPUTS / "personalize_mip_1_cat.jpg")])
    masks = torch.cat([load_mask(INPUTS / "personalize_cat_04_mask.jpg"), torch.ones(1, 64, 64)])
    name, curve, previews, report = node("PersonalizeTrainInfusion").execute(
        model, clip, vae, imgs, "cat", masks, "tiny_infusion", steps=4, learning_rate=0.05, batch_size=2,
        gradient_accumulation=2, resolution=64, offsets="kv", seed=1, validation_prompt="a photo of a cat", validate_every=2,
        checkpoint_every=2, gpus=1).result
    assert name == "tiny_infusion.safetensors" and os.path.isfile(os.path.join(patches, name))
    assert previews.shape[0] == 2 and "4 steps" in report
    f = load_offsets(os.path.join(patches, name))
    assert f.concept_word == "cat" and f.family == "SD1.x" and len(f.offsets.layer_keys()) == 16
    assert all(float(p.detach().abs().max()) > 0 for p in f.offsets.parameters())   # every offset moved from zero
    apply = node("PersonalizeApplyInfusion")
    pos, neg = encode(clip, "a photo of a cat"), encode(clip, "")
    plain = sample(model, pos, neg)
    m1 = apply.execute(model, name, clip, "a photo of a cat", "cat", 1.0).result[0]
    m0 = apply.execute(model, name, clip, "a photo of a cat", "cat", 0.0).result[0]
    assert (sample(m1, pos, neg) - plain).abs().max() > 1e-5
    assert torch.equal(sample(m0, pos, neg), plain)
    # the loss falls on a fixed batch
    job = job_folder("infusion", "tiny_infusion")
    cfg = json.loads(open(os.path.join(job, "job.json")).read())
    assert cfg["batch_size"] == 2 and cfg["gradient_accumulation"] == 2
    # the captions are the official 11 templates, the concept token where the official word index puts it
    # (infusion/dataset.py: 4, 5, 4, 5, 3, 3, 3, 1, 3, 1, 0; +1 for the start token), here found by CLIP's tokenizer
    meta = json.loads(open(os.path.join(job, "data.json")).read())
    assert meta["positions"] == [i + 1 for i in (4, 5, 4, 5, 3, 3, 3, 1, 3, 1, 0)], meta["positions"]
    assert meta["captions"][7] == "A cat shown in a photo " and meta["captions"][10] == "cat"
    # the soft masks reach the job folder divided by their maximum (the second photo's all-ones mask stays)
    data = load_file(os.path.join(job, "data.safetensors"))
    assert float(data["mask.0"].max()) == 1.0 and torch.equal(data["mask.1"], torch.ones(64, 64))
    cfg.update(steps=15, fixed_batch=True, learning_rate=0.1, resume=False, validate_every=0,
               output=os.path.join(patches, "tiny_infusion_fit.safetensors"))
    with open(os.path.join(job, "job.json"), "w") as fh:
        json.dump(cfg, fh)
    losses = run_job(job)["losses"]
    # a single token's offsets learn slowly on a random UNet: about 1.052 -> 1.014 in 15 steps, falling
    # at every step
    assert sum(losses[-3:]) / 3 < 0.98 * sum(losses[:3]) / 3 and all(b < a for a, b in zip(losses, losses[1:])), losses



def test_gradient_checkpointing_gives_the_same_gradients(env):
    """The LoRA job in this process, once plainly and once recomputing the transformer blocks in the
    backward pass: the same loss and the same LoRA gradients."""
    (model, clip, vae), loras, out = env
    from personalize_pack.nodes.training import job_folder
    from personalize_pack.training.comfy_model import LoRAJob
    from personalize_pack.training.jobs import JobContext
    train(model, clip, vae, dataset(), "tiny_ckpt", steps=1)
    job_dir = job_folder("segmix_lora", "tiny_ckpt")
    cfg = json.loads(open(os.path.join(job_dir, "job.json")).read())
    grads = []
    for flag in (False, True):
        c = dict(cfg, gradient_checkpointing=flag, segmix_prob=0.5)
        torch.manual_seed(0)
        job = LoRAJob(job_dir, c)
        job.setup(JobContext(job_dir=job_dir, config=c, device=torch.device("cpu"), seed=c["seed"], total_steps=1))
        with torch.no_grad():
            for p in job.parameters():        # a nonzero LoRA, so the gradients reach every factor
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        wrapped = sum(bool(getattr(m, "_personalize_ckpt", False)) for m in job.model.diffusion_model.modules())
        assert wrapped == (16 if flag else 0)        # every transformer block of the tiny SD1.5
        loss = job.loss(3)
        loss.backward()
        grads.append((float(loss.detach()), [p.grad.clone() for p in job.parameters()]))
        job.close()
    (l0, g0), (l1, g1) = grads
    assert l0 == pytest.approx(l1, rel=1e-5)
    assert len(g0) == len(g1) and any(float(g.abs().max()) > 0 for g in g0)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_comfyui_cancel_interrupts_the_node_and_leaves_nothing(env):
    """ComfyUI's Cancel (its interrupt flag) stops the child: the node ends with ComfyUI's own
    InterruptProcessingException, no LoRA file is written and no child process is left."""
    (model, clip, vae), loras, out = env
    import comfy.model_management as mm
    import psutil
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            train(model, clip, vae, dataset(), "tiny_cancelled", steps=200)
    finally:
        mm.interrupt_current_processing(False)
    assert not (loras / "tiny_cancelled.safetensors").exists()
    time.sleep(0.5)
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before


def test_bad_training_settings_and_infusion_input(env):
    (model, clip, vae), loras, out = env
    with pytest.raises(ValueError, match="scale_min"):
        train(model, clip, vae, dataset(), "x", scale_min=0.9, scale_max=0.8)
    with pytest.raises(ValueError, match="multiple of gpus"):
        train(model, clip, vae, dataset(), "x", batch_size=3, gpus=2)
    inf = node("PersonalizeTrainInfusion")
    imgs = load_image(INPUTS / "personalize_cat_04.jpg")
    kw = dict(output_name="x", steps=1, resolution=64)
    with pytest.raises(ValueError, match="concept_word"):
        inf.execute(model, clip, vae, imgs, "  ", None, **kw)
    with pytest.raises(ValueError, match="masks: 1 masks of 32x32 for 1 images of 64x64"):
        inf.execute(model, clip, vae, imgs, "cat", load_mask(INPUTS / "personalize_cat_04_mask.jpg", 32), **kw)
    with pytest.raises(ValueError, match="images"):
        inf.execute(model, clip, vae, imgs[0], "cat", None, **kw)
    with pytest.raises(ValueError, match="output name"):
        inf.execute(model, clip, vae, imgs, "cat", None, output_name="../up", steps=1, resolution=64)
