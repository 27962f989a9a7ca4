"""--resume continues exactly: a run paused mid-epoch (--stop-after-steps) and resumed ends
with the parameters of an uninterrupted run (model, optimizer state, schedule position and
data order all restored) and one metrics log across both sessions. One process, torch; the
same under `horovodrun -np 2` in both frameworks, paused by SIGTERM instead, is
tests/test_preemption.py."""
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, WORKERS, job_env

WORKER = WORKERS / "train_worker.py"
# 512 examples / 32 per step = 16 steps per epoch; 24 steps = 1.5 epochs; pause at step 11
COMMON = ["--set", "data.train_limit=512", "--set", "data.test_limit=200",
          "--set", "batch.per_worker=32", "--set", "batch.reference=32",
          "--set", "train.max_steps=24", "--set", "train.epochs=2",
          "--set", "lr.warmup_steps=3", "--set", "train.eval_every_steps=8",
          "--set", "checkpoint.every_steps=5", "--set", "train.threads=1",
          "--set", "log.progress=false", "--set", "log.tensorboard=false"]


def worker(*args, timeout=300):
    proc = subprocess.run([sys.executable, str(WORKER), *map(str, args)], env=job_env(),
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def load_params(path):
    with np.load(path) as npz:
        return {k: npz[k] for k in npz.files}


@pytest.mark.parametrize("framework,optimizer", [("torch", "lamb")])
def test_resume_equals_uninterrupted(framework, optimizer, tmp_path):
    common = COMMON + ["--set", f"framework={framework}", "--set", f"optimizer.name={optimizer}",
                       "--no-horovod"]
    worker("train", tmp_path / "whole", *common, "--out", tmp_path / "whole")
    proc = worker("train", tmp_path / "first", *common, "--out", tmp_path / "split",
                  "--stop-after-steps", 11)
    assert "stopped after 11 steps at step 11 of 24" in proc.stdout
    worker("train", tmp_path / "second", *common, "--out", tmp_path / "split", "--resume")

    whole = load_params(tmp_path / "whole" / "params-rank0.npz")
    paused = load_params(tmp_path / "first" / "params-rank0.npz")
    resumed = load_params(tmp_path / "second" / "params-rank0.npz")
    assert whole.keys() == resumed.keys()
    for key in whole:
        np.testing.assert_allclose(resumed[key], whole[key], rtol=1e-5, atol=1e-6, err_msg=key)
    # the pause really happened before the end: those parameters differ
    assert any(not np.allclose(paused[k], whole[k]) for k in whole)

    lines = [json.loads(l) for l in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(l) for l in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in lines if "event" not in r]
    assert steps == [8, 16, 24]                  # one log across both sessions
    assert lines[-1]["event"] == "summary" and lines[-1]["steps"] == 24
    for a, b in zip(lines[:-1], reference[:-1]):
        assert a["test_accuracy"] == pytest.approx(b["test_accuracy"], abs=1e-9)
        assert a["lr"] == pytest.approx(b["lr"])


def test_resume_refuses_a_checkpoint_of_another_framework(tmp_path):
    common = COMMON + ["--no-horovod", "--set", "optimizer.name=sgd"]
    worker("train", tmp_path / "a", *common, "--out", tmp_path / "run", "--stop-after-steps", 5)
    proc = subprocess.run([sys.executable, "-m", "hvdscale.cli", "train", *common,
                           "--set", "framework=tensorflow", "--out", tmp_path / "run",
                           "--resume"], env=job_env(), cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2
    assert ('--resume: checkpoint step 5 was written with framework "torch", this run has '
            '"tensorflow": it cannot change on resume' in proc.stderr.strip().splitlines()[-1])
