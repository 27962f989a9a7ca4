"""Preemption: SIGTERM/SIGUSR1 end a run cleanly with one checkpoint at the signalled step.

- `horovodrun -np 2` (Gloo) gets SIGTERM mid-epoch, as a scheduler sends it to the job's
  launcher: horovodrun forwards SIGTERM to the ranks (SIGKILL 5 s later), the ranks agree at
  a step boundary, rank 0 writes the checkpoint of that step (not the last periodic one), every
  rank exits 0, horovodrun exits 0 well within 60 s; `--resume` then ends with the parameters
  of an uninterrupted run. Both frameworks.
- `mpirun -np 2`: SIGUSR1 to rank 1 only (as `scancel --signal=USR1` to one task would do;
  rank 0 never sees a signal) with HVDSCALE_REQUEUE_EXIT_CODE=75: both ranks stop at the same
  step, and mpirun exits 75; two more signals during the stop do not disturb the save.
- PreemptionWatch in one process: handlers only record, a second signal is counted.
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, WORKERS, horovodrun, job_env, tool, wait_for
from hvdscale.comm import Comm
from hvdscale.engine.checkpoint import CheckpointStore
from hvdscale.engine.preemption import PreemptionWatch

WORKER = WORKERS / "fault_train.py"
EVERY = 8        # periodic checkpoints; 16 steps per epoch, 40 steps
RUN = ["--set", "data.train_limit=2048", "--set", "data.test_limit=200",
       "--set", "batch.per_worker=64", "--set", "batch.reference=128",
       "--set", "train.max_steps=40", "--set", "lr.warmup_steps=4",
       "--set", "train.eval_every_steps=20", "--set", f"checkpoint.every_steps={EVERY}",
       "--set", "log.progress=false", "--set", "log.tensorboard=false",
       # a check every step or two, so the stop lands mid-epoch (the default is every 0.5 s)
       "--set", "faults.preemption_check_s=0.05"]
FRAMEWORK = {"torch": ["--set", "framework=torch", "--set", "optimizer.name=lamb"],
             "tensorflow": ["--set", "framework=tensorflow", "--set", "optimizer.name=sgd"]}


def params(path):
    with np.load(path) as npz:
        return {k: npz[k] for k in npz.files}


def signalled_run(cmd, out, send, env=None, timeout=60):
    """Start `cmd`, call send(proc) once the first periodic checkpoint exists, and return
    (output, exit code, seconds from the signal to the job's end)."""
    first = out / "checkpoints" / f"step-{EVERY:08d}.json"
    proc = subprocess.Popen([str(c) for c in cmd], env=env or job_env(), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert wait_for(first.exists, 240, proc), "the job ended before its first checkpoint"
        send(proc)
        sent = time.monotonic()
        output, _ = proc.communicate(timeout=timeout)
        return output, proc.returncode, time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def check_preempted(out, output, signame, code):
    """One complete checkpoint at the signalled step, mid-epoch, after the periodic one."""
    marker = json.loads((out / "preempted.json").read_text())
    step = marker["step"]
    # one or two steps after the signal, mid-epoch; or the periodic checkpoint itself, when
    # the signal came while it was written (the ranks agree right after every checkpoint)
    assert EVERY <= step < 16, marker
    assert marker["checkpoint"] == f"step-{step:08d}" and marker["exit_code"] == code
    meta, state = CheckpointStore(out / "checkpoints").latest()
    assert meta["step"] == step and state.stat().st_size == meta["state_size"]
    assert not list((out / "checkpoints").glob(".*.tmp"))
    assert f"at step {step} of 40: checkpoint step-{step:08d} written" in output, output[-3000:]
    assert signame in output
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "preempted" and events[-1]["step"] == step
    return step


@pytest.mark.multiproc
@pytest.mark.parametrize("framework", ["torch", "tensorflow"])
def test_sigterm_to_horovodrun_then_resume_equals_uninterrupted(framework, tmp_path):
    run = [*FRAMEWORK[framework], *RUN]
    whole = tmp_path / "whole"
    horovodrun(2, sys.executable, WORKER, whole, *run, "--out", whole / "run", timeout=300)

    dump, out = tmp_path / "dump", tmp_path / "run"
    # torch: the real `hvdscale train` command; TF: the worker, which also dumps both ranks'
    # parameters when the engine returns
    program = [tool("hvdscale"), "train"] if framework == "torch" else \
        [sys.executable, WORKER, dump]
    cmd = [tool("horovodrun"), "-np", "2", "--gloo", *program, *run, "--out", out]
    output, code, took = signalled_run(cmd, out, lambda proc: proc.send_signal(signal.SIGTERM))
    print(f"{framework}: horovodrun exited {code} {took:.1f} s after SIGTERM")  # benchmarks/RESULTS.md
    # horovodrun's own exit code races with its teardown: after a rank has exited, Horovod's
    # safe_shell_exec SIGSTOPs and SIGTERMs that rank's executor shell, so a rank that exited 0
    # is sometimes reported as 143 and horovodrun exits 1 (seen once in a full suite run, TF).
    # What the ranks did is in OUT/preempted.json and the checkpoint, checked below.
    assert code == 0 or (code == 1 and "Exit code: 143" in output), output[-3000:]
    assert took < 60
    step = check_preempted(out, output, "received SIGTERM", 0)
    if framework != "torch":    # both ranks stopped at the same step, identical parameters
        p0, p1 = params(dump / "params-rank0.npz"), params(dump / "params-rank1.npz")
        assert all(p0[k].tobytes() == p1[k].tobytes() for k in p0)

    proc = horovodrun(2, sys.executable, WORKER, dump, *run, "--out", out, "--resume",
                      timeout=300)
    assert f"at step {step}" in proc.stdout and "resumed from" in proc.stdout
    assert not (out / "preempted.json").exists()
    resumed, reference = params(dump / "params-rank0.npz"), params(whole / "params-rank0.npz")
    assert resumed.keys() == reference.keys()
    for key in reference:
        np.testing.assert_allclose(resumed[key], reference[key], rtol=1e-5, atol=1e-6,
                                   err_msg=key)


@pytest.mark.multiproc
def test_sigusr1_to_one_rank_under_mpirun_requeue_code(tmp_path):
    dump, out = tmp_path / "dump", tmp_path / "run"
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", "-bind-to", "none",
           sys.executable, WORKER, dump, *FRAMEWORK["torch"], *RUN, "--out", out]

    def signal_rank1(proc):
        pid = int((dump / "pid-rank1").read_text())
        os.kill(pid, signal.SIGUSR1)
        for _ in range(2):       # the later ones land while the ranks stop and save ...
            time.sleep(0.3)
            try:
                os.kill(pid, signal.SIGUSR1)
            except ProcessLookupError:     # ... unless rank 1 was done already
                break

    output, code, took = signalled_run(cmd, out, signal_rank1,
                                       env=job_env(HVDSCALE_REQUEUE_EXIT_CODE=75))
    print(f"mpirun: exited {code} {took:.1f} s after SIGUSR1 to rank 1")
    assert code == 75, output[-3000:]
    # rank 0 saw no signal itself: it stopped because the ranks agreed
    check_preempted(out, output, "a peer received a preemption signal", 75)
    p0, p1 = params(dump / "params-rank0.npz"), params(dump / "params-rank1.npz")
    assert all(p0[k].tobytes() == p1[k].tobytes() for k in p0)


def test_watch_records_signals_and_counts_repeats():
    watch = PreemptionWatch(Comm("torch")).install()
    try:
        assert not watch.should_stop()
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)       # a second one, e.g. during the save
        time.sleep(0.05)
        assert watch.signal_name == "SIGUSR1" and watch.repeats == 1
        assert watch.should_stop() and watch.should_stop()
        assert "received SIGUSR1 (1 more during the save, ignored)" == watch.describe()
    finally:
        watch.uninstall()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


