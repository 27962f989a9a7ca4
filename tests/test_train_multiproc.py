"""`hvdscale train` under `horovodrun -np 2`: both ranks end with identical parameters, the
evaluation sharded over the ranks gives exactly the single-process accuracy of the same model,
and a 2-worker run paused and resumed matches an uninterrupted one."""
import json
import sys

import numpy as np
import pytest

from conftest import WORKERS, horovodrun, run_job

pytestmark = pytest.mark.multiproc
WORKER = WORKERS / "train_worker.py"
# 1024 examples / (2 ranks x 32) = 16 steps per epoch; an odd test set splits unevenly
COMMON = ["--set", "data.train_limit=1024", "--set", "data.test_limit=301",
          "--set", "batch.per_worker=32", "--set", "batch.reference=64",
          "--set", "train.epochs=1", "--set", "lr.warmup_steps=2",
          "--set", "train.eval_every_steps=8", "--set", "log.progress=false"]
OPTIMIZER = {"torch": "lamb", "tensorflow": "lamb"}


def params(path):
    with np.load(path) as npz:
        return {k: npz[k] for k in npz.files}


@pytest.mark.parametrize("framework", ["torch", "tensorflow"])
def test_two_workers_agree_and_evaluate_like_one_process(framework, tmp_path):
    args = COMMON + ["--set", f"framework={framework}",
                     "--set", f"optimizer.name={OPTIMIZER[framework]}"]
    out = tmp_path / "run"
    horovodrun(2, sys.executable, WORKER, "train", tmp_path / "dump", *args, "--out", out,
               timeout=300)
    p0, p1 = params(tmp_path / "dump" / "params-rank0.npz"), params(tmp_path / "dump" / "params-rank1.npz")
    assert p0.keys() == p1.keys() and len(p0) > 4
    for key in p0:
        assert p0[key].tobytes() == p1[key].tobytes(), f"{key} differs between ranks"

    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    records, summary = lines[:-1], lines[-1]
    assert [r["step"] for r in records] == [8, 16]
    assert all(r["workers"] == 2 and r["global_batch"] == 64 for r in records)
    assert all(r["test_examples"] == 301 for r in records)   # every test example once
    assert summary["workers"] == 2 and summary["images_per_sec"] > 0
    assert summary["images_per_sec_per_worker"] == pytest.approx(summary["images_per_sec"] / 2)
    assert summary["final_test_accuracy"] > 0.4               # it learned (chance is 0.1)

    # the same final model evaluated by one process over the whole test set
    proc = run_job([sys.executable, WORKER, "evaluate", out, *args], timeout=300)
    single = json.loads(proc.stdout.strip().splitlines()[-1])
    assert single["count"] == 301 and single["step"] == 16
    assert single["accuracy"] == summary["final_test_accuracy"]


def test_two_worker_resume_equals_uninterrupted(tmp_path):
    args = COMMON + ["--set", "framework=torch", "--set", "checkpoint.every_steps=4",
                     "--set", "log.tensorboard=false"]
    horovodrun(2, sys.executable, WORKER, "train", tmp_path / "whole", *args,
               "--out", tmp_path / "a", timeout=300)
    horovodrun(2, sys.executable, WORKER, "train", tmp_path / "first", *args,
               "--out", tmp_path / "b", "--stop-after-steps", 6, timeout=300)
    horovodrun(2, sys.executable, WORKER, "train", tmp_path / "second", *args,
               "--out", tmp_path / "b", "--resume", timeout=300)
    whole, resumed = params(tmp_path / "whole" / "params-rank1.npz"), params(tmp_path / "second" / "params-rank1.npz")
    for key in whole:
        np.testing.assert_allclose(resumed[key], whole[key], rtol=1e-5, atol=1e-6, err_msg=key)
