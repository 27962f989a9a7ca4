"""Soak: random faults every minute or two for 20 minutes under `horovodrun -np 2`.

    make test-soak                                   # 20 minutes
    HVDSCALE_SOAK_MINUTES=3 make test-soak            # a short check (faults every 9-18 s)
    HVDSCALE_SOAK_SEED=7 ...                          # another fault sequence (printed)

Rounds of the same small run (the default recipe, torch, `hvdscale train` through the fault
worker that notes each rank's pid and dumps the final parameters): each round starts a fresh
run directory, and while the run is not complete, a random moment 60-120 s into each session
(scaled by minutes / 20) brings one fault:
- SIGTERM to horovodrun (a scheduler's preemption): every rank must stop with a checkpoint
  and preempted.json;
- kill -9 of one rank (a node lost): the job dies; the last periodic checkpoint must be
  intact;
then `--resume`. After every session the run directory is checked: every checkpoint sidecar
parses and names a state file of its recorded size that torch loads, metrics.jsonl and
preempted.json are whole JSON lines. A round ends when a session completes; its final weights
must equal those of one uninterrupted run. Rounds repeat until the time is up. Deselected by
`make test` (marker soak); the result of the last full run is in benchmarks/RESULTS.md ("Soak").
"""
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, WORKERS, job_env, tool, wait_for

pytestmark = [pytest.mark.soak, pytest.mark.multiproc]

WORKER = WORKERS / "fault_train.py"
MINUTES = float(os.environ.get("HVDSCALE_SOAK_MINUTES", "20"))
SEED = int(os.environ.get("HVDSCALE_SOAK_SEED", "0"))
STEPS = int(os.environ.get("HVDSCALE_SOAK_STEPS", "1500"))
RUN = ["--set", "data.train_limit=8192", "--set", "data.test_limit=1000",
       "--set", "batch.per_worker=64", "--set", "train.epochs=1000",
       "--set", f"train.max_steps={STEPS}",
       "--set", "train.eval_every_steps=100", "--set", "checkpoint.every_steps=25",
       "--set", "checkpoint.keep=3", "--set", "log.progress=false",
       "--set", "log.tensorboard=false"]


def params(path):
    with np.load(path) as npz:
        return {k: npz[k] for k in npz.files}


def session(dump, out, resume):
    for pid_file in dump.glob("pid-rank*"):
        pid_file.unlink()
    cmd = [tool("horovodrun"), "-np", "2", "--gloo", sys.executable, WORKER, dump, *RUN,
           "--out", out] + (["--resume"] if resume else [])
    return subprocess.Popen([str(c) for c in cmd], env=job_env(), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def check_run_directory(out):
    """Nothing half-written where a resume or a reader would look."""
    import torch
    problems = []
    for sidecar in sorted((out / "checkpoints").glob("step-*.json")):
        meta = json.loads(sidecar.read_text())
        state = out / "checkpoints" / meta["state_file"]
        if state.stat().st_size != meta["state_size"]:
            problems.append(f"{state}: {state.stat().st_size} bytes, sidecar says "
                            f"{meta['state_size']}")
            continue
        torch.load(state, weights_only=True)
    if (out / "metrics.jsonl").exists():      # a fault can come before the run opened it
        for line in (out / "metrics.jsonl").read_text().splitlines():
            json.loads(line)
    if (out / "preempted.json").exists():
        json.loads((out / "preempted.json").read_text())
    assert not problems, problems


@pytest.mark.timeout(int(MINUTES * 60 * 2 + 900))
def test_random_faults_end_with_the_uninterrupted_weights(tmp_path):
    rng = random.Random(SEED)
    scale = MINUTES / 20.0
    deadline = time.monotonic() + MINUTES * 60
    reference = tmp_path / "reference"
    proc = session(reference, reference / "run", resume=False)
    output, _ = proc.communicate(timeout=1800)
    assert proc.returncode == 0, output[-3000:]
    whole = params(reference / "params-rank0.npz")
    log, rounds = [], 0
    while time.monotonic() < deadline:
        rounds += 1
        dump, out = tmp_path / f"round{rounds}", tmp_path / f"round{rounds}" / "run"
        resume = False
        while True:
            proc = session(dump, out, resume)
            delay = rng.uniform(60, 120) * scale
            fault = rng.choice(["sigterm", "kill9"])
            t0 = time.monotonic()
            # a fault only once both ranks run (pids noted), at the drawn moment
            pids = [dump / f"pid-rank{r}" for r in (0, 1)]
            started = wait_for(lambda: all(p.exists() for p in pids), 300, proc)
            # at least 2 s after the pids appear: the engine's handlers are in place by then
            left = max(delay - (time.monotonic() - t0), 2.0)
            if started and left > 0:
                try:
                    proc.wait(timeout=left)
                except subprocess.TimeoutExpired:
                    pass
            if proc.poll() is None and time.monotonic() < deadline:
                if fault == "sigterm":
                    proc.send_signal(signal.SIGTERM)
                else:
                    victim = rng.choice(pids)
                    try:
                        os.kill(int(victim.read_text()), signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            else:
                fault = "none"
            output, _ = proc.communicate(timeout=600)
            check_run_directory(out)
            if fault == "sigterm":
                assert (out / "preempted.json").exists(), output[-3000:]
            event = f"round {rounds}: {fault} after {time.monotonic() - t0:.0f} s, exit " \
                    f"{proc.returncode}"
            log.append(event)
            print(event, flush=True)
            if fault == "none":
                assert proc.returncode == 0, output[-3000:]
                break
            resume = True
        final = params(dump / "params-rank0.npz")
        assert final.keys() == whole.keys()
        for key in whole:
            np.testing.assert_allclose(final[key], whole[key], rtol=1e-5, atol=1e-6,
                                       err_msg=f"round {rounds}: {key}")
    faults = [e for e in log if "none" not in e]
    print(f"soak: {MINUTES:g} min, seed {SEED}, {rounds} rounds, {len(faults)} faults, "
          f"final weights equal to the uninterrupted run's in every round")
    assert faults, "no fault was injected: the run finished before the first fault"
