"""Elastic training (`hvdscale train --elastic`, the Engine's elastic mode) in both frameworks
under `horovodrun --min-np 1 --max-np 2 --host-discovery-script launchers/hosts/discover_hosts.sh`.

The two "hosts" are local aliases (localhost, 127.0.0.1; later this machine's host name),
so Horovod treats them as separate hosts. One worker is killed with SIGKILL: the survivor
restores the last commit and goes on alone under the batch policy; then a host comes back in
the hosts file and its new worker is admitted and receives the state. SIGTERM to the ranks
then ends the run as a preemption would: both ranks agree on the step, one checkpoint is
written, every rank exits 0 with identical parameters, no committed step lost. torch also
resumes that checkpoint elastically on one host and ends normally."""
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
from hvdscale.engine.checkpoint import CheckpointStore
from hvdscale.engine.elastic import batch_plan
from hvdscale.errors import ConfigError

WORKER = WORKERS / "fault_elastic.py"
DISCOVER = REPO / "launchers" / "hosts" / "discover_hosts.sh"
STEPS = 5000        # never reached: the test ends the run with SIGTERM


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


def test_check_elastic_refusals():
    from hvdscale.config import load_config
    from hvdscale.engine.elastic import check_elastic
    check_elastic(load_config(None, ["framework=tensorflow"]))       # both frameworks
    with pytest.raises(ConfigError, match="--no-horovod"):
        check_elastic(load_config(None, []), no_horovod=True)
    with pytest.raises(ConfigError, match="horovod.adasum"):
        check_elastic(load_config(None, ["horovod.adasum=true"]))
    with pytest.raises(ConfigError, match="horovod.groups = 1 is not supported"):
        check_elastic(load_config(None, ["framework=torch", "horovod.groups=1"]))
    check_elastic(load_config(None, ["framework=torch", "horovod.groups=0"]))
    check_elastic(load_config(None, ["framework=tensorflow", "horovod.groups=1"]))


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


def elastic_cmd(hosts, dump, out, framework, policy, steps, *extra, np_=2):
    return [tool("horovodrun"), "-np", str(np_), "--min-np", "1", "--max-np", "2",
            "--host-discovery-script", str(DISCOVER), "--network-interface", "lo",
            sys.executable, str(WORKER), str(dump),
            "--set", f"framework={framework}", "--set", "data.train_limit=4096",
            "--set", "data.test_limit=500", "--set", "batch.per_worker=32",
            "--set", "batch.reference=64", "--set", f"train.max_steps={steps}",
            "--set", "train.epochs=100", "--set", "train.eval_every_steps=100",
            "--set", "checkpoint.every_steps=100", "--set", "log.progress=false",
            "--set", "lr.warmup_steps=5", "--set", "elastic.commit_every=5",
            "--set", f"elastic.policy={policy}", "--out", str(out), *extra]


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize("framework,policy", [("torch", "keep_global_batch"),
                                              ("tensorflow", "rescale_lr")])
