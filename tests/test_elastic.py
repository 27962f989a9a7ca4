"""Elastic training (`hvdscale train --elastic`, PyTorch) under
`horovodrun --min-np 1 --max-np 2 --host-discovery-script launchers/hosts/discover_hosts.sh`.

The two "hosts" are local aliases (localhost, 127.0.0.1; later this machine's host name),
so Horovod treats them as separate hosts. One worker is killed with SIGKILL: the survivor
restores the last commit and goes on alone under the batch policy; then a host comes back in
the hosts file and its new worker is admitted and receives the state. The run ends with all
its steps, both ranks agreeing, no committed step lost."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, WORKERS, job_env, tool
from hvdscale.engine.elastic import batch_plan
from hvdscale.errors import ConfigError

WORKER = WORKERS / "fault_elastic.py"
DISCOVER = REPO / "launchers" / "hosts" / "discover_hosts.sh"
STEPS = 400


def test_batch_plan_policies():
    # keep the global batch 2 x 32 x 1 = 64: one worker accumulates two micro-batches
    assert batch_plan("keep_global_batch", 2, 2, 32, 1, 64, "sqrt") == (1, 64, 1.0)
    assert batch_plan("keep_global_batch", 2, 1, 32, 1, 64, "sqrt") == (2, 64, 1.0)
    assert batch_plan("keep_global_batch", 4, 2, 16, 3, 64, "linear") == (6, 192, 1.0)
    with pytest.raises(ConfigError, match="cannot be split over 3 workers"):
        batch_plan("keep_global_batch", 2, 3, 32, 1, 64, "sqrt")
    # rescale the LR: half the global batch -> x0.5 (linear) or x0.707 (sqrt)
    acc, glob, mult = batch_plan("rescale_lr", 2, 1, 32, 1, 64, "linear")
    assert (acc, glob) == (1, 32) and mult == pytest.approx(0.5)
    assert batch_plan("rescale_lr", 2, 1, 32, 1, 64, "sqrt")[2] == pytest.approx(0.5 ** 0.5)
    assert batch_plan("rescale_lr", 2, 2, 32, 1, 64, "none")[2] == pytest.approx(1.0)


def events(out):
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_until(predicate, timeout, proc, what):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the job ended while waiting for {what}:\n"
                                 f"{proc.stdout.read()[-4000:]}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def last_commit(out):
    try:
        return int((out / "last_commit").read_text())
    except (OSError, ValueError):      # not written yet, or caught mid-write
        return -1


def replace_hosts(path, text):
    tmp = path.with_suffix(".new")
    tmp.write_text(text)
    tmp.replace(path)        # one step: discovery never reads half a file


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize("policy", ["keep_global_batch", "rescale_lr"])
def test_lose_a_worker_then_readmit_one(policy, tmp_path):
    hosts, dump, out = tmp_path / "hosts.txt", tmp_path / "dump", tmp_path / "run"
    replace_hosts(hosts, "localhost:1\n127.0.0.1:1\n")
    cmd = [tool("horovodrun"), "-np", "2", "--min-np", "1", "--max-np", "2",
           "--host-discovery-script", str(DISCOVER), "--network-interface", "lo",
           sys.executable, str(WORKER), str(dump),
           "--set", "framework=torch", "--set", "data.train_limit=4096",
           "--set", "data.test_limit=500", "--set", "batch.per_worker=32",
           "--set", "batch.reference=64", "--set", f"train.max_steps={STEPS}",
           "--set", "train.epochs=10",
           "--set", "lr.warmup_steps=5", "--set", "elastic.commit_every=5",
           "--set", f"elastic.policy={policy}", "--out", str(out)]
    proc = subprocess.Popen(cmd, env=job_env(HVDSCALE_HOSTS_FILE=hosts), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: any(e.get("workers") == 2 for e in events(out)), 120, proc,
                   "two workers")
        wait_until(lambda: last_commit(out) >= 10, 120, proc, "commits with two workers")
        victim = int((dump / "pid-127.0.0.1").read_text())
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        wait_until(lambda: any(e.get("workers") == 1 for e in events(out)), 60, proc,
                   "training to go on with one worker")
        recovered_in = time.monotonic() - killed
        # 127.0.0.1 is now blacklisted; the worker returns under this machine's host name
        replace_hosts(hosts, f"localhost:1\n{socket.gethostname()}:1\n")
        output, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    print(f"{policy}: going on with one worker {recovered_in:.1f} s after kill -9")
    assert proc.returncode == 0, output[-4000:]

    log = events(out)
    sizes = [e for e in log if e.get("event") == "workers"]
    assert [e["workers"] for e in sizes] == [2, 1, 2], sizes
    first, alone, back = sizes
    # no committed step lost: the survivor went on from exactly its last commit
    assert alone["step"] == alone["last_commit"] and alone["step"] > 0, alone
    assert alone["step"] % 5 == 0 and back["step"] >= alone["step"]
    if policy == "keep_global_batch":
        assert (alone["global_batch"], alone["accumulation"], alone["lr_scale"]) == (64, 2, 1.0)
        assert (back["global_batch"], back["accumulation"]) == (64, 1)
    else:      # default lr.scaling sqrt: half the global batch, LR x 1/sqrt(2)
        assert (alone["global_batch"], alone["accumulation"]) == (32, 1)
        assert alone["lr_scale"] == pytest.approx(0.5 ** 0.5)
        assert back["lr_scale"] == pytest.approx(1.0)
    summary = log[-1]
    assert summary["event"] == "summary" and summary["steps"] == STEPS
    assert summary["workers"] == 2 and summary["final_test_accuracy"] > 0.5
    assert alone["resets"] >= 1 and summary["resets"] >= 2     # rank 0 survived both
    # the returning worker got the state: both ranks end with identical parameters
    p0, p1 = (np.load(dump / f"params-rank{r}.npz") for r in (0, 1))
    for key in p0.files:
        assert p0[key].tobytes() == p1[key].tobytes(), key
