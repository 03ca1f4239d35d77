"""training/checkpoint.py: snapshots, optimizer / RNG state round trips, checkpoints (in-process, CPU, no
child processes; the atomic writer itself: test_files_atomic.py)."""
from __future__ import annotations

import errno
import json
import random

import numpy as np
import pytest
import torch

from personalize_pack.files import atomic
from personalize_pack.training import checkpoint as ck


def _no_temp_files(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")] == []


class _FullDisk:
    """Replaces files.atomic._write_file: the ``fail_on``-th call (1-based) raises ENOSPC after
    writing the first chunk (as a real full disk would, part way)."""

    def __init__(self, fail_on):
        self.fail_on, self.calls = fail_on, 0
        self.real = atomic._write_file

    def __call__(self, fh, chunks):
        self.calls += 1
        if self.calls == self.fail_on:
            fh.write(chunks[0])
            raise OSError(errno.ENOSPC, "No space left on device")
        self.real(fh, chunks)


# =========================================================================== snapshots

def test_snapshot_is_a_copy():
    src = {"a": torch.ones(3), "b": torch.arange(6).reshape(2, 3).t()}
    snap, event = ck.snapshot_tensors(src, pinned={})
    assert event is None
    src["a"].add_(1)
    assert torch.equal(snap["a"], torch.ones(3)) and snap["b"].is_contiguous() and torch.equal(snap["b"], src["b"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_snapshot_of_cuda_tensors_is_pinned_and_waits():
    src = {"a": torch.randn(1000, 1000, device="cuda")}
    expected = src["a"].cpu()
    pinned = {}
    snap, event = ck.snapshot_tensors(src, pinned)
    src["a"].mul_(0)
    event.synchronize()
    assert snap["a"].is_pinned() and torch.equal(snap["a"], expected)
    snap2, _ = ck.snapshot_tensors(src, pinned)
    assert snap2["a"].data_ptr() == snap["a"].data_ptr()           # the buffer is reused


# =========================================================================== config hash

def test_config_hash():
    base = {"kind": "toy", "seed": 1, "learning_rate": 0.01, "steps": 10, "output": "/a", "state_dir": "/s"}
    h = ck.config_hash(base)
    same = dict(reversed(list(base.items())))
    same.update(steps=200, output="/b", state_dir="/t", checkpoint_every=7, device="cuda", threads=3)
    assert ck.config_hash(same) == h
    assert ck.config_hash({**base, "seed": 2}) != h
    assert ck.config_hash({**base, "learning_rate": 0.02}) != h
    assert ck.config_hash(base, extra="data-digest") != h
    assert ck.config_hash({**base, "x": (1, 2)}) == ck.config_hash({**base, "x": [1, 2]})


# =========================================================================== optimizer and RNG state

def _model_and_opt(seed=0):
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95))


def _train(model, opt, n, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        opt.zero_grad()
        model(torch.randn(5, 4, generator=g)).pow(2).mean().backward()
        opt.step()


def test_optimizer_state_round_trip():
    m1, o1 = _model_and_opt()
    _train(m1, o1, 3, seed=1)
    tensors, index = ck.optimizer_to_tensors(o1.state_dict())
    index = json.loads(json.dumps(index))                       # it must survive JSON
    tensors = {k: v.clone() for k, v in tensors.items()}        # as from a file: no shared storage
    m2, o2 = _model_and_opt()
    m2.load_state_dict(m1.state_dict())
    o2.load_state_dict(ck.optimizer_from_tensors(tensors, index))
    assert o2.param_groups[0]["betas"] == (0.8, 0.95)
    _train(m1, o1, 4, seed=2)
    _train(m2, o2, 4, seed=2)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_rng_state_round_trip():
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    tensors, extras = ck.rng_state()
    extras = json.loads(json.dumps(extras))
    first = (torch.rand(3), random.random(), np.random.rand(2), random.gauss(0, 1))
    ck.set_rng_state(tensors, extras)
    second = (torch.rand(3), random.random(), np.random.rand(2), random.gauss(0, 1))
    assert torch.equal(first[0], second[0]) and first[1] == second[1] and first[3] == second[3]
    assert np.array_equal(first[2], second[2])


# =========================================================================== checkpoints

def test_checkpoint_round_trip(tmp_path):
    model, opt = _model_and_opt()
    _train(model, opt, 2, seed=3)
    torch.manual_seed(11)
    path = ck.save_checkpoint(tmp_path, 2, "abc", model.state_dict(), opt, [0.5, 0.25], info={"total": 9})
    after_save = torch.rand(2)
    info = json.loads((tmp_path / ck.INDEX_NAME).read_text())
    assert info["step"] == 2 and info["config_hash"] == "abc" and "job.0.weight" in info["tensors"]
    c = ck.load_checkpoint(tmp_path)
    assert c.path == path and c.step == 2 and c.config_hash == "abc" and c.losses == [0.5, 0.25]
    assert c.info == {"total": 9}
    for k, v in model.state_dict().items():
        assert torch.equal(c.job_tensors[k], v)
    m2, o2 = _model_and_opt(seed=1)
    m2.load_state_dict(c.job_tensors)
    o2.load_state_dict(c.optimizer_state)
    c.restore_rng()
    assert torch.equal(torch.rand(2), after_save)
    _train(model, opt, 2, seed=4)
    _train(m2, o2, 2, seed=4)
    for a, b in zip(model.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    assert _no_temp_files(tmp_path)


def test_no_checkpoint_and_damaged_checkpoint(tmp_path):
    assert ck.load_checkpoint(tmp_path) is None
    (tmp_path / ck.CHECKPOINT_NAME).write_bytes(b"not a safetensors file")
    with pytest.raises(ck.CheckpointError, match="cannot read the checkpoint"):
        ck.load_checkpoint(tmp_path)
    atomic.atomic_save_safetensors(tmp_path / ck.CHECKPOINT_NAME, {"x": torch.zeros(1)})
    with pytest.raises(ck.CheckpointError, match="not a training checkpoint"):
        ck.load_checkpoint(tmp_path)
    ck.remove_checkpoint(tmp_path)
    assert ck.load_checkpoint(tmp_path) is None


def test_safetensors_metadata_wins_over_stale_json(tmp_path):
    """A crash between the two writes: new tensors, old JSON. The loader trusts the tensors' file."""
    model, opt = _model_and_opt()
    ck.save_checkpoint(tmp_path, 5, "h", model.state_dict(), opt, [1.0] * 5)
    stale = (tmp_path / ck.INDEX_NAME).read_text()
    _train(model, opt, 1, seed=0)
    ck.save_checkpoint(tmp_path, 10, "h", model.state_dict(), opt, [1.0] * 10)
    (tmp_path / ck.INDEX_NAME).write_text(stale)
    c = ck.load_checkpoint(tmp_path)
    assert c.step == 10 and len(c.losses) == 10
    assert torch.equal(c.job_tensors["0.weight"], model.state_dict()["0.weight"])


def test_disk_full_at_second_checkpoint(tmp_path, monkeypatch):
    model, opt = _model_and_opt()
    ck.save_checkpoint(tmp_path, 5, "h", model.state_dict(), opt, [0.1] * 5)
    first = {k: v.clone() for k, v in model.state_dict().items()}
    _train(model, opt, 2, seed=0)
    monkeypatch.setattr(atomic, "_write_file", _FullDisk(1))        # the tensors' write of the second one
    with pytest.raises(OSError) as info:
        ck.save_checkpoint(tmp_path, 10, "h", model.state_dict(), opt, [0.1] * 10)
    assert info.value.errno == errno.ENOSPC and "no space left" in str(info.value).lower()
    c = ck.load_checkpoint(tmp_path)
    assert c.step == 5 and json.loads((tmp_path / ck.INDEX_NAME).read_text())["step"] == 5
    for k, v in first.items():
        assert torch.equal(c.job_tensors[k], v)
    assert _no_temp_files(tmp_path)
