"""The examples under examples/, run as a user would with `horovodrun -np 2`:

- Horovod's own Keras MNIST example with only the import (and Keras 3's renames) changed trains
  under Keras 3; its rank-0 checkpoint reloads with hvdscale.tensorflow.keras.load_model, with
  the optimizer wrapped and its state restored, and classifies the test images;
- the plain PyTorch loop with horovod.torch + hvdscale's LAMB/LARS, scaling, schedule and
  noise-scale hook: ranks end identical, the learning rate of every update is the
  hvdscale.core schedule's, the loss falls, the noise scale is reported the same on both ranks.
"""
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, horovodrun, job_env, tool

pytestmark = pytest.mark.multiproc
EXAMPLES = REPO / "examples"

RELOAD = """
import json, sys
import hvdscale.tensorflow.keras as hvd
from hvdscale.data.fashion_mnist import load_fashion_mnist
from hvdscale.tensorflow.keras.optimizer import DistributedMixin
hvd.init()
model = hvd.load_model(sys.argv[1])
_, _, x, y = load_fashion_mnist()
loss, accuracy = model.evaluate(x[:2000, ..., None] / 255.0, y[:2000], verbose=0)
print(json.dumps({"accuracy": accuracy,
                  "distributed": isinstance(model.optimizer, DistributedMixin),
                  "optimizer": type(model.optimizer).__name__,
                  "iterations": int(model.optimizer.iterations.numpy())}))
"""


# Gloo only: the MPI controller runs the same code paths in tests/test_keras_dropin.py
@pytest.mark.parametrize("controller", ["gloo"])
def test_horovods_keras_mnist_example_trains_under_keras3(tmp_path, controller):
    flag = {"gloo": "--gloo", "mpi": "--mpi"}[controller]
    cmd = [tool("horovodrun"), "-np", "2", flag, sys.executable,
           str(EXAMPLES / "tensorflow2_keras_mnist.py")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=job_env(EPOCHS=2, STEPS=40), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Epoch 2/2" in proc.stdout
    checkpoint = tmp_path / "checkpoint-2.keras"
    assert checkpoint.is_file() and (tmp_path / "checkpoint-1.keras").is_file()

    reload = subprocess.run([sys.executable, "-c", RELOAD, str(checkpoint)], env=job_env(),
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert reload.returncode == 0, reload.stderr[-3000:]
    result = json.loads(reload.stdout.strip().splitlines()[-1])
    assert result["distributed"] and result["optimizer"] == "Adam"
    assert result["iterations"] == 2 * 40 // 2          # the optimizer state came back
    assert result["accuracy"] > 0.6, result              # 10 classes: chance is 0.1


@pytest.mark.parametrize("optimizer,accumulation", [("lamb", 1), ("lars", 2)])
def test_torch_loop_example_with_hvdscale_pieces(tmp_path, optimizer, accumulation):
    import torch
    from hvdscale.core import LRScheduleSpec, build_lr_schedule, scale_lr
    per_worker, rows = 32, 4096
    horovodrun(2, sys.executable, EXAMPLES / "torch_horovod_lamb.py", "--optimizer", optimizer,
               "--epochs", 1, "--batch-size", per_worker, "--accumulation", accumulation,
               "--train-rows", rows, "--noise-every", 4, "--out", tmp_path, timeout=600)
    logs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    params = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for a, b in zip(*params):
        assert a.numpy().tobytes() == b.numpy().tobytes(), "ranks disagree"

    # the learning rate of every update: hvdscale.core scaling + schedule for the global batch
    global_batch = 2 * per_worker * accumulation
    rule, base = ("sqrt", 1e-2) if optimizer == "lamb" else ("linear", 0.5)
    peak = scale_lr(base, 64, global_batch, rule=rule)
    steps_per_epoch = rows // 2 // (per_worker * accumulation)
    schedule = build_lr_schedule(LRScheduleSpec(warmup="linear", warmup_epochs=0.25,
                                                decay="polynomial", power=2.0),
                                 base, peak, steps_per_epoch, steps_per_epoch)
    assert logs[0]["global_batch"] == global_batch and logs[0]["peak_lr"] == peak
    assert logs[0]["lr"] == [schedule(t) for t in range(steps_per_epoch)]

    loss = np.array(logs[0]["loss"])
    assert loss[-8:].mean() < 0.9 * loss[:8].mean(), loss
    assert logs[0]["loss"] == logs[1]["loss"]
    # the noise scale every 4 updates, the same reading on both ranks
    assert logs[0]["noise"] == logs[1]["noise"]
    assert [n["step"] for n in logs[0]["noise"]] == list(range(0, steps_per_epoch, 4))
    assert logs[0]["noise"][-1]["gns_samples"] == len(logs[0]["noise"])
    assert logs[0]["noise"][-1]["gns_trace"] > 0
