"""The training faults of issue 20 that need no ComfyUI: the node side's guards (training/job_guard.py),
output names against the file system (files/output_names.py), NaN checkpoints and the resume advice
(training/checkpoint.py, training/sidecar.py with the toy job), bad training data
(training/dataset.py) and the console lines of the child's progress (training/runner.py). The
faults that need the Train nodes inside ComfyUI are in tests/integration/test_faults_training.py."""
from __future__ import annotations

import json
import multiprocessing
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from personalize_pack.files.atomic import longest_temp_name, temp_path
from personalize_pack.files.output_names import name_limits, output_path
from personalize_pack.training import checkpoint as ck
from personalize_pack.training import job_guard as guard
from personalize_pack.training import sidecar
from personalize_pack.training.dataset import dataset_from_inputs, infusion_data_from_inputs
from personalize_pack.training.runner import progress_line


# ====================================================================================== output names

def test_output_name_length_counts_the_extension_and_the_temporary_name(tmp_path):
    name_max, _ = name_limits(tmp_path)
    extra = len(longest_temp_name("x.safetensors")) - 1              # what is added to the name
    fits = "a" * (name_max - extra)
    path = output_path(tmp_path, fits, ".safetensors")
    # the longest temporary name of it really can be created on this file system
    tmp = tmp_path / longest_temp_name(path.name)
    tmp.write_bytes(b"x")
    assert len(tmp.name) == name_max and tmp.read_bytes() == b"x"
    assert len(temp_path(path).name) <= name_max
    with pytest.raises(ValueError, match=f"output name is too long \\({len(fits) + 1} bytes\\).* use at most "
                                         f"{name_max - extra} characters"):
        output_path(tmp_path, fits + "a", ".safetensors")
    with pytest.raises(OSError):                                      # what the check saves the user from
        (tmp_path / longest_temp_name(fits + "a.safetensors")).write_bytes(b"x")
    # multi-byte characters count in bytes
    with pytest.raises(ValueError, match="output name is too long"):
        output_path(tmp_path, "é" * (name_max - extra // 2), ".safetensors")


# ====================================================================================== job lock

def _try_lock(job_dir, q):
    try:
        guard.JobLock(job_dir, "shared")
        q.put("locked")
    except guard.JobBusy as exc:
        q.put(str(exc))


def test_job_lock_refuses_a_second_run_in_this_and_another_process(tmp_path):
    lock = guard.JobLock(tmp_path / "job", "shared")
    with pytest.raises(guard.JobBusy, match="output_name: another training run with the output name 'shared' is "
                                            "running now .* nothing was started"):
        guard.JobLock(tmp_path / "job", "shared")
    q = multiprocessing.get_context("fork").Queue()
    p = multiprocessing.get_context("fork").Process(target=_try_lock, args=(str(tmp_path / "job"), q))
    p.start()
    p.join(60)
    assert "another training run" in q.get(timeout=5)
    lock.release()
    with guard.JobLock(tmp_path / "job", "shared"):                   # free again once released
        pass
    assert isinstance(guard.JobLock(tmp_path / "other", "shared"), guard.JobLock)


# ====================================================================================== the user's files

def test_only_files_the_pack_wrote_are_replaceable(tmp_path):
    guard.check_replaceable(tmp_path / "missing.safetensors", ("segmix_lora",))
    ours = tmp_path / "ours.safetensors"
    save_file({"a": torch.zeros(1)}, str(ours), metadata={"personalize_kind": "segmix_lora"})
    guard.check_replaceable(ours, ("segmix_lora",))
    with pytest.raises(ValueError, match="output_name: ours.safetensors already exists .* 'segmix_lora' file"):
        guard.check_replaceable(ours, ("infusion",))
    users = tmp_path / "users.safetensors"
    save_file({"a": torch.zeros(1)}, str(users))
    before = users.read_bytes()
    with pytest.raises(ValueError, match="users.safetensors already exists .* a file this node did not make; it is "
                                         "left as it is"):
        guard.check_replaceable(users, ("segmix_lora",))
    (tmp_path / "text.safetensors").write_text("not a safetensors file")
    with pytest.raises(ValueError, match="did not make"):
        guard.check_replaceable(tmp_path / "text.safetensors", ("segmix_lora",))
    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(ValueError, match="exists and is not a file"):
        guard.check_replaceable(tmp_path / "dir.safetensors", ("segmix_lora",))
    assert users.read_bytes() == before


def test_own_temp_files_only_are_removed(tmp_path):
    out = tmp_path / "x.safetensors"
    names = [".x.safetensors.123.tmp", ".x.safetensors.9.tmp", ".x.safetensors.other.tmp", ".xy.safetensors.1.tmp",
             "x.safetensors", ".x.safetensors.12.tmp.keep"]
    for n in names:
        (tmp_path / n).write_bytes(b"1")
    assert sorted(guard.remove_own_temp_files(out)) == [".x.safetensors.123.tmp", ".x.safetensors.9.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[2:])


def test_room_check_needs_a_real_write_and_enough_space(tmp_path):
    guard.check_room([(tmp_path / "a", 1 << 20, "the LoRA folder"), (tmp_path / "b" / "c", 1 << 20, "the job folder")])
    assert (tmp_path / "b" / "c").is_dir() and not list((tmp_path / "a").iterdir())     # the probe is gone
    import shutil
    free = shutil.disk_usage(tmp_path).free
    # two folders on one file system add up: each alone fits, together they do not
    half = (free - (32 << 20)) // 2 + (16 << 20)
    guard.check_room([(tmp_path / "a", half, "the LoRA folder")])
    with pytest.raises(ValueError, match="not enough free space for this run in the LoRA folder .* and the job folder"):
        guard.check_room([(tmp_path / "a", half, "the LoRA folder"), (tmp_path / "b", half, "the job folder")])
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match=f"output_name: cannot create the LoRA folder {blocker / 'sub'}"):
        guard.check_room([(blocker / "sub", 1, "the LoRA folder")])


# ====================================================================================== finished runs

def test_a_finished_run_is_found_only_for_the_same_inputs_and_file(tmp_path):
    job, out = tmp_path / "job", tmp_path / "out.safetensors"
    job.mkdir()
    (job / "data.safetensors").write_bytes(b"data")
    config = {"seed": 1, "steps": 2, "output": str(out)}
    key = guard.request_key(config, job, ("data.safetensors", "vae.safetensors"))
    assert guard.finished_run(job, key, out) is None                 # nothing recorded
    out.write_bytes(b"lora")
    guard.record_finished(job, key, out, {"steps": 2, "losses": [1.0, 0.5], "preview_paths": [], "extra": 1})
    done = guard.finished_run(job, key, out)
    assert done["losses"] == [1.0, 0.5] and done["steps"] == 2 and "extra" not in done
    # another seed, other data bytes, a replaced output file: train again
    assert guard.request_key({**config, "seed": 2}, job, ("data.safetensors",)) != key
    (job / "data.safetensors").write_bytes(b"dat2")
    assert guard.request_key(config, job, ("data.safetensors", "vae.safetensors")) != key
    (job / "data.safetensors").write_bytes(b"data")
    assert guard.request_key(config, job, ("data.safetensors", "vae.safetensors")) == key
    st = out.stat()
    out.write_bytes(b"LORA")
    os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))                # same size and time, other bytes: same identity
    assert guard.finished_run(job, key, out) is not None
    out.write_bytes(b"a longer file")
    assert guard.finished_run(job, key, out) is None
    guard.forget_finished(job)
    assert not (job / guard.DONE_FILE).exists()