def test_lose_a_worker_readmit_one_then_preempt(framework, policy, tmp_path):
    """The run is long (STEPS); once the returning worker has trained through two commits,
    SIGTERM to the ranks ends it: the elastic ranks agree, save, exit 0, and so does
    horovodrun."""
    hosts, dump, out = tmp_path / "hosts.txt", tmp_path / "dump", tmp_path / "run"
    replace_hosts(hosts, "localhost:1\n127.0.0.1:1\n")
    proc = subprocess.Popen(elastic_cmd(hosts, dump, out, framework, policy, STEPS),
                            env=job_env(HVDSCALE_HOSTS_FILE=hosts), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: any(e.get("workers") == 2 for e in events(out)), 180, proc,
                   "two workers")
        wait_until(lambda: last_commit(out) >= 10, 180, proc, "commits with two workers")
        victim = int((dump / "pid-127.0.0.1").read_text())
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        wait_until(lambda: any(e.get("workers") == 1 for e in events(out)), 60, proc,
                   "training to go on with one worker")
        recovered_in = time.monotonic() - killed
        # 127.0.0.1 is now blacklisted; the worker returns under this machine's host name
        replace_hosts(hosts, f"localhost:1\n{socket.gethostname()}:1\n")
        wait_until(lambda: [e.get("workers") for e in events(out)
                            if e.get("event") == "workers"][-1:] == [2], 180, proc,
                   "the returning worker")
        back_at = [e for e in events(out) if e.get("event") == "workers"][-1]["step"]
        wait_until(lambda: last_commit(out) >= back_at + 10, 120, proc,
                   "commits after the re-admission")
        # SIGTERM to every rank, as srun / scancel deliver it (no 5 s limit: horovodrun
        # itself would SIGKILL the ranks 5 s after forwarding its own SIGTERM)
        for host in ("localhost", socket.gethostname()):
            os.kill(int((dump / f"pid-{host}").read_text()), signal.SIGTERM)
        signalled = time.monotonic()
        output, _ = proc.communicate(timeout=60)
        stopped_in = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    print(f"{framework} {policy}: going on with one worker {recovered_in:.1f} s after "
          f"kill -9; horovodrun exited {proc.returncode} {stopped_in:.1f} s after SIGTERM to "
          f"the ranks")
    assert proc.returncode == 0, output[-4000:]

    log = events(out)
    sizes = [e for e in log if e.get("event") == "workers"]
    assert [e["workers"] for e in sizes] == [2, 1, 2], sizes
    first, alone, back = sizes
    # no committed step lost: the survivor went on from exactly its last commit
    assert alone["step"] == alone["last_commit"] and alone["step"] > 0, alone
    assert alone["step"] % 5 == 0 and back["step"] >= alone["step"]
    assert alone["resets"] >= 1 and back["resets"] > alone["resets"]
    if policy == "keep_global_batch":
        assert (alone["global_batch"], alone["accumulation"], alone["lr_scale"]) == (64, 2, 1.0)
        assert (back["global_batch"], back["accumulation"]) == (64, 1)
    else:      # default lr.scaling sqrt: half the global batch, LR x 1/sqrt(2)
        assert (alone["global_batch"], alone["accumulation"]) == (32, 1)
        assert alone["lr_scale"] == pytest.approx(0.5 ** 0.5)
        assert back["lr_scale"] == pytest.approx(1.0)
    # the preemption: agreed by both ranks, one checkpoint at that step
    stop = log[-1]
    assert stop["event"] == "preempted" and stop["workers"] == 2, stop
    assert back["step"] + 10 <= stop["step"] < STEPS
    meta, _ = CheckpointStore(out / "checkpoints").latest()
    assert meta["step"] == stop["step"] and meta["reference_workers"] == 2
    # the returning worker got the state: both ranks end with identical parameters
    p0, p1 = (np.load(dump / f"params-rank{r}.npz") for r in (0, 1))
    for key in p0.files:
        assert p0[key].tobytes() == p1[key].tobytes(), key
    if framework != "torch":
        return
    # an elastic run resumes from that checkpoint and ends normally, with a summary
    replace_hosts(hosts, "localhost:1\n")
    proc = subprocess.run(elastic_cmd(hosts, dump, out, framework, policy, stop["step"] + 5,
                                      "--resume", "--set", "elastic.commit_every=2", np_=1),
                          env=job_env(HVDSCALE_HOSTS_FILE=hosts), cwd=REPO,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"resumed from" in proc.stdout and f"at step {stop['step']}" in proc.stdout
    summary = events(out)[-1]
    assert summary["event"] == "summary" and summary["elastic"] is True
    assert summary["steps"] == stop["step"] + 5 and summary["workers"] == 1
    assert summary["reference_workers"] == 2 and summary["final_test_accuracy"] > 0.5
