"""The study's in-process run is the Engine's loop (issue 21, "one loop"): the same recipe gives
the same evaluations, learning rates and losses as `hvdscale train`, and the study's extras
(interpolated crossing, window past the target, snapshots, divergence) ride on it as a
callback."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, job_env

pytest.importorskip("torch")
DATA = Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="Debian's dataset-fashion-mnist missing")

RECIPE = "pipelines/sweep_sgd.yaml"
OVERRIDES = ["data.train_limit=2048", "data.test_limit=500", "batch.per_worker=32",
             "batch.reference=16", "train.epochs=2", "train.eval_every_steps=8",
             "train.eval_every_epochs=null", "lr.warmup_epochs=0.25", "lr.decay=cosine",
             "train.target_accuracy=0.99", "train.seed=3", "faults.step_timeout_s=null",
             "checkpoint.every_epochs=null"]


def _arrays(overrides):
    from hvdscale.config import load_config
    from hvdscale.data.arrays import load_arrays

    cfg = load_config(RECIPE, overrides)
    train, test = load_arrays(cfg.data, seed=cfg.train.seed)
    return cfg, train, test


def test_study_run_is_the_train_command_loop(tmp_path):
    from hvdscale.study.engine_run import run_with_engine

    proc = subprocess.run([sys.executable, "-m", "hvdscale.cli", "train", RECIPE, "--no-horovod",
                           "--out", str(tmp_path / "cli"), *sum([["--set", o] for o in OVERRIDES],
                                                               [])],
                          env=job_env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "cli" / "metrics.jsonl").open()]
    evals = [r for r in records if "test_accuracy" in r and r.get("event") != "summary"]
    cfg, train, test = _arrays(OVERRIDES)
    res = run_with_engine(cfg, train, test, test)      # validation = the test set, as `train`
    assert res.status == "censored" and res.steps_run == 2 * (2048 // 32)
    assert [e[0] for e in res.evals] == [r["step"] for r in evals]
    assert [e[1] for e in res.evals] == [r["test_accuracy"] for r in evals]
    assert [e[3] for e in res.evals] == pytest.approx([r["lr"] for r in evals], rel=1e-12)
    assert [e[2] for e in res.evals] == pytest.approx([r["train_loss"] for r in evals], rel=1e-9)
    assert res.test_accuracy == evals[-1]["test_accuracy"]
    # the rule (linear: 2 x base_lr at twice the reference batch), warm-up and cosine decay
    # are the recipe's: the lr rises from base_lr to 2 x base_lr, then falls to ~0
    lrs = [e[3] for e in res.evals]
    assert 0.02 < lrs[0] < 0.039 < max(lrs) <= 0.04 and lrs[-1] < 0.01 * max(lrs)


def test_crossing_window_and_snapshots():
    from hvdscale.study.engine_run import run_with_engine

    overrides = OVERRIDES + ["train.target_accuracy=0.6", "lr.decay=constant"]
    cfg, train, test = _arrays(overrides)
    res = run_with_engine(cfg, train, test, test,
                          continue_after_target=0.5, snapshot_every=4)
    assert res.status == "reached"
    i = next(k for k, e in enumerate(res.evals) if e[1] >= 0.6)
    (s0, a0), (s1, a1) = res.evals[i - 1][:2], res.evals[i][:2]
    assert s0 < res.steps_to_target <= s1
    assert res.steps_to_target == pytest.approx(s0 + (0.6 - a0) / (a1 - a0) * (s1 - s0))
    assert res.steps_run == pytest.approx(1.5 * res.steps_to_target, abs=1.0)
    steps = [s["step"] for s in res.snapshots]
    assert steps == list(range(4, res.steps_run + 1, 4))
    assert steps[0] < res.steps_to_target < steps[-1]
    assert 0.5 < res.test_accuracy <= 1.0


def test_divergence_ends_the_run_at_chance():
    from hvdscale.study.engine_run import CHANCE, run_with_engine

    cfg, train, test = _arrays(OVERRIDES + ["optimizer.base_lr=500", "lr.warmup=none"])
    res = run_with_engine(cfg, train, test, test)
    assert res.status == "diverged" and res.steps_to_target is None
    assert res.diverged_at is not None and res.steps_run < 2 * (2048 // 32)
    assert res.test_accuracy == CHANCE
