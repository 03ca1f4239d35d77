"""The training sidecar (child loop), its runner (parent side) and resume, with the ``toy`` job kind
on the CPU: tiny models, one thread per process, so the whole file runs in well under a minute."""
from __future__ import annotations

import errno
import io
import json
import os
import queue
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from personalize_pack.files import atomic
from personalize_pack.training import checkpoint as ck
from personalize_pack.training import jobs, runner, sidecar
from personalize_pack.training.runner import TrainingCancelled, TrainingError, run_job

N_STEPS = 20
EVERY = 5


def make_job(root: Path, name: str, **overrides) -> Path:
    """A toy job folder ``root/jobs/<name>``: output ``root/out/<name>.safetensors``, checkpoints in
    ``root/state/<name>``."""
    job_dir = root / "jobs" / name
    job_dir.mkdir(parents=True, exist_ok=True)
    config = {"kind": "toy", "output": str(root / "out" / f"{name}.safetensors"), "state_dir": str(root / "state" / name),
              "steps": N_STEPS, "seed": 3, "checkpoint_every": EVERY, "validate_every": 0, "device": "cpu",
              "comfyui_path": None, "threads": 1, "learning_rate": 0.02, "batch": 8, "samples": 32}
    config.update(overrides)
    config = {k: v for k, v in config.items() if v is not ...}
    (job_dir / "job.json").write_text(json.dumps(config))
    return job_dir


def config_of(job_dir: Path) -> dict:
    return json.loads((job_dir / "job.json").read_text())


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def no_temp_files(folder: Path) -> bool:
    return not folder.exists() or not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """Two uninterrupted runs of N_STEPS steps through the runner at the same time (different output
    names, seeds 3 and 4): the seed-3 one is the reference (events, final weights) for the tests
    below, the pair shows that parallel runs do not collide."""
    root = tmp_path_factory.mktemp("training_ref")
    jobs_ = {"ref": make_job(root, "ref", validate_every=10), "other": make_job(root, "other", seed=4)}
    events = {name: [] for name in jobs_}
    results, errors = {}, []

    def go(name):
        try:
            results[name] = run_job(jobs_[name], on_event=events[name].append)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(name,)) for name in jobs_]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return {"root": root, "job_dir": jobs_["ref"], "events": events["ref"], "result": results["ref"],
            "weights": load_file(config_of(jobs_["ref"])["output"]), "other": results["other"],
            "other_job_dir": jobs_["other"]}


# =========================================================================== a plain run