# ====================================================================================== checkpoints and resume advice

def _toy_job(root, name, **kw):
    job = root / "jobs" / name
    job.mkdir(parents=True, exist_ok=True)
    config = {"kind": "toy", "output": str(root / "out" / f"{name}.safetensors"), "state_dir": str(root / "state" / name),
              "steps": 3, "seed": 3, "checkpoint_every": 1, "threads": 1, "learning_rate": 0.02, "batch": 4,
              "samples": 8}
    config.update(kw)
    (job / "job.json").write_text(json.dumps(config))
    return job, config


def test_nan_checkpoint_is_refused_naming_the_file(tmp_path):
    job, config = _toy_job(tmp_path, "nan")
    assert sidecar.train(job, handle_signals=False) == 0
    before = (tmp_path / "out" / "nan.safetensors").read_bytes()
    path = ck.checkpoint_paths(config["state_dir"])[0]
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    name = sorted(k for k in tensors if k.startswith("job."))[0]
    tensors[name][0] = float("nan")
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ck.CheckpointError, match=f"the checkpoint {path} \\(step 3\\) holds NaN or infinite trained "
                                                 f"weights \\({name[4:]}"):
        ck.load_checkpoint(config["state_dir"])
    job, _ = _toy_job(tmp_path, "nan", steps=5)
    events = []
    assert sidecar.train(job, emit=events.append, handle_signals=False) == 1
    assert events[-1]["event"] == "error" and str(path) in events[-1]["message"] and "NaN" in events[-1]["message"]
    assert (tmp_path / "out" / "nan.safetensors").read_bytes() == before           # the finished file stays


