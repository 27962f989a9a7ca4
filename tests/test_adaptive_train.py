"""batch.adaptive in a real `hvdscale train` run (one process, torch): bad settings refused
with one line, the logged global batch grows, the lr follows the recipe's schedule in examples
seen times the logged gain, and a run paused mid-way and resumed makes the same decisions
and ends with the same parameters as the uninterrupted run."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, WORKERS, job_env
from hvdscale.config import load_config
from hvdscale.core.schedules import LRScheduleSpec, build_lr_schedule
from hvdscale.errors import ConfigError

WORKER = WORKERS / "train_worker.py"
PER_WORKER, EXAMPLES, EPOCHS = 16, 4096, 2
# mlp + SGD on 4096 Fashion-MNIST images: B_noise rises from ~30 to ~240 within 150 steps of
# 16, so the batch grows several times in a run of a few seconds
TINY = ["--no-horovod", "--set", "model.name=mlp", "--set", f"data.train_limit={EXAMPLES}",
        "--set", "data.test_limit=500", "--set", f"batch.per_worker={PER_WORKER}",
        "--set", f"batch.reference={PER_WORKER}", "--set", "optimizer.name=sgd",
        "--set", "optimizer.base_lr=0.05", "--set", "lr.warmup_steps=5",
        "--set", "lr.scaling=linear", "--set", f"train.epochs={EPOCHS}",
        "--set", "train.threads=1", "--set", "train.eval_every_steps=50",
        "--set", "log.progress=false", "--set", "log.tensorboard=false",
        "--set", "noise_scale.every=1"]
ADAPTIVE = ["--set", "batch.adaptive.enabled=true", "--set", "batch.adaptive.max_global=256",
            "--set", "batch.adaptive.every_steps=20", "--set", "batch.adaptive.min_samples=10"]


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "hvdscale.cli", "train", *map(str, args)],
                          env=job_env(), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("extra, words", [
    (["--set", "batch.adaptive.max_global=8"],
     "batch.adaptive.max_global (8) is below the global batch of one worker"),
    (["--set", "batch.adaptive.max_global=200"],
     "batch.adaptive.max_global (200) is not a multiple of batch.per_worker (16)"),
    (["--set", "noise_scale.every=0"],
     "batch.adaptive.enabled needs the online noise scale, which noise_scale.every = 0"),
    (["--set", "batch.adaptive.max_global=null"], "batch.adaptive.max_global: required"),
    (["--set", "batch.adaptive.rule=cubic"], "batch.adaptive.rule: 'cubic' is not one of"),
])
def test_bad_settings_are_refused_with_one_line(extra, words, tmp_path):
    proc = cli(*TINY, *ADAPTIVE, *extra, "--out", tmp_path / "run", timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hvdscale train: error:"), proc.stderr
    assert words in lines[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_worker_count_checks_refuse_with_the_setting_named():
    from hvdscale.engine.adaptive import AdaptiveBatch
    base = TINY[1:] + ADAPTIVE[:-2]      # drop --no-horovod (not a --set)
    cfg = load_config(None, [a for a in base if a != "--set"] + ["batch.adaptive.max_global=48"])
    AdaptiveBatch(cfg, workers=3)          # 48 = 3 x 16: fine
    with pytest.raises(ConfigError, match=r"max_global \(48\) is not a multiple of per_worker "
                                          r"x workers = 16 x 2"):
        AdaptiveBatch(cfg, workers=2)
    with pytest.raises(ConfigError, match=r"max_global \(48\) is below the global batch the "
                                          r"run starts from \(64 = 4 x 16 x 1\)"):
        AdaptiveBatch(cfg, workers=4)


def worker(dump, *args):
    proc = subprocess.run([sys.executable, str(WORKER), "train", str(dump), *map(str, args)],
                          env=job_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def read_log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def expected_lr(step, events, start_batch, base):
    """lr of 0-based `step`, worked out from the logged decisions: examples seen before it,
    over the start batch, into the recipe's schedule, times the gain in force."""
    examples, at, batch, gain = 0, 0, start_batch, 1.0
    for event in events:
        if event["step"] > step:
            break
        examples += (event["step"] - at) * batch
        at, batch, gain = event["step"], event["global_batch"], event["lr_gain"]
    examples += (step - at) * batch
    position = examples / start_batch
    low = base(math.floor(position))
    return (low + (base(math.floor(position) + 1) - low) * (position % 1)) * gain