class _TwoRanks:
    """A stand-in for a 2-rank Comm: the check allreduce takes the max with the other
    rank's [flag, mean step seconds] (what the real one would return)."""
    distributed = True

    def __init__(self):
        self.peer = [0.0, 0.0]
        self.started = []

    def allreduce_async(self, value, op="max"):
        assert op == "max"
        self.started.append([float(v) for v in value])
        result = np.maximum(np.asarray(value, dtype=np.float64), self.peer)
        return type("Handle", (), {"wait": lambda self: result})()


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_agreement_is_one_check_late_and_counts_a_peers_signal():
    comm = _TwoRanks()
    watch = PreemptionWatch(comm, clock=_Clock(), check_seconds=1e-9)   # a check every step
    assert [watch.should_stop() for _ in range(3)] == [False, False, False]
    comm.peer[0] = 1.0                     # the other rank got SIGTERM during this step
    assert not watch.should_stop()         # its flag travels in the allreduce started now
    assert watch.should_stop()             # ... and is read at the next check
    assert watch.describe() == "a peer received a preemption signal"
    assert [flag for flag, _ in comm.started] == [0.0] * 5   # never received one itself


def test_checks_space_out_to_the_slowest_ranks_step_time():
    """With 10 ms steps here and 40 ms on the peer, a 0.2 s check interval means a check
    every 5 steps (the slowest rank decides, so every rank checks at the same steps)."""
    comm, clock = _TwoRanks(), _Clock()
    watch = PreemptionWatch(comm, clock=clock, check_seconds=0.2)
    comm.peer[1] = 0.04
    checked_at = []
    for step in range(1, 31):
        clock.now += 0.01
        before = watch.checks
        assert not watch.should_stop()
        if watch.checks > before:
            checked_at.append(step)
    assert checked_at[:2] == [1, 2]                       # no agreed step time yet
    assert all(b - a == 5 for a, b in zip(checked_at[2:], checked_at[3:])), checked_at
    assert comm.started[-1][1] == pytest.approx(0.01)     # this rank's own mean step time
    watch.signal_name = "SIGTERM"                         # as the handler records it
    stops = [watch.should_stop() for _ in range(11)]
    assert stops.index(True) <= 10                        # within two intervals
    assert PreemptionWatch(comm, check_seconds=0.5).interval(0.0) == 1
    assert PreemptionWatch(comm, check_seconds=0.5).interval(1e-6) == PreemptionWatch.MAX_INTERVAL


def test_requeue_exit_code_from_the_environment():
    from hvdscale.commands.train import REQUEUE_VAR, requeue_exit_code
    from hvdscale.errors import ConfigError
    assert requeue_exit_code({}) is None and requeue_exit_code({REQUEUE_VAR: " "}) is None
    assert requeue_exit_code({REQUEUE_VAR: "75"}) == 75
    for bad in ("0", "256", "x", "-1"):
        with pytest.raises(ConfigError, match=REQUEUE_VAR):
            requeue_exit_code({REQUEUE_VAR: bad})

