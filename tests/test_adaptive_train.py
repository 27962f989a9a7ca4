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

    # the training curves count epochs in examples (the batch changed) and hold the batch
    # in force; `hvdscale report` draws it beside the accuracy and the lr
    steps = read_log(tmp_path / "whole" / "steps.jsonl")
    epoch_at = {line["step"]: line["epoch"] for line in steps}
    assert all(epoch_at[r["step"]] == r["epoch"] for r in records)
    assert steps[-1]["epoch"] == summary["epochs"]
    drawn = [line["global_batch"] for line in steps]
    assert drawn == sorted(drawn) and drawn[0] == PER_WORKER and drawn[-1] == batches[-1]
    report = subprocess.run([sys.executable, "-m", "hvdscale.cli", "report",
                             str(tmp_path / "whole"), "--out", str(tmp_path / "report")],
                            env=job_env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    page = (tmp_path / "report" / "index.html").read_text()
    assert "Accuracy, global batch and learning rate" in page
    from PIL import Image
    with Image.open(tmp_path / "report" / "global_batch.png") as image:
        assert image.size[1] > image.size[0]          # three panels stacked
        assert len(set(image.convert("L").getdata())) > 20

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
@pytest.mark.parametrize("framework", ["torch", "tensorflow"])
def test_both_ranks_read_the_same_noise_and_decide_the_same(framework, tmp_path):
    """horovodrun -np 2, both frameworks: the noise reading each rank computes for itself
    (from allreduced norms) is bitwise the same on both ranks, so are the batches in force,
    the batch grows (2 x 8 per micro-step), and the ranks end with the same parameters.
    TensorFlow trains one epoch (its per-micro-batch dispatch is the slower)."""
    from conftest import horovodrun
    plugins = REPO / "tests" / "plugins"
    args = [a for a in TINY if a != "--no-horovod"] + ADAPTIVE + [
        "--set", "batch.per_worker=8", "--set", "callbacks=[noise_readings:make]",
        "--set", f"framework={framework}"]
    if framework == "tensorflow":
        args += ["--set", "train.epochs=1"]
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


def test_elastic_needs_the_keep_global_batch_policy():
    from hvdscale.engine.elastic import check_elastic
    on = ["batch.adaptive.enabled=true", "batch.adaptive.max_global=1024", "noise_scale.every=5"]
    check_elastic(load_config(None, on))                   # keep_global_batch: the default
    with pytest.raises(ConfigError, match="elastic.policy rescale_lr does not combine with "
                                          "batch.adaptive"):
        check_elastic(load_config(None, on + ["elastic.policy=rescale_lr"]))


def elastic_engine(tmp_path, workers_now):
    """A real Engine in elastic mode, in this process without Horovod (so nothing resets it):
    the world size is set by hand, and `_enter_world` is called as hvd.elastic.run would after
    a reset, with the committed loop fields."""
    from hvdscale.comm import Comm
    from hvdscale.data import build_sources
    from hvdscale.engine.loop import Engine
    from hvdscale.engine.reporting import MetricsLog
    from hvdscale.torch.trainer import TorchTrainer
    cfg = load_config(None, [a for a in TINY[1:] + ADAPTIVE if a != "--set"])
    comm = Comm("torch")
    comm.size = workers_now
    train, evaluation = build_sources(cfg, 0, workers_now)
    engine = Engine(cfg, comm, TorchTrainer(cfg, comm, threads=1), train, evaluation, tmp_path,
                    elastic=True, sources=build_sources, echo=lambda *a, **k: None)
    engine.backend.elastic = True
    engine.backend.build()
    engine._log = MetricsLog(tmp_path / "metrics.jsonl")
    engine.callbacks.run_begin(engine)
    return cfg, engine


def test_elastic_world_change_keeps_the_decided_batch_lr_gain_and_noise_state(tmp_path):
    """A job started on 2 workers of 16 (B_0 = 32, a budget of 2 x 4096 examples) had grown to
    128 with lr gain 2.5 when it lost a worker: the survivor re-enters the world from the commit and runs 128 as 1 x 16 x 8,
    with the committed gain in the lr and the committed noise estimator; the commit carries
    that state (ElasticRun._committed)."""
    from hvdscale.engine.lr import plan_lr
    cfg, engine = elastic_engine(tmp_path, workers_now=1)
    noise = {"estimator": {"ema": 0.9, "g2": 0.25, "trace": 40.0, "weight": 0.99,
                           "samples": 17, "skipped": 0},
             "steps": 100, "last": {"b_simple": 160.0, "gns_samples": 17}}
    committed = {"step": 100, "examples": 60 * 32 + 20 * 64 + 20 * 128, "train_time_s": 3.0,
                 "skipped_steps": 0, "reference_workers": 2, "last_accuracy": 0.7,
                 "tracker": engine.evaluation.tracker.state_dict(),
                 "callbacks": {"adaptive_batch": {
                     "segments": [[0, 0, 32, 1.0], [60, 60 * 32, 64, 1.7],
                                  [80, 60 * 32 + 20 * 64, 128, 2.5]], "noise": noise}}}
    engine.elastic._enter_world(engine, committed)
    assert (engine.global_batch, engine.per_step) == (128, 128)
    assert engine.backend.cfg.batch.accumulation == 8
    assert engine.batches.steps_per_epoch == EXAMPLES // 128
    # the run keeps its example budget: the reference plan at 32 per step
    budget = EPOCHS * (EXAMPLES // 32) * 32
    assert engine.total_steps == 100 + math.ceil((budget - committed["examples"]) / 128)
    # the lr: the reference world's schedule in examples seen, times the committed gain
    reference = plan_lr(cfg, 32, EXAMPLES // 32, EPOCHS * (EXAMPLES // 32)).schedule
    position = committed["examples"] / 32
    assert position == 180 and engine.lr.schedule(100) == pytest.approx(
        reference(180) * 2.5, rel=1e-12)
    assert engine.backend.noise_scale.state_dict()["estimator"] == noise["estimator"]
    assert engine.backend.noise_scale.state_dict()["steps"] == 100
    event = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert (event["event"], event["workers"], event["global_batch"], event["accumulation"]) \
        == ("workers", 1, 128, 8)
    # what the next commit carries: the decisions and the estimator, as JSON
    carried = json.loads(json.dumps(
        engine.elastic._committed(engine)["callbacks"]["adaptive_batch"]))
    assert carried == committed["callbacks"]["adaptive_batch"]
    # back to two workers: the same batch as 2 x 16 x 4
    engine.comm.size = 2
    engine.elastic._enter_world(engine, dict(committed, callbacks={"adaptive_batch": carried}))
    assert engine.global_batch == 128 and engine.backend.cfg.batch.accumulation == 4


def test_elastic_refuses_a_decided_batch_the_new_world_cannot_split():
    from hvdscale.engine.adaptive import AdaptiveBatch
    cfg = load_config(None, [a for a in TINY[1:] + ADAPTIVE if a != "--set"])
    batch = AdaptiveBatch(cfg, workers=1)
    batch.load_state_dict({"segments": [[0, 0, 16, 1.0], [40, 640, 48, 2.0]], "noise": None})
    with pytest.raises(ConfigError, match=r"decided global batch 48 cannot be split over 2 "
                                          r"workers of batch.per_worker 16"):
        batch._enter_world(reference_workers=1, workers=2)
    batch._enter_world(reference_workers=1, workers=3)      # 48 = 3 x 16 x 1
    assert (batch.granularity, batch.rule.max_global, batch.rule.min_global) == (48, 240, 48)


@pytest.mark.multiproc
@pytest.mark.slow
def test_elastic_run_that_loses_a_worker_keeps_the_decided_batch(tmp_path):
    """A real `--elastic` run (horovodrun --min-np 1 --max-np 2, two local "hosts"): once the
    batch has grown and a commit holds it, one worker is killed; the survivor re-enters the
    world at the committed batch, now 1 x 16 x G/16, and finishes the run's example budget."""
    import os
    import signal
    from test_elastic import DISCOVER, events, last_commit, replace_hosts, wait_until
    from conftest import tool
    hosts, dump, out = tmp_path / "hosts.txt", tmp_path / "dump", tmp_path / "run"
    replace_hosts(hosts, "localhost:1\n127.0.0.1:1\n")
    args = [a for a in TINY if a != "--no-horovod"] + ADAPTIVE + [
        "--set", "train.epochs=8", "--set", "train.eval_every_steps=null",
        "--set", "checkpoint.every_epochs=null", "--set", "elastic.commit_every=5"]
    cmd = [tool("horovodrun"), "-np", "2", "--min-np", "1", "--max-np", "2",
           "--host-discovery-script", str(DISCOVER), "--network-interface", "lo",
           sys.executable, str(WORKERS / "fault_elastic.py"), str(dump), *args,
           "--out", str(out)]
    proc = subprocess.Popen(cmd, env=job_env(HVDSCALE_HOSTS_FILE=hosts), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        grown = lambda: [e for e in events(out) if e.get("event") == "batch"
                         and e["global_batch"] >= 64]
        wait_until(lambda: grown(), 180, proc, "the batch to grow on two workers")
        wait_until(lambda: last_commit(out) >= grown()[0]["step"] + 5, 60, proc,
                   "a commit after the growth")
        os.kill(int((dump / "pid-127.0.0.1").read_text()), signal.SIGKILL)
        output, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, output[-4000:]
    log = events(out)
    alone = [e for e in log if e.get("event") == "workers" and e["workers"] == 1]
    assert alone, output[-3000:]
    alone = alone[0]
    decided = [e for e in log if e.get("event") == "batch" and e["step"] <= alone["step"]]
    assert alone["global_batch"] == decided[-1]["global_batch"] >= 64
    assert alone["accumulation"] == alone["global_batch"] // PER_WORKER
    summary = log[-1]
    assert summary["event"] == "summary" and summary["workers"] == 1
    assert summary["global_batch"] >= alone["global_batch"]
    assert 8 <= summary["epochs"] < 8 + summary["global_batch"] / EXAMPLES