@pytest.mark.slow
def test_batch_grows_and_resume_equals_uninterrupted(tmp_path):
    args = [*TINY, *ADAPTIVE]
    worker(tmp_path / "whole", *args, "--set", "log.tensorboard=true", "--out",
           tmp_path / "whole")
    log = read_log(tmp_path / "whole" / "metrics.jsonl")
    events = [r for r in log if r.get("event") == "batch"]
    records = [r for r in log if "event" not in r]
    summary = log[-1]
    batches = [e["global_batch"] for e in events]
    # the batch grows, never shrinks, stays on multiples of the micro-batch within the bounds
    assert batches == sorted(batches) and batches[-1] >= 4 * PER_WORKER, batches
    assert all(b % PER_WORKER == 0 and b <= 256 for b in batches)
    assert all(e["accumulation"] == e["global_batch"] // PER_WORKER for e in events)
    assert all(e["samples"] >= 10 and e["step"] % 20 == 0 for e in events)
    # every evaluation reports the batch in force at its step
    for record in records:
        in_force = [e["global_batch"] for e in events if e["step"] <= record["step"]]
        assert record["global_batch"] == (in_force[-1] if in_force else PER_WORKER)
    # the example budget is kept: fewer steps than at batch 16, the same epochs (+ < 1 batch)
    planned = EPOCHS * EXAMPLES // PER_WORKER
    assert summary["steps"] < planned
    assert EPOCHS <= summary["epochs"] < EPOCHS + batches[-1] / EXAMPLES
    assert summary["global_batch"] == batches[-1]
    # lr: the recipe's schedule (planned at batch 16) in examples seen, times the gain
    base = build_lr_schedule(LRScheduleSpec(warmup="linear", warmup_steps=5, decay="cosine"),
                             0.05, 0.05, EXAMPLES // PER_WORKER, planned)
    for record in records:
        assert record["lr"] == pytest.approx(expected_lr(record["step"] - 1, events,
                                                         PER_WORKER, base), rel=1e-9)
    # adascale: 1 <= gain <= scale
    assert all(1.0 <= e["lr_gain"] <= e["global_batch"] / PER_WORKER + 1e-9 for e in events)

    # the decisions in TensorBoard too
    try:
        from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    except ImportError:
        EventFileLoader = None
    if EventFileLoader is not None:
        [path] = (tmp_path / "whole" / "tensorboard").glob("events.out.tfevents.*")
        scalars = [(e.step, v.tag, v.tensor.float_val[0] if v.HasField("tensor")
                    else v.simple_value)
                   for e in EventFileLoader(str(path)).Load() for v in e.summary.value]
        assert [(s, v) for s, t, v in scalars if t == "adaptive/global_batch"] == \
            [(e["step"], e["global_batch"]) for e in events]
        assert [s for s, t, v in scalars if t == "adaptive/lr_gain"] == [e["step"] for e in events]

    # paused after the second growth, resumed: same decisions, same parameters
    pause = events[1]["step"] + 10
    worker(tmp_path / "first", *args, "--out", tmp_path / "split", "--stop-after-steps", pause)
    proc = worker(tmp_path / "second", *args, "--out", tmp_path / "split", "--resume")
    assert f"adaptive batch: resumed at global batch {events[1]['global_batch']}" in proc.stdout
    split = read_log(tmp_path / "split" / "metrics.jsonl")
    assert [e for e in split if e.get("event") == "batch"] == events
    split_records = [r for r in split if "event" not in r]
    assert [(r["step"], r["global_batch"], r["test_accuracy"], r["lr"]) for r in split_records] \
        == [(r["step"], r["global_batch"], r["test_accuracy"], r["lr"]) for r in records]
    whole = np.load(tmp_path / "whole" / "params-rank0.npz")
    resumed = np.load(tmp_path / "second" / "params-rank0.npz")
    paused = np.load(tmp_path / "first" / "params-rank0.npz")
    for key in whole.files:
        np.testing.assert_array_equal(resumed[key], whole[key], err_msg=key)
    assert any(not np.allclose(paused[k], whole[k]) for k in whole.files)


@pytest.mark.multiproc
def test_both_ranks_read_the_same_noise_and_decide_the_same(tmp_path):
    """horovodrun -np 2: the noise reading each rank computes for itself (from allreduced
    norms) is bitwise the same on both ranks, so are the batches in force, the batch grows
    (2 x 8 per micro-step), and the ranks end with the same parameters."""
    from conftest import horovodrun
    plugins = REPO / "tests" / "plugins"
    args = [a for a in TINY if a != "--no-horovod"] + ADAPTIVE + [
        "--set", "batch.per_worker=8", "--set", "callbacks=[noise_readings:make]"]
    horovodrun(2, sys.executable, WORKER, "train", tmp_path / "dump", *args,
               "--out", tmp_path / "run", PYTHONPATH=f"{plugins}:{REPO}",
               HVDSCALE_TEST_READINGS_DIR=tmp_path)
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    assert len(rank0) > 5 and rank0 == rank1
    assert all(row[2].get("gns_samples") for row in rank0)
    events = [r for r in read_log(tmp_path / "run" / "metrics.jsonl") if r.get("event") == "batch"]
    batches = [e["global_batch"] for e in events]
    assert batches and batches[-1] >= 64 and all(b % 16 == 0 for b in batches)
    assert all(e["accumulation"] == e["global_batch"] // 16 for e in events)
    p0 = np.load(tmp_path / "dump" / "params-rank0.npz")
    p1 = np.load(tmp_path / "dump" / "params-rank1.npz")
    for key in p0.files:
        np.testing.assert_array_equal(p0[key], p1[key], err_msg=key)
