"""The training faults of issue 20, each as a named test inside a real ComfyUI with the tiny SD1.5
(64 px, rank 4, 1-4 steps): the node's clear error names the input, and nothing the user has is lost
or changed (their file byte for byte, no leftover temporary file, job folders apart, a second Queue
that does not train again). Skipped without ComfyUI (set COMFYUI_PATH)."""
from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from training_nodes import dataset, infusion_images, node, train, train_infusion, training_folders


@pytest.fixture(scope="module")
def env(sd15, tmp_path_factory):
    import comfy_host
    comfy_host.init_nodes_with_pack()
    with training_folders(tmp_path_factory) as (loras, patches, out):
        yield sd15, loras, patches, out


def jobs(out: Path, kind: str) -> Path:
    return out / "personalize_training" / kind


def identity(path: Path) -> tuple:
    st = path.stat()
    return path.read_bytes(), st.st_mtime_ns


def user_file(path: Path) -> bytes:
    """A safetensors file the pack did not write (no personalize metadata), as a downloaded LoRA is."""
    save_file({"lora_unet_x.lora_down.weight": torch.ones(2, 3)}, str(path), metadata={"ss_network_dim": "2"})
    return path.read_bytes()


# ====================================================================================== retraining

def test_seed_does_not_randomize_after_queue():
    """A Train node added from the menu keeps its seed after a Queue (the frontend adds a 'randomize'
    control to an input named seed unless the schema says otherwise)."""
    import comfy_host
    comfy_host.init_nodes_with_pack()
    for name in ("PersonalizeTrainSegMixLoRA", "PersonalizeTrainInfusion"):
        seed = node(name).INPUT_TYPES()["required"]["seed"]
        assert seed[1].get("control_after_generate") == "fixed", (name, seed)