def test_changed_settings_are_named_as_node_inputs():
    old = {"seed": 1, "kv": "kv", "rank": 4, "data": "abc", "model_fingerprint": "f1", "validation_prompt": "x" * 80}
    new = {"seed": 2, "kv": "v", "rank": 4, "data": "abd", "model_fingerprint": "f2", "validation_prompt": "y" * 80}
    assert ck.changed_settings(old, new) == ["the training data (images, masks, captions)", "offsets \"kv\" -> \"v\"",
                                             "model", "seed 1 -> 2", "validation_prompt"]
    assert ck.changed_settings(old, dict(old)) == []


# ====================================================================================== training data

def test_nan_and_empty_training_data_name_the_input_and_the_item():
    img, m = torch.rand(3, 8, 8, 3), torch.ones(3, 8, 8)
    bad = img.clone()
    bad[1, 2, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="images: image 2 of 3 contains NaN or infinite values"):
        dataset_from_inputs(bad, m, "olis cat", "")
    mm = m.clone()
    mm[2, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="masks: mask 3 of 3 contains NaN"):
        dataset_from_inputs(img, mm, "olis cat", "")
    mm = m.clone()
    mm[0] = 0.0
    mm[2] = 0.4                                                     # nothing above 0.5: empty for Seg-Mix
    with pytest.raises(ValueError, match="masks: the mask of image 1, 3 of 3 \\('olis cat'\\) is empty"):
        dataset_from_inputs(img, mm, "olis cat", "")
    with pytest.raises(ValueError, match="images: image 1, 2, 3 of 3 contains NaN"):
        infusion_data_from_inputs(torch.full((3, 8, 8, 3), float("nan")), None, "cat", 16)
    mm = m.clone()
    mm[1, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="masks: mask 2 of 3 contains NaN"):
        infusion_data_from_inputs(img, mm, "cat", 16)
    mm[1] = 0.0
    with pytest.raises(ValueError, match="masks: the mask of image 2 of 3 is empty"):
        infusion_data_from_inputs(img, mm, "cat", 16)


# ====================================================================================== console lines

def test_progress_lines_for_the_console():
    assert progress_line({"event": "start", "total": 2010, "resumed_from": 100, "world_size": 2}) == \
        "2010 steps, resuming from step 100, 2 processes"
    step = {"event": "step", "step": 40, "total": 2010, "loss": 0.12345, "elapsed": 12.0, "eta": 600.0}
    assert progress_line(step, 20) == "step 40/2010, loss 0.1235, 12.0 s so far, about 10.0 min left"
    assert progress_line({**step, "step": 41}, 20) is None
    assert progress_line({**step, "step": 1}, 20) is not None and progress_line({**step, "step": 2010}, 20) is not None
    assert progress_line({"event": "checkpoint", "step": 100}) == "checkpoint at step 100"
    assert progress_line({"event": "error", "message": "boom"}) == "failed: boom"


