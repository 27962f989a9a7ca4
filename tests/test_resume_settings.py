"""Honest resume (hvdscale/engine/resume.py): a setting changed on --resume is applied and
listed in one line, or refused in one line; never a traceback, never printed but unused.

- torch under `horovodrun -np 2`: a LAMB run paused at step 2 and resumed with another
  weight decay and betas prints "resumed with changed settings: ..." and trains with them
  (the optimizer state dict would have brought the old ones back): the checkpoint written
  after the resume holds the new hyper-parameters, and both ranks hold the same weights.
  Resuming it as LARS is refused by every rank in one line (it was a KeyError traceback).
- TensorFlow, one process: the same line.
"""
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, WORKERS, horovodrun, job_env

WORKER = WORKERS / "fault_train.py"
SMALL = ["--set", "data.train_limit=256", "--set", "data.test_limit=64",
         "--set", "batch.per_worker=32", "--set", "batch.reference=64",
         "--set", "train.max_steps=4", "--set", "lr.warmup_steps=1",
         "--set", "train.eval_every_steps=2", "--set", "checkpoint.every_steps=2",
         "--set", "optimizer.name=lamb", "--set", "optimizer.weight_decay=0.01",
         "--set", "log.progress=false", "--set", "log.tensorboard=false"]
CHANGED = ["--set", "optimizer.weight_decay=0.05", "--set", "optimizer.betas=[0.8,0.99]"]


def params(path):
    with np.load(path) as npz:
        return {k: npz[k] for k in npz.files}


@pytest.fixture(scope="module")
def paused_torch_run(tmp_path_factory):
    """OUT with a `horovodrun -np 2` torch LAMB run paused at step 2."""
    root = tmp_path_factory.mktemp("resume-settings")
    out = root / "run"
    horovodrun(2, sys.executable, WORKER, root / "dump-first", *SMALL,
               "--set", "framework=torch", "--out", out, "--stop-after-steps", 2,
               timeout=240)
    return out


@pytest.mark.multiproc
def test_changed_optimizer_settings_are_applied_and_listed(paused_torch_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(paused_torch_run, out)
    proc = horovodrun(2, sys.executable, WORKER, tmp_path / "dump", *SMALL, *CHANGED,
                      "--set", "framework=torch", "--out", out, "--resume", timeout=240)
    lines = [l for l in proc.stdout.splitlines() if "resumed with changed settings" in l]
    assert len(lines) == 1, proc.stdout[-3000:]      # rank 0 prints it, once
    assert lines[0].endswith("resumed with changed settings: optimizer.betas [0.9, 0.999] "
                             "-> [0.8, 0.99], optimizer.weight_decay 0.01 -> 0.05"), lines
    import torch
    state = torch.load(out / "checkpoints" / "step-00000004.pt", weights_only=True)
    groups = state["optimizer"]["param_groups"]
    assert [(g["weight_decay"], tuple(g["betas"])) for g in groups] == [(0.05, (0.8, 0.99))]
    rank0 = params(tmp_path / "dump" / "params-rank0.npz")
    rank1 = params(tmp_path / "dump" / "params-rank1.npz")
    for key in rank0:       # a rank still on the old settings would have drifted apart
        np.testing.assert_array_equal(rank0[key], rank1[key], err_msg=key)


@pytest.mark.multiproc
def test_another_optimizer_family_is_refused_on_every_rank(paused_torch_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(paused_torch_run, out)
    proc = horovodrun(2, sys.executable, WORKER, tmp_path / "dump", *SMALL,
                      "--set", "framework=torch", "--set", "optimizer.name=lars",
                      "--out", out, "--resume", check=False, timeout=240)
    output = proc.stdout + proc.stderr
    assert "<stderr>:Traceback" not in output and "KeyError" not in output, output[-3000:]
    assert proc.returncode != 0 and "Exit code: 2" in output, output[-3000:]
    expected = ('hvdscale train: error: checkpoint step 2 was written with optimizer.name '
                '"lamb", this run has "lars": it cannot change on resume (the optimizer state '
                'of one family does not fit another)')
    for rank in (0, 1):
        lines = [l for l in output.splitlines() if l.startswith(f"[{rank}]<stderr>:hvdscale")]
        killed = f"Process {rank} exit with status code 143" in output
        assert killed or (len(lines) == 1 and expected in lines[0]), output[-3000:]
    # nothing was trained or written: the checkpoint is still step 2
    assert sorted(p.name for p in (out / "checkpoints").glob("*.json")) == ["step-00000002.json"]


def test_tensorflow_resume_lists_the_changed_settings(tmp_path):
    """Keras keeps hyper-parameters as attributes a checkpoint does not restore, so the
    recipe's are the ones in use; TensorFlowTrainer.apply_optimizer_settings refuses to go on
    if they were not (the torch test above shows the values in the saved state)."""
    tf = [*SMALL, "--set", "framework=tensorflow", "--set", "batch.per_worker=64",
          "--no-horovod", "--out", tmp_path / "run"]
    run = lambda *extra: subprocess.run([sys.executable, "-m", "hvdscale", "train", *tf,
                                         *map(str, extra)], env=job_env(), cwd=REPO,
                                        capture_output=True, text=True, timeout=300)
    first = run("--stop-after-steps", 2)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = run("--resume", "--set", "optimizer.weight_decay=0.5")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert ("resumed with changed settings: optimizer.weight_decay 0.01 -> 0.5"
            in resumed.stdout.splitlines()), resumed.stdout[-2000:]
