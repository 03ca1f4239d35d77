"""training/checkpoint.py: atomic files, optimizer / RNG state round trips, checkpoints, output names
(in-process, CPU, no child processes)."""
from __future__ import annotations

import errno
import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from personalize_pack.training import checkpoint as ck


def _no_temp_files(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")] == []


class _FullDisk:
    """Replaces checkpoint._write_file: the ``fail_on``-th call (1-based) raises ENOSPC after
    writing the first chunk (as a real full disk would, part way)."""

    def __init__(self, fail_on):
        self.fail_on, self.calls = fail_on, 0
        self.real = ck._write_file

    def __call__(self, fh, chunks):
        self.calls += 1
        if self.calls == self.fail_on:
            fh.write(chunks[0])
            raise OSError(errno.ENOSPC, "No space left on device")
        self.real(fh, chunks)


# =========================================================================== atomic files

def test_atomic_writes_round_trip(tmp_path):
    p = ck.atomic_write_text(tmp_path / "sub" / "a.txt", "hello")
    assert p.read_text() == "hello"
    ck.atomic_write_text(p, "again")
    assert p.read_text() == "again"
    t = {"w": torch.randn(3, 4), "b": torch.arange(5)}
    q = ck.atomic_save_safetensors(tmp_path / "t.safetensors", {"w": t["w"].t(), "b": t["b"]}, {"k": "v"})
    back = load_file(q)
    torch.testing.assert_close(back["w"], t["w"].t().contiguous())
    assert torch.equal(back["b"], t["b"])
    assert _no_temp_files(tmp_path) and _no_temp_files(tmp_path / "sub")


def test_streamed_safetensors_match_the_library(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save as st_save
    t = {"f32": torch.randn(3, 5).t(), "bf16": torch.randn(4, dtype=torch.bfloat16), "f16": torch.randn(2, 2).half(),
         "i64": torch.arange(7), "u8": torch.randint(0, 255, (9,), dtype=torch.uint8), "bool": torch.rand(5) > 0.5,
         "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3), "f64": torch.randn(2, dtype=torch.float64)}
    path = ck.atomic_save_safetensors(tmp_path / "s.safetensors", t, {"a": "1", "b": "x y"})
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"a": "1", "b": "x y"}
        for k, v in t.items():
            got = f.get_tensor(k)
            assert got.dtype == v.dtype and got.shape == v.shape and torch.equal(got, v), k
    ours = b"".join(bytes(c) for c in ck.safetensors_chunks({"w": t["f32"].contiguous()}))
    assert load_file_bytes(ours)["w"].equal(load_file_bytes(st_save({"w": t["f32"].contiguous()}))["w"])


def load_file_bytes(data):
    from safetensors.torch import load
    return load(data)


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


def test_disk_full_keeps_previous_file(tmp_path, monkeypatch):
    p = ck.atomic_write_text(tmp_path / "a.txt", "old")
    monkeypatch.setattr(ck, "_write_file", _FullDisk(1))
    with pytest.raises(OSError) as info:
        ck.atomic_write_text(p, "new contents")
    assert info.value.errno == errno.ENOSPC
    assert "no space left" in str(info.value).lower() and "intact" in str(info.value)
    assert p.read_text() == "old"
    assert _no_temp_files(tmp_path)


def test_finish_atomic_moves_file(tmp_path):
    tmp = tmp_path / ".x.tmp"
    tmp.write_bytes(b"abc")
    out = ck.finish_atomic(tmp, tmp_path / "x.bin")
    assert out.read_bytes() == b"abc" and not tmp.exists()


# =========================================================================== output names

@pytest.mark.parametrize("name", ["a/b", "a\\b", "..", "../x", "x..y", "", "   ", "/etc/passwd", "C:evil", ".hidden",
                                  "a\0b", "tab\there", "sub/../../x"])
def test_output_name_rejected(tmp_path, name):
    with pytest.raises(ValueError) as info:
        ck.output_path(tmp_path, name, ".safetensors")
    assert "output name" in str(info.value)


def test_output_name_accepted(tmp_path):
    assert ck.output_path(tmp_path, "my_lora", ".safetensors") == tmp_path / "my_lora.safetensors"
    assert ck.output_path(tmp_path, "my lora-v2.safetensors", ".safetensors") == tmp_path / "my lora-v2.safetensors"
    assert ck.output_path(tmp_path, " toy ", "safetensors") == tmp_path / "toy.safetensors"
    with pytest.raises(ValueError):
        ck.output_path(tmp_path, None, ".safetensors")


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
    ck.atomic_save_safetensors(tmp_path / ck.CHECKPOINT_NAME, {"x": torch.zeros(1)})
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
    monkeypatch.setattr(ck, "_write_file", _FullDisk(1))        # the tensors' write of the second one
    with pytest.raises(OSError) as info:
        ck.save_checkpoint(tmp_path, 10, "h", model.state_dict(), opt, [0.1] * 10)
    assert info.value.errno == errno.ENOSPC and "no space left" in str(info.value).lower()
    c = ck.load_checkpoint(tmp_path)
    assert c.step == 5 and json.loads((tmp_path / ck.INDEX_NAME).read_text())["step"] == 5
    for k, v in first.items():
        assert torch.equal(c.job_tensors[k], v)
    assert _no_temp_files(tmp_path)