# ====================================================================================== the model file

def _loader(name):
    def fn(*args, **kwargs):
        raise AssertionError("never called")
    fn.__name__, fn.__module__ = name, "comfy.sd"
    return fn


class _Patcher:
    """What model_file_record reads of a ComfyUI ModelPatcher (``comfy/model_patcher.py``)."""

    def __init__(self, init, **patches):
        self.cached_patcher_init = init
        self.patches, self.object_patches, self.weight_wrapper_patches, self.hook_patches = {}, {}, {}, {}
        for k, v in patches.items():
            setattr(self, k, v)


def test_model_file_record_only_for_an_unpatched_model_from_a_loader(tmp_path):
    from personalize_pack.training import job_folder as jf
    ckpt = tmp_path / "model.safetensors"
    save_file({"w": torch.arange(3 * 2 ** 19, dtype=torch.float32)}, str(ckpt))   # 6 MiB: both edges are read
    rec = jf.model_file_record(_Patcher((_loader("load_checkpoint_guess_config"), (str(ckpt), False), 0)))
    assert rec["path"] == str(ckpt) and rec["loader"] == "checkpoint" and rec["size"] == ckpt.stat().st_size
    assert rec["fingerprint"].startswith("file:")
    unet = jf.model_file_record(_Patcher((_loader("load_diffusion_model"), (str(ckpt), {}))))
    assert unet["loader"] == "diffusion_model" and unet["digest"] == rec["digest"]
    # patched in the graph, the CLIP/VAE part of a checkpoint, another loader, a missing file: copied instead
    for patcher in (_Patcher((_loader("load_checkpoint_guess_config"), (str(ckpt),), 0), patches={"k": [1]}),
                    _Patcher((_loader("load_checkpoint_guess_config"), (str(ckpt),), 0), object_patches={"m": 1}),
                    _Patcher((_loader("load_checkpoint_guess_config"), (str(ckpt),), 1)),
                    _Patcher((_loader("my_loader"), (str(ckpt),))),
                    _Patcher((_loader("load_diffusion_model"), (str(tmp_path / "gone.safetensors"),))),
                    _Patcher(None)):
        assert jf.model_file_record(patcher) is None
    jf.check_model_file(rec)
    with open(ckpt, "r+b") as fh:                       # a byte in the middle: the cheap digest does not see it
        fh.seek(3 << 20)
        fh.write(b"\x01")
    jf.check_model_file(rec)
    with open(ckpt, "r+b") as fh:                       # the end (a re-saved file's data) is seen
        fh.seek(-1, os.SEEK_END)
        fh.write(b"\x01")
    with pytest.raises(jf.ConfigError, match=f"the model file {ckpt} changed after the training node queued"):
        jf.check_model_file(rec)
    ckpt.unlink()
    with pytest.raises(jf.ConfigError, match=f"the model file {ckpt} of this run cannot be read"):
        jf.check_model_file(rec)


# ====================================================================================== file modes

def test_trained_files_get_the_ordinary_mode_not_0600(tmp_path):
    """safetensors' own writer creates its file 0o600; the final file of a run gets 0o666 less the
    umask, as ComfyUI's outputs (and any ordinary write) do, and a replaced file keeps its mode."""
    import stat

    from personalize_pack.files.atomic import current_umask, finish_atomic
    umask = os.umask(0o022)
    try:
        assert current_umask() == 0o022
        job, config = _toy_job(tmp_path, "mode", steps=1)
        assert sidecar.train(job, handle_signals=False) == 0
        out = tmp_path / "out" / "mode.safetensors"
        assert stat.S_IMODE(out.stat().st_mode) == 0o644
        tmp = tmp_path / "out" / ".x.tmp"
        save_file({"a": torch.zeros(1)}, str(tmp))
        os.chmod(tmp, 0o600)
        os.chmod(out, 0o640)
        finish_atomic(tmp, out)                                     # a replaced file keeps its mode
        assert stat.S_IMODE(out.stat().st_mode) == 0o640
    finally:
        os.umask(umask)