def test_second_queue_does_not_retrain_and_logs_progress(env, caplog):
    (model, clip, vae), loras, patches, out = env
    with caplog.at_level(logging.INFO, logger="personalize.training"):
        first = train(model, clip, vae, dataset(), "f_again", steps=2)
    lines = [r.getMessage() for r in caplog.records if r.name == "personalize.training"]
    # the console shows the child's progress, not only the UI bar
    assert any("f_again.safetensors: 2 steps" in m for m in lines), lines
    assert any("step 1/2, loss " in m for m in lines) and any("step 2/2, loss " in m for m in lines), lines
    assert any("finished: " in m for m in lines), lines
    lora = loras / "f_again.safetensors"
    before = identity(lora)
    state = jobs(out, "segmix_lora") / "f_again" / "state" / "checkpoint.safetensors"
    ckpt_before = identity(state)
    caplog.clear()
    t0 = time.perf_counter()
    with caplog.at_level(logging.INFO, logger="personalize.training"):
        again = train(model, clip, vae, dataset(), "f_again", steps=2)      # a new dataset object, equal inputs
    took = time.perf_counter() - t0
    assert "not trained again" in again[4] and again[0] == first[0] == "f_again.safetensors"
    assert identity(lora) == before and identity(state) == ckpt_before      # no child wrote anything
    assert any("not training again" in r.getMessage() for r in caplog.records)
    assert not any("step 1/2" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(again[2], first[2])                          # the same loss curve
    print(f"second Queue: {took:.2f} s")
    # one more step is a change: it continues from the checkpoint (not from zero)
    more = train(model, clip, vae, dataset(), "f_again", steps=3)
    assert "resumed from step 2" in more[4] and "3 steps" in more[4]


def test_changed_input_gets_advice_naming_inputs_that_exist(env):
    (model, clip, vae), loras, patches, out = env
    train(model, clip, vae, dataset(), "f_advice", steps=2, seed=1)
    before = identity(loras / "f_advice.safetensors")
    with pytest.raises(Exception) as info:
        train(model, clip, vae, dataset(), "f_advice", steps=2, seed=2)
    msg = str(info.value)
    inputs = set(node("PersonalizeTrainSegMixLoRA").INPUT_TYPES()["required"])
    assert "changed: seed 1 -> 2" in msg and "output_name" in msg and "set resume" not in msg
    assert {"seed", "output_name"} <= inputs and "resume" not in inputs
    assert identity(loras / "f_advice.safetensors") == before


# ====================================================================================== the model file

def test_model_from_a_file_is_not_copied_but_a_patched_one_is(env, tiny_sd15_path, tmp_path):
    (model, clip, vae), loras, patches, out = env
    train(model, clip, vae, dataset(), "f_nocopy", steps=1)
    job = jobs(out, "segmix_lora") / "f_nocopy"
    cfg = json.loads((job / "job.json").read_text())
    assert cfg["model_file"]["path"] == str(Path(tiny_sd15_path).resolve())
    assert cfg["model_file"]["size"] == os.path.getsize(tiny_sd15_path) and not (job / "model.safetensors").exists()
    # a MODEL with a LoRA applied in the graph has no file: its weights are copied (and trained on)
    import nodes
    patched, _ = nodes.LoraLoader().load_lora(model, clip, "f_nocopy.safetensors", 1.0, 0.0)
    train(patched, clip, vae, dataset(), "f_copy", steps=1)
    job2 = jobs(out, "segmix_lora") / "f_copy"
    assert json.loads((job2 / "job.json").read_text())["model_file"] is None and (job2 / "model.safetensors").is_file()
    # the recorded file changed after the node queued the run: the child refuses, naming the file
    import comfy.sd
    from personalize_pack.training.runner import TrainingError, run_job
    copy = tmp_path / "copy.safetensors"
    shutil.copyfile(tiny_sd15_path, copy)
    m2 = comfy.sd.load_checkpoint_guess_config(str(copy), output_vae=False, output_clip=False)[0]
    train(m2, clip, vae, dataset(), "f_changed", steps=1)
    job3 = jobs(out, "segmix_lora") / "f_changed"
    cfg3 = json.loads((job3 / "job.json").read_text())
    cfg3.update(steps=2)
    (job3 / "job.json").write_text(json.dumps(cfg3))
    with open(copy, "r+b") as fh:                       # the tensor data's last bytes, as a re-save would
        fh.seek(-4, os.SEEK_END)
        fh.write(b"\x00\x00\x80\x7f")
    with pytest.raises(TrainingError, match=f"the model file {copy} changed after the training node queued"):
        run_job(job3)


# ====================================================================================== concurrent runs

def test_two_runs_with_one_output_name_at_once(env):
    """A second Train node with the same output name while the first runs is refused before it writes
    anything; the first returns its own LoRA."""
    (model, clip, vae), loras, patches, out = env
    job = jobs(out, "segmix_lora") / "f_twice"
    results, errors = {}, []

    def first():
        try:
            results["a"] = train(model, clip, vae, dataset(), "f_twice", steps=8, rank=4, seed=5)
        except Exception as exc:                      # pragma: no cover - reported below
            errors.append(exc)
    t = threading.Thread(target=first)
    t.start()
    deadline = time.time() + 60
    while time.time() < deadline and not (job / "state" / ".lock").exists():
        time.sleep(0.05)                              # the first child runs
    assert (job / "state" / ".lock").exists()
    cfg_a = (job / "job.json").read_text()
    with pytest.raises(ValueError, match="output_name: another training run with the output name 'f_twice' is running"):
        train(model, clip, vae, dataset(), "f_twice", steps=2, rank=2, seed=6)
    assert (job / "job.json").read_text() == cfg_a    # the refused run wrote nothing
    t.join(600)
    assert not t.is_alive() and not errors, errors
    from safetensors import safe_open
    with safe_open(str(loras / "f_twice.safetensors"), "pt") as f:
        assert f.metadata()["rank"] == "4" and f.metadata()["steps"] == "8"
    assert "8 steps" in results["a"][4]


def test_a_lora_and_an_infusion_named_alike_keep_apart(env):
    (model, clip, vae), loras, patches, out = env
    train(model, clip, vae, dataset(), "infusion_fx", steps=1)
    train_infusion(model, clip, vae, "fx", steps=1)
    a, b = jobs(out, "segmix_lora") / "infusion_fx", jobs(out, "infusion") / "fx"
    assert a != b and json.loads((a / "job.json").read_text())["kind"] == "lora"
    assert json.loads((b / "job.json").read_text())["kind"] == "infusion"
    assert (loras / "infusion_fx.safetensors").is_file() and (patches / "fx.safetensors").is_file()
    # trained files get the ordinary mode (0o666 less the umask), as ComfyUI's outputs do
    umask = os.umask(0)
    os.umask(umask)
    for f in (loras / "infusion_fx.safetensors", patches / "fx.safetensors"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, oct(f.stat().st_mode)


# ====================================================================================== the user's files

def test_a_file_the_pack_did_not_make_is_never_overwritten(env):
    (model, clip, vae), loras, patches, out = env
    mine = user_file(loras / "f_users.safetensors")
    with pytest.raises(ValueError, match="output_name: f_users.safetensors already exists .* did not make"):
        train(model, clip, vae, dataset(), "f_users", steps=1)
    assert (loras / "f_users.safetensors").read_bytes() == mine
    assert not (jobs(out, "segmix_lora") / "f_users" / "state").exists()           # nothing trained
    theirs = user_file(patches / "f_users.safetensors")
    with pytest.raises(ValueError, match="output_name: f_users.safetensors already exists"):
        train_infusion(model, clip, vae, "f_users", steps=1)
    assert (patches / "f_users.safetensors").read_bytes() == theirs


def test_output_name_too_long_fails_before_training(env):
    (model, clip, vae), loras, patches, out = env
    longest = 255 - len(".safetensors") - len("..9999999999.tmp")
    with pytest.raises(ValueError, match=f"output name is too long .* use at most {longest} characters"):
        train(model, clip, vae, dataset(), "n" * (longest + 1), steps=1)
    assert not (jobs(out, "segmix_lora") / ("n" * (longest + 1))).exists()
    with pytest.raises(ValueError, match="output name is too long"):
        train_infusion(model, clip, vae, "m" * 240, steps=1)
    # the longest name that fits trains and lands
    name = train(model, clip, vae, dataset(), "n" * longest, steps=1)[0]
    assert (loras / name).is_file() and len(name) == longest + len(".safetensors")


def test_stale_temp_file_of_a_killed_child_is_removed(env):
    (model, clip, vae), loras, patches, out = env
    stale = loras / ".f_stale.safetensors.4194000.tmp"      # what a child killed in its final write leaves
    stale.write_bytes(b"\0" * (1 << 20))
    other = loras / ".someone_else.safetensors.4194000.tmp"
    other.write_bytes(b"x")
    train(model, clip, vae, dataset(), "f_stale", steps=1)
    assert not stale.exists() and other.exists()
    assert not [p.name for p in loras.iterdir() if p.name.startswith(".f_stale")]
    other.unlink()


def test_nan_checkpoint_is_refused_naming_the_file(env):
    (model, clip, vae), loras, patches, out = env
    train(model, clip, vae, dataset(), "f_nan", steps=2)
    before = identity(loras / "f_nan.safetensors")
    ck = jobs(out, "segmix_lora") / "f_nan" / "state" / "checkpoint.safetensors"
    from safetensors import safe_open
    with safe_open(str(ck), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    key = next(k for k in tensors if k.startswith("job."))
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, str(ck), metadata=meta)
    with pytest.raises(Exception, match=f"the checkpoint {ck} \\(step 2\\) holds NaN or infinite trained weights"):
        train(model, clip, vae, dataset(), "f_nan", steps=4)
    assert identity(loras / "f_nan.safetensors") == before


def test_bad_images_and_masks_name_the_input(env):
    (model, clip, vae), loras, patches, out = env
    from comfy_sampling import load_image, load_mask
    from training_nodes import INPUTS
    ds = node("PersonalizeSegMixDataset")
    img, msk = load_image(INPUTS / "personalize_cat_04.jpg"), load_mask(INPUTS / "personalize_cat_04_mask.jpg")
    nan_img = img.clone()
    nan_img[0, 3, 3, 1] = float("nan")
    with pytest.raises(ValueError, match="images: image 1 of 1 contains NaN"):
        ds.execute(nan_img, msk, "olis cat", "a photo of {}")
    nan_mask = msk.clone()
    nan_mask[0, 5, 5] = float("nan")
    with pytest.raises(ValueError, match="masks: mask 1 of 1 contains NaN"):
        ds.execute(img, nan_mask, "olis cat", "a photo of {}")
    with pytest.raises(ValueError, match="masks: the mask of image 1 of 1 \\('olis cat'\\) is empty"):
        ds.execute(img, torch.zeros_like(msk), "olis cat", "a photo of {}")
    imgs, masks = infusion_images()
    bad = masks.clone()
    bad[1] = float("nan")
    with pytest.raises(ValueError, match="masks: mask 2 of 2 contains NaN"):
        train_infusion(model, clip, vae, "f_badmask", masks=bad)
    bad[1] = 0.0
    with pytest.raises(ValueError, match="masks: the mask of image 2 of 2 is empty"):
        train_infusion(model, clip, vae, "f_badmask", masks=bad)
    nan_imgs = imgs.clone()
    nan_imgs[0] = float("inf")
    with pytest.raises(ValueError, match="images: image 1 of 2 contains NaN or infinite"):
        train_infusion(model, clip, vae, "f_badmask", images=nan_imgs)
    assert not (jobs(out, "infusion") / "f_badmask").exists()


def test_flux_is_refused_by_segmix_before_anything_is_written(env, flux):
    (model, clip, vae), loras, patches, out = env
    with pytest.raises(ValueError, match="model: Train Seg-Mix LoRA supports UNet models .* this is a Flux"):
        train(flux, clip, vae, dataset(), "f_flux", steps=1)
    assert not (jobs(out, "segmix_lora") / "f_flux").exists()
    with pytest.raises(ValueError, match="model: Infusion supports SD1.x and SD2.x"):
        train_infusion(flux, clip, vae, "f_flux", steps=1)
    assert not (jobs(out, "infusion") / "f_flux" / "job.json").exists()


# ====================================================================================== full and read-only folders

def _mount(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode == 0


@pytest.fixture
def small_loras(tmp_path):
    """The default loras folder moved onto a 1 MiB tmpfs, and a read-only tmpfs beside it (needs the
    right to mount: root in a container; skipped otherwise)."""
    import folder_paths
    full, ro = tmp_path / "full", tmp_path / "ro"
    if not _mount(full, "size=1m"):
        pytest.skip("cannot mount a tmpfs here (needs root): the full and read-only folder faults need one")
    if not _mount(ro, "size=1m,ro"):
        subprocess.run(["umount", str(full)], check=False)
        pytest.skip("cannot mount a read-only tmpfs here")
    paths = folder_paths.folder_names_and_paths["loras"][0]
    saved = list(paths)
    try:
        yield full, ro
    finally:
        paths[:] = saved
        for p in (full, ro):
            subprocess.run(["umount", str(p)], check=False)


def test_full_or_read_only_loras_folder_is_refused_before_training(env, small_loras):
    (model, clip, vae), loras, patches, out = env
    import folder_paths
    full, ro = small_loras
    (full / "filler.bin").write_bytes(b"\0" * (900 << 10))
    folder_paths.add_model_folder_path("loras", str(full), is_default=True)
    with pytest.raises(ValueError, match=f"output_name: not enough free space for this run in the LoRA folder {full}"):
        train(model, clip, vae, dataset(), "f_full", steps=1)
    assert not (jobs(out, "segmix_lora") / "f_full" / "state").exists()
    assert sorted(p.name for p in full.iterdir()) == ["filler.bin"]
    folder_paths.add_model_folder_path("loras", str(ro), is_default=True)
    with pytest.raises(ValueError, match=f"output_name: cannot write into the LoRA folder {ro} \\(Read-only"):
        train(model, clip, vae, dataset(), "f_ro", steps=1)
    assert not (jobs(out, "segmix_lora") / "f_ro" / "state").exists()
