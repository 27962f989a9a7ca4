"""Elastic Horovod with hvdscale.tensorflow.keras: Horovod's own elastic Keras MNIST example
(examples/tensorflow2_keras_mnist_elastic.py, import changed) under
`horovodrun --min-np 1 --max-np 2 --host-discovery-script`, with two local host aliases.

After the first epoch one worker is killed with SIGKILL: the survivor resets Horovod, restores
the last commit (KerasState) and goes on alone; then a host comes back and its new worker
joins and receives the state (KerasState.sync). The job finishes every epoch and rank 0's last
checkpoint reloads with hvd.load_model and classifies the test images."""
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


def worker_on(launcher_pid, host):
    """The pid of the example's process that Horovod started for `host` (by its environment)."""
    for child in psutil.Process(launcher_pid).children(recursive=True):
        try:
            if EXAMPLE.name in " ".join(child.cmdline()) \
                    and child.environ().get("HOROVOD_HOSTNAME") == host:
                return child.pid
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


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
        wait_until(lambda: (tmp_path / "checkpoint-1.keras").exists(), 240, proc, "epoch 1")
        victim = wait_until(lambda: worker_on(proc.pid, "127.0.0.1"), 30, proc, "the worker")
        os.kill(victim, signal.SIGKILL)
        time.sleep(5)
        # 127.0.0.1 is now blacklisted; a worker returns under this machine's host name
        replace_hosts(hosts, f"localhost:1\n{socket.gethostname()}:1\n")
        wait_until(lambda: worker_on(proc.pid, socket.gethostname()), 120, proc,
                   "a new worker")
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, output[-4000:]
    assert f"Epoch {EPOCHS - 1}/" in output or f"Epoch {EPOCHS}/" in output, output[-3000:]
    last = tmp_path / f"checkpoint-{EPOCHS}.keras"
    checkpoints = sorted(p.name for p in tmp_path.glob("checkpoint-*.keras"))
    assert last.is_file(), checkpoints
    reload = subprocess.run([sys.executable, "-c", RELOAD, str(last)], env=job_env(),
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert reload.returncode == 0, reload.stderr[-3000:]
    assert json.loads(reload.stdout.strip().splitlines()[-1])["accuracy"] > 0.6
