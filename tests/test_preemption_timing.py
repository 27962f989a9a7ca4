"""Preemption at the worst moments, and bad data that must get one line (issue 26).

Each case runs `hvdscale train` as a user would, under `horovodrun -np 2` where ranks matter:
- SIGTERM to horovodrun in the middle of a long evaluation (longer than horovodrun's 5 s
  before SIGKILL): every rank abandons the evaluation at the same round, the checkpoint of that
  step is written, no metrics record of a partial evaluation, exit well inside 5 s.
- SIGTERM to horovodrun while a large checkpoint is being written: the save completes, it is
  the preemption checkpoint (no second save of a later step), exit well inside 5 s.
- SIGTERM before the first step has ended: the stop comes right after step 1.
- SIGINT (Ctrl-C) to a plain `hvdscale train` during its final evaluation: as SIGTERM,
  checkpoint + preempted.json, no KeyboardInterrupt traceback; `--resume` runs that evaluation.
- a data factory giving the ranks different numbers of examples (under horovodrun), and one
  giving no test examples: one line and exit 2 at start instead of a hang / accuracy 0.0.
The numbers in benchmarks/RESULTS.md ("Preemption timing and bad data") are printed here.
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, horovodrun, job_env, tool, wait_for
from hvdscale.engine.checkpoint import CheckpointStore
from test_bad_input import refused_by_every_rank

PLUGINS = Path(__file__).resolve().parent / "plugins"
BYO = REPO / "examples" / "byo" / "recipe.yaml"
# the factories here and the worked example's (the recipe's model and data)
FACTORY_PATH = os.pathsep.join([str(PLUGINS), str(BYO.parent), str(REPO)])
QUIET = ["--set", "log.progress=false", "--set", "log.tensorboard=false"]
# horovodrun sends SIGKILL 5 s after it forwarded SIGTERM; the ranks must be out well before
GRACE_S = 5.0
# The small CNN on the full Fashion-MNIST test set (5000 images per rank) with a 4x slower
# model: resnet20 evaluates 10k images in > 5 s on this 2-core host.
SLOW_EVAL = ["--set", "model.name=resnet20", "--set", "data.train_limit=512",
             "--set", "batch.per_worker=32", "--set", "batch.reference=64",
             "--set", "train.max_steps=4", "--set", "lr.warmup_steps=1",
             "--set", "train.eval_every_steps=2", "--set", "checkpoint.every_steps=1", *QUIET]


def start(cmd, env=None):
    return subprocess.Popen([str(c) for c in cmd], env=env or job_env(), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def signal_when(proc, ready, sig, delay=0.0, timeout=240):
    """Wait until ready() holds, then (after `delay`) send `sig` to `proc`; returns (output,
    exit code, seconds from the signal to the job's end)."""
    try:
        assert wait_for(ready, timeout, proc), "the job ended before the moment to signal"
        time.sleep(delay)
        proc.send_signal(sig)
        sent = time.monotonic()
        output, _ = proc.communicate(timeout=60)
        return output, proc.returncode, time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def events(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def check_stopped_at(out, output, step):
    """preempted.json, the newest complete checkpoint and the log all name `step`."""
    assert (out / "preempted.json").exists(), output[-3000:]
    marker = json.loads((out / "preempted.json").read_text())
    assert marker["step"] == step and marker["checkpoint"] == f"step-{step:08d}", marker
    meta, state = CheckpointStore(out / "checkpoints").latest()
    assert meta["step"] == step and state.stat().st_size == meta["state_size"]
    assert not list((out / "checkpoints").glob(".*.tmp"))
    assert events(out)[-1]["event"] == "preempted"
    assert "Traceback" not in output, output[-3000:]


@pytest.mark.multiproc
def test_sigterm_mid_evaluation_stops_every_rank_within_grace(tmp_path):
    out = tmp_path / "run"
    proc = start([tool("horovodrun"), "-np", "2", "--gloo", tool("hvdscale"), "train",
                  *SLOW_EVAL, "--out", out])
    # step 1 is checkpointed, step 2 trains in well under a second, then its evaluation runs
    first = out / "checkpoints" / "step-00000001.json"
    output, code, took = signal_when(proc, first.exists, signal.SIGTERM, delay=1.5)
    print(f"mid-evaluation: horovodrun exited {code} {took:.2f} s after SIGTERM")
    assert took < GRACE_S, output[-3000:]      # before horovodrun SIGKILLs
    check_stopped_at(out, output, 2)
    # the abandoned evaluation left no record
    assert not [e for e in events(out) if "test_accuracy" in e and "event" not in e]


@pytest.mark.multiproc
def test_sigterm_during_a_checkpoint_write_makes_it_the_preemption_checkpoint(tmp_path):
    out = tmp_path / "run"
    env = job_env(PYTHONPATH=FACTORY_PATH)
    proc = start([tool("horovodrun"), "-np", "2", "--gloo", tool("hvdscale"), "train", BYO,
                  "--set", "model.name=rank_factories:big_state", "--set", "train.max_steps=6",
                  "--set", "lr.warmup_steps=1",
                  "--set", "checkpoint.every_steps=2", "--set", "checkpoint.keep=4", *QUIET,
                  "--out", out], env=env)
    ckpts = out / "checkpoints"
    writing = []

    def step4_being_written():     # the temporary file of step 4's state, not yet renamed
        writing[:] = list(ckpts.glob(".step-00000004.pt.*.tmp")) if ckpts.is_dir() else []
        return bool(writing)

    output, code, took = signal_when(proc, step4_being_written, signal.SIGTERM)
    print(f"mid-checkpoint: horovodrun exited {code} {took:.2f} s after SIGTERM")
    # the save in progress completed and is the preemption checkpoint: no step 5 or 6
    check_stopped_at(out, output, 4)
    assert sorted(p.name for p in ckpts.glob("step-*.json")) == \
        ["step-00000002.json", "step-00000004.json"]
    assert took < GRACE_S, output[-3000:]      # before horovodrun SIGKILLs


@pytest.mark.multiproc
def test_sigterm_before_the_first_step_ends_stops_after_it(tmp_path):
    out, dump = tmp_path / "run", tmp_path / "dump"
    worker = Path(__file__).resolve().parent / "workers" / "fault_train.py"
    proc = start([tool("horovodrun"), "-np", "2", "--gloo", sys.executable, worker, dump,
                  *SLOW_EVAL, "--set", "model.name=cnn", "--out", out])
    # the worker notes its pid once the engine is built: the model, the restore and the
    # first step are still ahead
    output, code, took = signal_when(proc, (dump / "pid-rank1").exists, signal.SIGTERM)
    print(f"first step: horovodrun exited {code} {took:.2f} s after SIGTERM")
    check_stopped_at(out, output, 1)
    assert took < GRACE_S, output[-3000:]      # before horovodrun SIGKILLs


@pytest.mark.multiproc
def test_ranks_with_different_data_sizes_are_refused_on_every_rank(tmp_path):
    """It hung in a collective until the step watchdog (900 s)."""
    out = tmp_path / "run"
    t0 = time.monotonic()
    proc = horovodrun(2, tool("hvdscale"), "train", BYO, "--set",
                      "data.kind=rank_factories:uneven_by_rank", *QUIET, "--out", out,
                      check=False, timeout=120, PYTHONPATH=FACTORY_PATH)
    took = time.monotonic() - t0
    print(f"uneven data: exit {proc.returncode} after {took:.1f} s")
    refused_by_every_rank(proc, "the 2 ranks hold data sets of different sizes "
                                "(train 448..512 examples, test 128..128)")
    assert took < 60
    assert not (out / "metrics.jsonl").exists()


def test_empty_evaluation_set_is_refused(tmp_path, capsys, monkeypatch):
    """It trained and reported accuracy 0.0 (one process is enough: every rank reaches the
    same verdict from the allreduced sizes)."""
    from hvdscale.cli import main
    for folder in (PLUGINS, BYO.parent):
        monkeypatch.syspath_prepend(str(folder))
    code = main(["train", str(BYO), "--no-horovod", "--set",
                 "data.kind=rank_factories:no_test_examples", *QUIET,
                 "--out", str(tmp_path / "run")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1, err
    assert err[0] == ("hvdscale train: error: data.kind 'rank_factories:no_test_examples': "
                      "the evaluation set is empty (0 test examples); accuracy cannot be "
                      "measured")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


class _ThreadRank:
    """One rank of a world of threads: allreduce(max) meets the other threads at a barrier,
    as Horovod matches the ranks' collectives by their order."""
    distributed = True

    def __init__(self, world, rank):
        self.world, self.rank, self.calls = world, rank, 0

    def allreduce(self, value, op="max"):
        assert op == "max"
        world = self.world
        world["slots"][self.rank] = np.asarray(value, dtype=np.float64)
        world["barrier"].wait()
        result = np.max(world["slots"], axis=0)
        world["barrier"].wait()          # nobody refills a slot before everyone has read
        self.calls += 1
        return result


class _SumBackend:
    """evaluate() of batches that are (correct, count) pairs."""

    def __init__(self, on_batch=None):
        self.on_batch, self.seen = on_batch, 0

    def evaluate(self, batches):
        correct = count = 0
        for c, n in batches:
            self.seen += 1
            if self.on_batch:
                self.on_batch(self.seen)
            correct, count = correct + c, count + n
        return correct, count, float(count)


@pytest.mark.parametrize("signal_at", [None, 2, 6])
def test_ranks_with_uneven_batches_finish_or_abandon_together(signal_at):
    """Rank 0 holds 3 batches, rank 1 holds 9; a signal on rank 1 at its batch `signal_at`
    stops both at the same round (also when rank 0 has already finished), none finishes both."""
    from hvdscale.engine.evaluation import evaluate_interruptibly
    from hvdscale.engine.preemption import PreemptionWatch
    world = {"barrier": threading.Barrier(2), "slots": [None, None]}
    batches = {0: [(1, 2)] * 3, 1: [(2, 3)] * 9}
    results, watches, comms = {}, {}, {}

    def rank(r):
        comms[r] = _ThreadRank(world, r)
        watch = watches[r] = PreemptionWatch(comms[r], check_seconds=1e-9)  # a round a batch

        def on_batch(seen):
            if r == 1 and seen == signal_at:
                watch.signal_name = "SIGTERM"          # what the handler records
        results[r] = evaluate_interruptibly(_SumBackend(on_batch), batches[r], watch)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads), "a rank waits in a collective"
    assert comms[0].calls == comms[1].calls            # both left at the same round
    if signal_at is None:
        assert results == {0: (3, 6, 6.0), 1: (18, 27, 27.0)}
        assert not watches[0].agreed and not watches[1].agreed
    else:
        assert results == {0: None, 1: None} and watches[0].agreed and watches[1].agreed


def test_sigint_during_the_final_evaluation_then_resume_runs_it(tmp_path):
    """Ctrl-C (SIGINT) to a plain `hvdscale train` during its final evaluation: a preemption
    (the checkpoint of the last step, preempted.json, no evaluation record, exit 0); `--resume`
    then runs the final evaluation and the summary."""
    out = tmp_path / "run"
    args = [tool("hvdscale"), "train", *SLOW_EVAL, "--set", "train.max_steps=2",
            "--set", "train.eval_every_steps=null", "--set", "train.eval_every_epochs=null",
            "--set", "data.test_limit=3000", "--out", out]
    first = out / "checkpoints" / "step-00000001.json"
    output, code, took = signal_when(start(args), first.exists, signal.SIGINT, delay=1.5)
    print(f"final evaluation, one process: exited {code} {took:.2f} s after SIGINT")
    # Ctrl-C is a preemption: before, a KeyboardInterrupt traceback and no checkpoint
    assert code == 0, output[-3000:]
    assert "KeyboardInterrupt" not in output and "received SIGINT" in output
    check_stopped_at(out, output, 2)
    assert not [e for e in events(out) if "test_accuracy" in e and "event" not in e]
    resumed = subprocess.run([str(a) for a in args] + ["--resume"], env=job_env(), cwd=REPO,
                             capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    records = events(out)
    evals = [e for e in records if "test_accuracy" in e and "event" not in e]
    assert [e["step"] for e in evals] == [2] and evals[0]["test_examples"] == 3000
    assert records[-1]["event"] == "summary"
    assert records[-1]["final_test_accuracy"] == evals[0]["test_accuracy"]
