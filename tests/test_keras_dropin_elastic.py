"""Elastic Horovod with hvdscale.tensorflow.keras: Horovod's own elastic Keras MNIST example
(examples/tensorflow2_keras_mnist_elastic.py, import changed) under
`horovodrun --min-np 1 --max-np 2 --host-discovery-script`, with two local host aliases.

After the first epoch rank 1 is killed with SIGKILL: the survivor resets Horovod, restores
the last commit (KerasState) and goes on alone; then a host comes back and its new worker
joins and receives the state (KerasState.sync). The job ends with exit code 0, and rank 0's
newest checkpoint, written after the new worker joined, reloads with hvd.load_model and
classifies the test images."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from conftest import REPO, job_env, tool

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]
EXAMPLE = REPO / "examples" / "tensorflow2_keras_mnist_elastic.py"
DISCOVER = REPO / "launchers" / "hosts" / "discover_hosts.sh"
EPOCHS = 4

RELOAD = """
import json, sys
import hvdscale.tensorflow.keras as hvd
from hvdscale.data.fashion_mnist import load_fashion_mnist
hvd.init()
model = hvd.load_model(sys.argv[1])
_, _, x, y = load_fashion_mnist()
print(json.dumps({"accuracy": model.evaluate(x[:2000, ..., None] / 255.0, y[:2000], verbose=0)[1]}))
"""


def replace_hosts(path, text):
    tmp = path.with_suffix(".new")
    tmp.write_text(text)
    tmp.replace(path)        # one step: discovery never reads half a file


def workers(launcher_pid):
    """{pid: (host, rank)} of the example's processes under horovodrun (from their environment:
    Horovod passes HOROVOD_HOSTNAME and HOROVOD_RANK to each worker it starts)."""
    found = {}
    for child in psutil.Process(launcher_pid).children(recursive=True):
        try:
            if child.name().startswith("python") and EXAMPLE.name in " ".join(child.cmdline()):
                env = child.environ()
                found[child.pid] = (env.get("HOROVOD_HOSTNAME"), env.get("HOROVOD_RANK"))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def wait_until(predicate, timeout, proc, what):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(f"the job ended while waiting for {what}:\n"
                                 f"{proc.stdout.read()[-4000:]}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_keras_elastic_example_survives_a_lost_worker_and_readmits_one(tmp_path):
    hosts = tmp_path / "hosts.txt"
    replace_hosts(hosts, "localhost:1\n127.0.0.1:1\n")
    cmd = [tool("horovodrun"), "-np", "2", "--min-np", "1", "--max-np", "2",
           "--host-discovery-script", str(DISCOVER), "--network-interface", "lo",
           sys.executable, str(EXAMPLE)]
    proc = subprocess.Popen(cmd, env=job_env(HVDSCALE_HOSTS_FILE=hosts, EPOCHS=EPOCHS, STEPS=40),
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        wait_until(lambda: (tmp_path / "checkpoint-1.keras").exists(), 300, proc, "epoch 1")
        # kill rank 1: the example saves checkpoints on the rank that started as rank 0
        pids = wait_until(lambda: len(workers(proc.pid)) == 2 and workers(proc.pid), 30, proc,
                          "two workers")
        victim = next(pid for pid, (_, rank) in pids.items() if rank == "1")
        survivor_host = next(host for _, (host, rank) in pids.items() if rank == "0")
        os.kill(victim, signal.SIGKILL)
        time.sleep(5)
        # the victim's host is now blacklisted; a worker returns under this machine's host name
        replace_hosts(hosts, f"{survivor_host}:1\n{socket.gethostname()}:1\n")
        wait_until(lambda: any(host == socket.gethostname()
                               for host, _ in workers(proc.pid).values()), 180, proc,
                   "a new worker")
        joined = time.time()
        output, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, output[-4000:]
    # Horovod's example restarts model.fit after each reset with epochs=EPOCHS - state.epoch,
    # so ModelCheckpoint's numbering restarts too: the newest file is the final state
    last = max(tmp_path.glob("checkpoint-*.keras"), key=lambda p: p.stat().st_mtime)
    assert last.stat().st_mtime > joined, "no checkpoint written after the new worker joined"
    reload = subprocess.run([sys.executable, "-c", RELOAD, str(last)], env=job_env(),
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert reload.returncode == 0, reload.stderr[-3000:]
    assert json.loads(reload.stdout.strip().splitlines()[-1])["accuracy"] > 0.6
