"""A rank killed with SIGKILL mid-training (`horovodrun -np 2`, Gloo and MPI): the whole job
ends quickly with a non-zero exit and messages naming the lost rank, the newest checkpoint
is complete, and `--resume` ends with the parameters of an uninterrupted run."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, WORKERS, horovodrun, job_env, tool, wait_for
from hvdscale.engine.checkpoint import CheckpointStore, atomic_write

WORKER = WORKERS / "fault_train.py"
# 2048 examples / (2 x 64) = 16 steps per epoch; 40 steps; a checkpoint every 4 steps
RUN = ["--set", "framework=torch", "--set", "optimizer.name=lamb",
       "--set", "data.train_limit=2048", "--set", "data.test_limit=200",
       "--set", "batch.per_worker=64", "--set", "batch.reference=128",
       "--set", "train.max_steps=40", "--set", "lr.warmup_steps=4",
       "--set", "train.eval_every_steps=20", "--set", "checkpoint.every_steps=4",
       "--set", "checkpoint.keep=2", "--set", "log.progress=false",
       "--set", "log.tensorboard=false"]
KILL_AFTER_CHECKPOINT = 8
LOST_RANK_MESSAGE = {"gloo": ("Process name: 1", "Exit code: 137"),
                     "mpi": ("process rank 1", "signal 9")}


def params(path):
    with np.load(path) as npz:
        return {k: npz[k] for k in npz.files}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    dump = tmp_path_factory.mktemp("uninterrupted")
    horovodrun(2, sys.executable, WORKER, dump, *RUN, "--out", dump / "run", timeout=300)
    return params(dump / "params-rank0.npz")


@pytest.mark.multiproc
@pytest.mark.parametrize("controller", ["gloo", "mpi"])
def test_kill_one_rank_then_resume(controller, uninterrupted, tmp_path):
    dump, out = tmp_path / "dump", tmp_path / "run"
    ckpt = out / "checkpoints" / f"step-{KILL_AFTER_CHECKPOINT:08d}.json"
    cmd = [tool("horovodrun"), "-np", "2", f"--{controller}", sys.executable, str(WORKER),
           str(dump), *RUN, "--out", str(out)]
    proc = subprocess.Popen(cmd, env=job_env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        assert wait_for(ckpt.exists, 240, proc), "no checkpoint before the job ended"
        os.kill(int((dump / "pid-rank1").read_text()), signal.SIGKILL)
        killed_at = time.monotonic()
        output, _ = proc.communicate(timeout=60)      # the whole job must end within 60 s
        took = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    print(f"{controller}: job ended {took:.1f} s after kill -9 of rank 1, exit "
          f"{proc.returncode}")                        # for benchmarks/RESULTS.md (pytest -s)
    assert proc.returncode != 0, output[-3000:]
    assert took < 60
    for words in LOST_RANK_MESSAGE[controller]:            # the launcher names the lost rank
        assert words in output, output[-3000:]
    assert "hvdscale train: error: rank 0: lost a worker at step" in output or \
        controller == "mpi", output[-3000:]   # mpirun may kill rank 0 before it can say so
    assert not (dump / "params-rank0.npz").exists()          # it did not finish

    # the newest checkpoint is complete and loads (atomic writes, sidecar last)
    meta, state = CheckpointStore(out / "checkpoints").latest()
    assert meta["step"] >= KILL_AFTER_CHECKPOINT and meta["step"] < 40
    import torch
    loaded = torch.load(state, weights_only=True)
    assert set(loaded) >= {"model", "optimizer"}
    assert not list((out / "checkpoints").glob(".*.tmp"))

    proc = horovodrun(2, sys.executable, WORKER, dump, *RUN, "--out", out, "--resume",
                      controller=controller, timeout=300)
    assert f"resumed from {out / 'checkpoints' / meta['state_file']} at step {meta['step']}" \
        in proc.stdout
    resumed = params(dump / "params-rank0.npz")
    assert resumed.keys() == uninterrupted.keys()
    for key in uninterrupted:
        np.testing.assert_allclose(resumed[key], uninterrupted[key], rtol=1e-5, atol=1e-6,
                                   err_msg=key)
    other = params(dump / "params-rank1.npz")
    assert all(other[k].tobytes() == resumed[k].tobytes() for k in resumed)


@pytest.mark.multiproc
@pytest.mark.parametrize("controller", ["mpi", "gloo"])
def test_stopped_rank_is_ended_by_the_watchdog(controller, tmp_path):
    """SIGSTOP (a hung rank, not a dead one): MPI would wait forever and Gloo for its 30 s
    timeout; the step watchdog on the live rank ends the job after faults.step_timeout_s."""
    dump, out = tmp_path / "dump", tmp_path / "run"
    ckpt = out / "checkpoints" / f"step-{KILL_AFTER_CHECKPOINT:08d}.json"
    cmd = [tool("horovodrun"), "-np", "2", f"--{controller}", sys.executable, str(WORKER),
           str(dump), *RUN, "--set", "faults.step_timeout_s=12", "--out", str(out)]
    proc = subprocess.Popen(cmd, env=job_env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    stopped = None
    try:
        assert wait_for(ckpt.exists, 240, proc), "no checkpoint before the job ended"
        stopped = int((dump / "pid-rank1").read_text())
        os.kill(stopped, signal.SIGSTOP)
        stopped_at = time.monotonic()
        output, _ = proc.communicate(timeout=90)
        took = time.monotonic() - stopped_at
    finally:
        if stopped is not None:
            try:                          # let a surviving stopped rank see its SIGTERM/KILL
                os.kill(stopped, signal.SIGCONT)
                os.kill(stopped, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    print(f"{controller}: job ended {took:.1f} s after SIGSTOP of rank 1, exit {proc.returncode}")
    assert proc.returncode != 0, output[-3000:]
    assert "rank 0: no training step finished for 12 s" in output, output[-3000:]
    assert took < 60
    meta, _ = CheckpointStore(out / "checkpoints").latest()
    assert meta["step"] >= KILL_AFTER_CHECKPOINT


_WRITER = """
import sys
from hvdscale.engine.checkpoint import atomic_write
path, size = sys.argv[1], int(sys.argv[2])
print("ready", flush=True)
i = 1
while True:
    atomic_write(path, bytes([i % 256]) * size)
    i += 1
"""


@pytest.mark.parametrize("delay", [0.15, 0.4, 0.9])
def test_atomic_write_survives_kill_9(delay, tmp_path):
    """SIGKILL a process that keeps rewriting a 32 MiB file: the file always holds one
    complete version (all bytes equal, full size), never a mix or a truncation."""
    target, size = tmp_path / "state.bin", 32 << 20
    atomic_write(target, b"\x00" * size)
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(target), str(size)],
                            env=job_env(), stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    data = target.read_bytes()
    assert len(data) == size
    assert data.count(data[:1]) == size          # one version throughout
