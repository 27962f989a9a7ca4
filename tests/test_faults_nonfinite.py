"""Non-finite loss/gradient policy (faults.nonfinite): a NaN batch fed to ONE rank
(faults.inject_nan_at_step / inject_nan_rank) is noticed by every rank, which then all skip
the update (counted) or all abort with the step number -- under a real `horovodrun -np 2`."""
import json
import sys
import time

import numpy as np
import pytest

from conftest import WORKERS, horovodrun, run_job
from hvdscale.comm import Comm
from hvdscale.engine.faults import NonFiniteGuard, Watchdog, poison_batch
from hvdscale.errors import NonFiniteLossError

WORKER = WORKERS / "fault_train.py"
# 1024 examples / (2 x 32) = 16 steps per epoch; 8 steps in all
SMALL = ["--set", "data.train_limit=1024", "--set", "data.test_limit=200",
         "--set", "batch.per_worker=32", "--set", "batch.reference=64",
         "--set", "train.max_steps=8", "--set", "lr.warmup_steps=2",
         "--set", "log.progress=false", "--set", "log.tensorboard=false",
         "--set", "framework=torch"]


def params(path):
    with np.load(path) as npz:
        return {k: npz[k] for k in npz.files}


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------- one process, no Horovod
def test_guard_policies_on_one_process():
    comm = Comm("torch")
    skip = NonFiniteGuard("skip", comm, echo=lambda *a: None)
    assert skip.check(3, 0.5) and skip.check(3, 0.5, grads_finite=True)
    assert not skip.check(4, float("nan")) and not skip.check(5, 1.0, grads_finite=False)
    assert not skip.check(6, float("inf"))
    assert skip.skipped == 3
    abort = NonFiniteGuard("abort", comm)
    with pytest.raises(NonFiniteLossError, match="at step 7 "):
        abort.check(7, float("-inf"))
    x = np.ones((2, 4, 4, 1), np.float32)
    assert np.isnan(poison_batch(x)).all() and poison_batch(x).shape == x.shape
    assert poison_batch(np.ones(3, np.uint8)).dtype == np.float32


def test_watchdog_expires_only_after_a_silent_timeout():
    now = [100.0]
    dog = Watchdog(10.0, rank=1, clock=lambda: now[0])
    assert not dog.expired()                 # not armed before the first step
    dog._last, dog._step = now[0], 3         # a beat without starting the thread
    now[0] += 9.5
    assert not dog.expired()
    now[0] += 1.0
    assert dog.expired()


def test_skip_on_one_process_equals_stopping_before_that_step(tmp_path):
    """Skipping the last step's update (NaN batch) leaves exactly the parameters of the same
    run stopped one step earlier: no update and no BatchNorm statistics from the NaN batch."""
    common = [*SMALL, "--no-horovod", "--set", "faults.nonfinite=skip", "--set", "train.threads=1"]
    proc = run_job([sys.executable, WORKER, tmp_path / "skip", *common,
                    "--set", "faults.inject_nan_at_step=7", "--out", tmp_path / "a"])
    assert "step 7: non-finite loss or gradient, update skipped" in proc.stdout
    run_job([sys.executable, WORKER, tmp_path / "stop", *common, "--stop-after-steps", 7,
             "--out", tmp_path / "b"])
    skipped, stopped = params(tmp_path / "skip" / "params-rank0.npz"), \
        params(tmp_path / "stop" / "params-rank0.npz")
    for key in skipped:
        assert np.array_equal(skipped[key], stopped[key]), key
    summary = read_jsonl(tmp_path / "a" / "metrics.jsonl")[-1]
    assert summary["skipped_steps"] == 1 and summary["steps"] == 8
    assert np.isfinite(read_jsonl(tmp_path / "a" / "metrics.jsonl")[-2]["test_loss"])


# ---------------------------------------------------------------- two ranks under horovodrun
@pytest.mark.multiproc
@pytest.mark.parametrize("framework", ["torch", "tensorflow"])
def test_nan_on_rank1_is_skipped_by_both_ranks(framework, tmp_path):
    """The decision comes from the Horovod-averaged gradients (a NaN on rank 1 is NaN in the
    average on both ranks), so both drop the same update without an extra collective."""
    out = tmp_path / "run"
    proc = horovodrun(2, sys.executable, WORKER, tmp_path / "dump", *SMALL,
                      "--set", f"framework={framework}",
                      "--set", "faults.nonfinite=skip", "--set", "faults.inject_nan_at_step=3",
                      "--set", "faults.inject_nan_rank=1", "--set", "train.eval_every_steps=4",
                      "--out", out, timeout=240)
    assert "step 3: non-finite loss or gradient, update skipped on every rank (1 skipped" \
        in proc.stdout
    p0, p1 = params(tmp_path / "dump" / "params-rank0.npz"), \
        params(tmp_path / "dump" / "params-rank1.npz")
    for key in p0:                   # the ranks still agree, and nothing became NaN
        assert p0[key].tobytes() == p1[key].tobytes(), key
        assert np.isfinite(p0[key]).all(), key
    lines = read_jsonl(out / "metrics.jsonl")
    assert [r["skipped_steps"] for r in lines[:-1]] == [1, 1]      # evaluations at 4 and 8
    assert lines[-1]["skipped_steps"] == 1 and lines[-1]["steps"] == 8
    assert all(np.isfinite(r["train_loss"]) and np.isfinite(r["test_loss"]) for r in lines[:-1])


@pytest.mark.multiproc
@pytest.mark.parametrize("controller", ["gloo", "mpi"])
def test_nan_on_rank1_aborts_every_rank_with_the_step(controller, tmp_path):
    start = time.monotonic()
    proc = horovodrun(2, sys.executable, WORKER, tmp_path / "dump", *SMALL,
                      "--set", "faults.nonfinite=abort", "--set", "faults.inject_nan_at_step=5",
                      "--set", "faults.inject_nan_rank=1", "--set", "checkpoint.every_steps=2",
                      "--out", tmp_path / "run", controller=controller, check=False, timeout=240)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    for rank in (0, 1):
        assert (f"hvdscale train: error: rank {rank}: non-finite loss or gradient at step 5 "
                f"(faults.nonfinite = abort)") in output, output[-3000:]
    # the workers end with their one line; only horovodrun's own launcher may add a traceback
    assert "<stderr>:Traceback" not in output, output[-3000:]
    assert not list((tmp_path / "dump").glob("params-rank*.npz"))    # nobody finished
    # the checkpoints written before the fault are the last ones: step 4, not a NaN one
    sidecars = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("*.json"))
    assert sidecars == ["step-00000002.json", "step-00000004.json"]
    assert time.monotonic() - start < 120