def test_toy_overfits_and_events_arrive_in_order(reference_run):
    events, result = reference_run["events"], reference_run["result"]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and "error" not in kinds
    assert events[0]["total"] == N_STEPS and events[0]["resumed_from"] == 0
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, N_STEPS + 1))
    assert all(e["total"] == N_STEPS and e["eta"] >= 0 for e in steps)
    elapsed = [e["elapsed"] for e in steps]
    assert elapsed == sorted(elapsed)
    ckpts = [e for e in events if e["event"] == "checkpoint"]
    assert [e["step"] for e in ckpts] == list(range(EVERY, N_STEPS + 1, EVERY))
    for c in ckpts:                                             # written in the background: after its step
        assert events.index(c) > events.index(steps[c["step"] - 1])
        assert Path(c["path"]).name == "checkpoint.safetensors"
    previews = [e for e in events if e["event"] == "preview"]
    assert [e["step"] for e in previews] == [10, 20] and all(Path(e["path"]).is_file() for e in previews)
    losses = [e["loss"] for e in steps]
    assert events[-1]["losses"] == losses == result["losses"] and result["steps"] == N_STEPS
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5     # it learns
    assert len(result["step_times"]) == N_STEPS and result["median_step_s"] > 0
    assert result["checkpoints"] == list(range(EVERY, N_STEPS + 1, EVERY))
    out = Path(result["output"])
    assert out == Path(config_of(reference_run["job_dir"])["output"]) and out.is_file()
    assert set(reference_run["weights"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert no_temp_files(out.parent)
    assert pid_gone(result["pid"])


def test_toy_overfits_longer(tmp_path):
    """In-process (the loop without the runner): 150 steps on a fixed small batch drive the loss
    down by more than 10x."""
    job_dir = make_job(tmp_path, "long", steps=150, checkpoint_every=0, samples=8, batch=8, learning_rate=0.03)
    events = []
    assert sidecar.train(job_dir, emit=events.append, handle_signals=False) == 0
    losses = events[-1]["losses"]
    assert len(losses) == 150 and losses[-1] < 0.1 * losses[0]
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [150]   # the end is always saved


# =========================================================================== kill, resume

def test_killed_run_resumes_to_the_same_weights(reference_run, tmp_path):
    job_dir = make_job(tmp_path, "killed", sleep=0.03)
    kill_at = 2 * EVERY
    seen = []

    def on_event(evt):
        seen.append(evt)
        if evt["event"] == "checkpoint" and evt["step"] == kill_at:
            os.kill(seen[0]["pid"], signal.SIGKILL)

    with pytest.raises(TrainingError) as info:
        run_job(job_dir, on_event=on_event)
    assert "signal 9" in str(info.value)
    assert pid_gone(seen[0]["pid"])
    out = Path(config_of(job_dir)["output"])
    assert not out.exists() and no_temp_files(out.parent)
    # the last complete checkpoint: the one of the event, or (a slow disk: the event of step 10 is sent
    # when its file is complete, by then step 15's may be under way) the next one
    k = ck.load_checkpoint(config_of(job_dir)["state_dir"]).step
    assert k in (kill_at, kill_at + EVERY)

    events = []                                                 # the same job again (in-process): resumes
    assert sidecar.train(job_dir, emit=events.append, handle_signals=False) == 0
    assert events[0]["resumed_from"] == k
    assert [e["step"] for e in events if e["event"] == "step"] == list(range(k + 1, N_STEPS + 1))
    assert events[-1]["losses"] == reference_run["result"]["losses"]  # bit for bit
    weights = load_file(out)
    for k, v in reference_run["weights"].items():
        assert torch.equal(weights[k], v), k


def test_resume_with_more_steps_and_config_checks(reference_run, tmp_path):
    """In-process: the finished reference run's state continues when steps grow; other settings
    are refused; resume: false starts over."""
    import shutil
    ref_cfg = config_of(reference_run["job_dir"])
    state = tmp_path / "state" / "grow"
    shutil.copytree(ref_cfg["state_dir"], state, ignore=shutil.ignore_patterns(".lock"))
    job_dir = make_job(tmp_path, "grow", steps=N_STEPS + 5)
    events = []
    assert sidecar.train(job_dir, emit=events.append, handle_signals=False) == 0
    assert events[0]["resumed_from"] == N_STEPS
    assert events[-1]["losses"][:N_STEPS] == reference_run["result"]["losses"]
    assert len(events[-1]["losses"]) == N_STEPS + 5

    bad = make_job(tmp_path, "grow", steps=N_STEPS + 5, learning_rate=0.5)
    events = []
    assert sidecar.train(bad, emit=events.append, handle_signals=False) == 1
    # the message names what changed and advice the node's inputs can follow (no 'resume' input exists)
    msg = events[-1]["message"]
    assert events[-1]["event"] == "error" and "changed: learning_rate 0.02 -> 0.5" in msg
    assert "give another output_name" in msg and str(state) in msg and "set resume" not in msg

    fewer = make_job(tmp_path, "grow", steps=3)
    events = []
    assert sidecar.train(fewer, emit=events.append, handle_signals=False) == 1
    assert "beyond steps=3" in events[-1]["message"] and "set steps to at least 25" in events[-1]["message"]

    fresh = make_job(tmp_path, "grow", steps=3, learning_rate=0.5, resume=False)
    events = []
    assert sidecar.train(fresh, emit=events.append, handle_signals=False) == 0
    assert events[0]["resumed_from"] == 0 and ck.load_checkpoint(state).step == 3


# =========================================================================== cancel, errors

def test_cancel_stops_the_child_and_writes_no_output(tmp_path):
    job_dir = make_job(tmp_path, "cancel", steps=500, sleep=0.02)
    cfg = config_of(job_dir)
    seen = []
    also = {}

    def on_event(evt):
        seen.append(evt)
        if evt["event"] == "step" and evt["step"] == 2 and not also:
            # the same output name while this run holds it: refused, nothing touched
            twin = []
            also["rc"] = sidecar.train(job_dir, emit=twin.append, handle_signals=False)
            also["events"] = twin

    asked = []

    def should_cancel():
        if sum(e["event"] == "step" for e in seen) >= 7:
            asked.append(time.perf_counter())
            return True
        return False

    with pytest.raises(TrainingCancelled):
        run_job(job_dir, on_event=on_event, should_cancel=should_cancel)
    assert time.perf_counter() - asked[0] < 5.0                 # SIGTERM honoured, no 10 s SIGKILL wait
    assert pid_gone(seen[0]["pid"])
    steps = [e["step"] for e in seen if e["event"] == "step"]
    assert 7 <= steps[-1] < 500 and seen[-1]["event"] in ("step", "checkpoint")
    out = Path(cfg["output"])
    assert not out.exists() and no_temp_files(out.parent)
    c = ck.load_checkpoint(cfg["state_dir"])
    assert c.step == (steps[-1] // EVERY) * EVERY
    assert also["rc"] == 1 and "another training run" in also["events"][-1]["message"]


def test_callback_exception_kills_the_child(tmp_path):
    """An exception in on_event (the node's own code) propagates and takes the child with it."""
    job_dir = make_job(tmp_path, "boom", steps=500, sleep=0.02)
    seen = []

    class Boom(Exception):
        pass

    def on_event(evt):
        seen.append(evt)
        if evt["event"] == "step" and evt["step"] == 3:
            raise Boom

    with pytest.raises(Boom):
        run_job(job_dir, on_event=on_event)
    assert pid_gone(seen[0]["pid"])
    assert not Path(config_of(job_dir)["output"]).exists()


def test_crashing_child_raises_with_stderr_tail(tmp_path):
    """The child fails (in setup, after printing a stray line to stdout): TrainingError with the
    error event's message and the stderr tail (traceback, and the stray line: main() moved it off
    the protocol stream)."""
    job_dir = make_job(tmp_path, "crash", fail_in_setup=True)
    events = []
    with pytest.raises(TrainingError) as info:
        run_job(job_dir, on_event=events.append)
    err = info.value
    assert err.reason == "RuntimeError: toy job: failing in setup as asked (fail_in_setup)" and err.returncode == 1
    assert events == [{"event": "error", "message": err.reason}]
    assert any("Traceback" in line for line in err.stderr_tail) and "stderr" in str(err)
    assert "toy job: a stray line on stdout before failing" in err.stderr_tail
    assert not Path(config_of(job_dir)["output"]).exists()


def test_failure_mid_run_is_an_error_event(tmp_path):
    job_dir = make_job(tmp_path, "midway", fail_at_step=3)
    events = []
    assert sidecar.train(job_dir, emit=events.append, handle_signals=False) == 1
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2, 3]
    assert events[-1] == {"event": "error", "message": "RuntimeError: toy job: failing at step 3 as asked (fail_at_step)"}
    assert not Path(config_of(job_dir)["output"]).exists()


def test_unknown_kind_is_an_error_event(tmp_path):
    job_dir = make_job(tmp_path, "unknown", kind="no_such_kind")
    events = []
    assert sidecar.train(job_dir, emit=events.append, handle_signals=False) == 1
    assert len(events) == 1 and events[0]["event"] == "error"
    msg = events[0]["message"]
    assert msg.startswith("unknown job kind 'no_such_kind' in job.json (known kinds: ") and "toy" in msg


@pytest.mark.parametrize("drop", [("steps", "seed"), ("kind",), ("output", "state_dir")])
def test_job_json_missing_keys(tmp_path, drop):
    job_dir = make_job(tmp_path, "missing", **{k: ... for k in drop})
    events = []
    assert sidecar.train(job_dir, emit=events.append, handle_signals=False) == 1
    assert events[-1]["event"] == "error"
    assert events[-1]["message"] == f"job.json is missing required keys: {', '.join(drop)}"


@pytest.mark.parametrize("key,value", [("steps", 0), ("steps", "10"), ("seed", -1), ("checkpoint_every", 1.5),
                                       ("device", "tpu")])
def test_job_json_bad_values(tmp_path, key, value):
    job_dir = make_job(tmp_path, "bad", **{key: value})
    events = []
    assert sidecar.train(job_dir, emit=events.append, handle_signals=False) == 1
    assert events[-1]["message"].startswith(f"job.json: {key} must be")


def test_no_job_json(tmp_path):
    events = []
    assert sidecar.train(tmp_path, emit=events.append, handle_signals=False) == 1
    assert events[-1]["message"].startswith("no job.json in")


def test_disk_full_at_second_checkpoint(tmp_path, monkeypatch):
    """In-process (so the writer can be replaced): ENOSPC while writing the second checkpoint →
    a clear error event, the first checkpoint intact, no temporary files, no output."""
    job_dir = make_job(tmp_path, "full")
    cfg = config_of(job_dir)
    real, calls = atomic._write_file, []

    def writer(fh, chunks):
        calls.append(len(chunks))
        if len(calls) == 3:                                     # checkpoint 1: tensors, json; 2: tensors
            fh.write(chunks[0])
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fh, chunks)

    monkeypatch.setattr(atomic, "_write_file", writer)
    events = []
    assert sidecar.train(job_dir, emit=events.append, handle_signals=False) == 1
    assert events[-1]["event"] == "error"
    msg = events[-1]["message"]
    assert "no space left" in msg.lower() and "checkpoint.safetensors" in msg and "intact" in msg
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [EVERY]
    c = ck.load_checkpoint(cfg["state_dir"])
    assert c.step == EVERY and len(c.losses) == EVERY
    assert no_temp_files(Path(cfg["state_dir"])) and not Path(cfg["output"]).exists()


# =========================================================================== parallel runs, torchrun

def test_two_runs_in_parallel_do_not_collide(reference_run):
    ref, other = reference_run["result"], reference_run["other"]
    assert ref["output"] != other["output"] and ref["pid"] != other["pid"]
    assert ref["losses"] != other["losses"] and len(other["losses"]) == N_STEPS
    right = load_file(other["output"])
    assert not torch.equal(reference_run["weights"]["0.weight"], right["0.weight"])
    for job_dir in (reference_run["job_dir"], reference_run["other_job_dir"]):
        cfg = config_of(job_dir)
        assert ck.load_checkpoint(cfg["state_dir"]).step == N_STEPS
        assert no_temp_files(Path(cfg["state_dir"])) and no_temp_files(Path(cfg["output"]).parent)
    # the seed-3 run alone (in-process, without previews, which draw random numbers) gives the same
    # weights: neither the parallel run nor the previews disturbed it
    alone = make_job(Path(reference_run["root"]), "alone")
    assert sidecar.train(alone, emit=lambda e: None, handle_signals=False) == 0
    weights = load_file(config_of(alone)["output"])
    for k, v in reference_run["weights"].items():
        assert torch.equal(weights[k], v), k


def test_torchrun_two_ranks_match_one_process(reference_run, tmp_path):
    """Two CPU ranks (gloo), each half of the batch of 8, against the single-process run with the
    whole batch: the same weights up to float rounding, identical on both ranks."""
    job_dir = make_job(tmp_path, "ddp")
    events = []
    result = run_job(job_dir, on_event=events.append, gpus=2, launcher="torchrun")
    assert result["world_size"] == 2 and result["ranks_identical"] is True
    assert sum(e["event"] == "start" for e in events) == 1        # only rank 0 speaks
    assert [e["step"] for e in events if e["event"] == "step"] == list(range(1, N_STEPS + 1))
    weights = load_file(result["output"])
    for k, v in reference_run["weights"].items():
        torch.testing.assert_close(weights[k], v, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(reference_run["result"]["losses"]),
                               rtol=1e-4, atol=1e-6)


# =========================================================================== pieces

def test_reader_ignores_non_events():
    q = queue.Queue()
    stream = io.BytesIO(b'hello\n{"event": "step", "step": 1}\n{"no": 1}\n{broken\n[1]\n\xff\xfe\n'
                        b'{"event": "done", "output": "x"}\n')
    runner._read_stdout(stream, q)
    got = []
    while (item := q.get_nowait()) is not runner._EOF:
        got.append(item[1])
    assert got == [{"event": "step", "step": 1}, {"event": "done", "output": "x"}]


def test_child_command():
    one = runner.child_command("/tmp/j", 1, python="py")
    assert one[0] == "py" and one[1].endswith("sidecar.py") and Path(one[2]).name == "j"
    two = runner.child_command("/tmp/j", 2, python="py", launcher="torchrun")
    assert two[:5] == ["py", "-m", "torch.distributed.run", "--nproc_per_node", "2"] and two[-2].endswith("sidecar.py")
    acc = runner.child_command("/tmp/j", 4, python="py", launcher="accelerate")
    assert acc[:5] == ["py", "-m", "accelerate.commands.launch", "--num_processes", "4"]
    with pytest.raises(ValueError):
        runner.child_command("/tmp/j", 2, launcher="mpi")


class _LinearJob(jobs.Job):
    """The Job base class's defaults (state_tensors, load_state_tensors, make_optimizer)."""

    def setup(self, ctx):
        super().setup(ctx)
        g = torch.Generator().manual_seed(ctx.seed)
        self.w = torch.randn(3, generator=g).requires_grad_()
        self.target = torch.tensor([1.0, -2.0, 0.5])

    def parameters(self):
        return [self.w]

    def loss(self, step, micro=0):
        noise = torch.randn(3) * 0.01
        return ((self.w - self.target - noise) ** 2).mean()

    def save_final(self, path):
        atomic.atomic_save_safetensors(path, {"w": self.w})


class _SplitRegressionJob(jobs.Job):
    """A least-squares fit of 8 fixed rows, shared out over the step's micro-batches: with
    ``gradient_accumulation`` a, micro-batch ``m`` sees rows ``m*8/a .. (m+1)*8/a`` of the step's 8."""

    def setup(self, ctx):
        super().setup(ctx)
        g = torch.Generator().manual_seed(11)
        self.x, self.y = torch.randn(3, 8, 4, generator=g), torch.randn(3, 8, generator=g)
        self.w = torch.zeros(4, requires_grad=True)
        self.accum = int(ctx.config["gradient_accumulation"])

    def parameters(self):
        return [self.w]

    def loss(self, step, micro=0):
        n = 8 // self.accum
        rows = slice(micro * n, (micro + 1) * n)
        x, y = self.x[step % 3, rows], self.y[step % 3, rows]
        return ((x @ self.w - y) ** 2).mean()

    def save_final(self, path):
        atomic.atomic_save_safetensors(path, {"w": self.w})


@pytest.mark.parametrize("accum", [2, 4])
def test_gradient_accumulation_steps_as_the_whole_batch_does(tmp_path, monkeypatch, accum):
    """a micro-batches of 8/a rows take the optimizer step one batch of 8 takes: the gradient of the
    mean loss (AdamW, clipping at 0.5 on), the same reported losses, each micro-batch drawn once."""
    monkeypatch.setitem(sidecar.JOB_KINDS, "split", _SplitRegressionJob)
    calls = {}

    def run(name, a):
        job_dir = make_job(tmp_path, name, kind="split", steps=6, learning_rate=0.05, max_grad_norm=0.5,
                           gradient_accumulation=a)
        events = []
        real_loss = _SplitRegressionJob.loss
        monkeypatch.setattr(_SplitRegressionJob, "loss",
                            lambda self, step, micro=0: calls.setdefault(name, []).append((step, micro))
                            or real_loss(self, step, micro))
        assert sidecar.train(job_dir, emit=events.append, handle_signals=False) == 0
        monkeypatch.setattr(_SplitRegressionJob, "loss", real_loss)
        return load_file(config_of(job_dir)["output"])["w"], events[-1]["losses"]

    w1, l1 = run("whole", 1)
    wa, la = run("accumulated", accum)
    assert torch.allclose(w1, wa, atol=1e-6) and float(w1.abs().max()) > 0.05
    assert la == pytest.approx(l1, rel=1e-5)
    assert calls["accumulated"] == [(i, m) for i in range(6) for m in range(accum)]
    assert calls["whole"] == [(i, 0) for i in range(6)]


def test_gradient_accumulation_must_be_a_positive_integer(tmp_path):
    for bad in (0, -1, 1.5, True):
        job_dir = make_job(tmp_path, f"bad{bad}", gradient_accumulation=bad)
        events = []
        assert sidecar.train(job_dir, emit=events.append, handle_signals=False) == 1
        assert "gradient_accumulation must be an integer >= 1" in events[-1]["message"], events[-1]


def test_registry_strings_and_base_class_defaults(tmp_path, monkeypatch):
    monkeypatch.setitem(sidecar.JOB_KINDS, "linear", _LinearJob)
    monkeypatch.setitem(sidecar.JOB_KINDS, "toy_by_name", ".jobs:ToyJob")
    assert sidecar.resolve_kind("toy_by_name") is jobs.ToyJob
    whole = make_job(tmp_path, "whole", kind="linear", steps=12, checkpoint_every=4, learning_rate=0.1)
    ev_whole = []
    assert sidecar.train(whole, emit=ev_whole.append, handle_signals=False) == 0
    part = make_job(tmp_path, "part", kind="linear", steps=8, checkpoint_every=4, learning_rate=0.1)
    assert sidecar.train(part, emit=lambda e: None, handle_signals=False) == 0
    part = make_job(tmp_path, "part", kind="linear", steps=12, checkpoint_every=4, learning_rate=0.1)
    ev_part = []
    assert sidecar.train(part, emit=ev_part.append, handle_signals=False) == 0
    assert ev_part[0]["resumed_from"] == 8 and ev_part[-1]["losses"] == ev_whole[-1]["losses"]
    a = load_file(config_of(whole)["output"])["w"]
    b = load_file(config_of(part)["output"])["w"]
    assert torch.equal(a, b)
