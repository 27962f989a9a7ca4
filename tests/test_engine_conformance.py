"""Engine conformance tests on the NumPy fake backend (tests/plugins/hvdscale_numpy): what the
engine promises every backend -- the metrics.jsonl contract, the LR schedule it hands each
step, checkpoints and keep, bit-identical resume, the non-finite policies, stop at target --
checked through `hvdscale train --no-horovod` in a subprocess that must not import torch or
TensorFlow. Each run takes a second or two; the fake is small enough that the runs, not
the frameworks, are what is timed.

The same checks are a template for a new backend: point RECIPE's `framework` (and `plugins`)
at it (docs/extending.md, "A new backend").
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from hvdscale.core.schedules import LRScheduleSpec, build_lr_schedule

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = Path(__file__).resolve().parent / "plugins"

# Runs `hvdscale train` once per argv in one interpreter (start-up and imports paid once),
# then reports the exit codes and whether a framework was imported along the way.
DRIVER = r"""
import json, sys
from hvdscale.cli import main
codes = []
for argv in json.loads(sys.argv[1]):
    try:
        codes.append(main(argv))
    except SystemExit as stop:
        codes.append(stop.code)
print("CONFORMANCE " + json.dumps({"codes": codes, "torch": "torch" in sys.modules,
                                   "tensorflow": "tensorflow" in sys.modules}))
"""

RECIPE = {
    "name": "conformance", "framework": "numpy", "plugins": ["hvdscale_numpy"],
    "callbacks": ["hvdscale_numpy.trace:Trace"],
    "model": {"name": "mlp"},
    "data": {"kind": "fashion_mnist", "train_limit": 512, "test_limit": 256},
    "batch": {"per_worker": 32, "reference": 8, "accumulation": 1},     # 16 steps per epoch
    "optimizer": {"name": "sgd", "base_lr": 0.02, "momentum": 0.9, "weight_decay": 1e-4},
    "lr": {"scaling": "sqrt", "warmup": "linear", "warmup_epochs": 0.5, "decay": "cosine",
           "end_lr": 0.001},
    "train": {"epochs": 2, "eval_every_steps": 8, "target_accuracy": 0.7, "seed": 3},
    "checkpoint": {"every_steps": 5, "keep": 3},
    "log": {"tensorboard": False, "progress": False},
}
TOTAL_STEPS = 32


def run_sessions(tmp_path, sessions, recipe=None, name="recipe.yaml"):
    """Write the recipe, run each [args...] as `hvdscale train RECIPE args --no-horovod`
    (in one process), and return (exit codes, stdout + stderr). Fails if torch or TF got
    imported."""
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe or RECIPE))
    argvs = [["train", str(path), "--no-horovod", *args] for args in sessions]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT), str(PLUGINS), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(argvs)], env=env,
                          capture_output=True, text=True, timeout=120)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("CONFORMANCE ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(lines[-1][len("CONFORMANCE "):])
    assert not report["torch"] and not report["tensorflow"], \
        f"the engine path imported a framework: {report}"
    return report["codes"], proc.stdout + proc.stderr


def with_changes(**sections):
    """RECIPE with some sections' keys replaced, e.g. with_changes(train={"max_steps": 8})."""
    recipe = json.loads(json.dumps(RECIPE))
    for section, values in sections.items():
        if isinstance(values, dict):
            recipe.setdefault(section, {}).update(values)
        else:
            recipe[section] = values
    return recipe


def read_log(out):
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "event" not in r], [r for r in lines if r.get("event") == "summary"]


def trace(out, n):
    return json.loads((out / f"trace-{n}.json").read_text())


def params(path):
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def checkpoint_steps(out):
    return sorted(int(p.stem.split("-")[1]) for p in (out / "checkpoints").glob("step-*.npz"))


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """One uninterrupted run of RECIPE, shared by the tests that only read it; with the
    built-in progress bar and TensorBoard callbacks on (the framework-import check covers
    them too)."""
    tmp = tmp_path_factory.mktemp("baseline")
    out = tmp / "out"
    codes, err = run_sessions(tmp, [["--out", str(out)]],
                              with_changes(log={"tensorboard": True, "progress": True}))
    assert codes == [0], err[-3000:]
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    return out


# ------------------------------------------------------------------ metrics.jsonl contract
def test_metrics_log_has_one_record_per_evaluation_and_a_summary(baseline):
    records, summaries = read_log(baseline)
    assert [r["step"] for r in records] == [8, 16, 24, 32]
    for r in records:
        assert {"step", "epoch", "framework", "workers", "global_batch", "lr", "train_loss",
                "test_accuracy", "images_per_sec", "elapsed_s"} <= set(r)
        assert r["framework"] == "numpy" and r["workers"] == 1 and r["global_batch"] == 32
        assert r["epoch"] == pytest.approx(r["step"] / 16)
        assert r["test_examples"] == 256 and math.isfinite(r["train_loss"])
    assert len(summaries) == 1
    s = summaries[0]
    assert {"final_test_accuracy", "best_test_accuracy", "target_accuracy", "steps_to_target",
            "time_to_target_s", "images_per_sec", "images_per_sec_per_worker", "workers",
            "global_batch", "optimizer"} <= set(s)
    accuracies = [r["test_accuracy"] for r in records]
    assert s["steps"] == TOTAL_STEPS and s["optimizer"] == "sgd"
    assert s["final_test_accuracy"] == accuracies[-1]
    assert s["best_test_accuracy"] == max(accuracies)
    # the first evaluation at or above the target, found here from the records
    hits = [r for r in records if r["test_accuracy"] >= RECIPE["train"]["target_accuracy"]]
    assert hits, f"the fake should reach the target in this run: {accuracies}"
    assert s["steps_to_target"] == hits[0]["step"]
    assert s["time_to_target_s"] == pytest.approx(hits[0]["elapsed_s"])
    # the model learns: test accuracy well above chance (10 classes) by the end
    assert accuracies[-1] > 0.6


# ------------------------------------------------------------------ the LR the backend sees
def test_every_step_gets_the_scaled_warmed_up_and_decayed_lr(baseline):
    lrs = trace(baseline, 0)["lrs"]
    assert len(lrs) == TOTAL_STEPS
    base = RECIPE["optimizer"]["base_lr"]
    peak = base * math.sqrt(32 / 8)                  # sqrt scaling: global 32, reference 8
    warmup, end = 8, RECIPE["lr"]["end_lr"]           # 0.5 epochs of 16 steps
    for t, lr in enumerate(lrs):                      # the formulas of core/schedules.py
        if t < warmup:
            want = base + (peak - base) * t / warmup
        else:
            p = (t - warmup) / (TOTAL_STEPS - warmup)
            want = end + (peak - end) * (1 + math.cos(math.pi * p)) / 2
        assert lr == pytest.approx(want, rel=1e-12), f"step {t}"
    spec = LRScheduleSpec(warmup="linear", warmup_epochs=0.5, decay="cosine", end_lr=end)
    schedule = build_lr_schedule(spec, base, peak, 16, TOTAL_STEPS)
    assert lrs == [schedule(t) for t in range(TOTAL_STEPS)]
    records, _ = read_log(baseline)
    assert [r["lr"] for r in records] == [lrs[r["step"] - 1] for r in records]


# ------------------------------------------------------------------ checkpoints
def test_checkpoints_every_n_steps_keep_the_newest_and_hold_the_final_state(baseline):
    # every 5 steps (5 ... 30) and at the end (32); keep: 3
    assert checkpoint_steps(baseline) == [25, 30, 32]
    meta = json.loads((baseline / "checkpoints" / "step-00000032.json").read_text())
    assert meta["framework"] == "numpy" and meta["step"] == 32
    saved = params(baseline / "checkpoints" / "step-00000032.npz")
    final = params(baseline / "params-0.npz")
    assert set(final) == {k.split("/", 1)[1] for k in saved if k.startswith("param/")}
    for name, value in final.items():
        assert np.array_equal(saved[f"param/{name}"], value), name


def resumed_matches_uninterrupted(tmp_path, baseline, framework):
    """Stop after 13 steps, resume, and compare with `baseline`: (params equal, lrs equal)."""
    out = tmp_path / "out"
    plugins = ["hvdscale_numpy", "hvdscale_numpy.forgetful"]
    recipe = with_changes(framework=framework, plugins=plugins)
    codes, err = run_sessions(tmp_path, [["--out", str(out), "--stop-after-steps", "13"],
                                         ["--out", str(out), "--resume"]], recipe)
    assert codes == [0, 0], err[-3000:]
    first, second = trace(out, 0), trace(out, 1)
    assert (first["ending"], first["last_step"]) == ("paused", 13)
    assert (second["first_step"], second["last_step"]) == (13, TOTAL_STEPS)
    lrs_equal = first["lrs"] + second["lrs"] == trace(baseline, 0)["lrs"]
    want, got = params(baseline / "params-0.npz"), params(out / "params-1.npz")
    return all(np.array_equal(want[k], got[k]) for k in want), lrs_equal, read_log(out)


def test_stop_and_resume_gives_bit_identical_parameters(tmp_path, baseline):
    same_params, same_lrs, (records, summaries) = resumed_matches_uninterrupted(
        tmp_path, baseline, "numpy")
    assert same_lrs and same_params
    # the resumed session appends to the log: the evaluations of one run, one summary
    want, _ = read_log(baseline)
    assert [(r["step"], r["test_accuracy"]) for r in records] == \
        [(r["step"], r["test_accuracy"]) for r in want]
    assert len(summaries) == 1 and summaries[0]["steps"] == TOTAL_STEPS


def test_the_resume_check_catches_a_backend_that_forgets_momentum(tmp_path, baseline):
    # positive control: a trainer whose load_state_bytes drops the momentum buffers
    same_params, same_lrs, _ = resumed_matches_uninterrupted(tmp_path, baseline,
                                                              "numpy_forgetful")
    assert same_lrs and not same_params


# ------------------------------------------------------------------ non-finite policies
def test_nonfinite_abort_exits_3_naming_the_step_and_saves_nothing_after_it(tmp_path):
    out = tmp_path / "out"
    # no evaluation before step 16: the checkpoint due at step 10 is where the statistics
    # are first read, and that read aborts before anything is written
    recipe = with_changes(faults={"nonfinite": "abort", "inject_nan_at_step": 6},
                          train={"eval_every_steps": 16})
    codes, err = run_sessions(tmp_path, [["--out", str(out)]], recipe)
    assert codes == [3]
    assert "non-finite loss or gradient at step 6" in err, err[-2000:]
    assert checkpoint_steps(out) == [5]


def test_nonfinite_skip_drops_exactly_that_update(tmp_path):
    out = tmp_path / "out"
    recipe = with_changes(faults={"nonfinite": "skip", "inject_nan_at_step": 6},
                          train={"max_steps": 9, "eval_every_steps": 9},
                          checkpoint={"every_steps": 1, "keep": 20})
    codes, err = run_sessions(tmp_path, [["--out", str(out)]], recipe)
    assert codes == [0], err[-3000:]
    ckpt = {s: params(out / "checkpoints" / f"step-{s:08d}.npz") for s in (6, 7, 8)}
    # step index 6 ends at step 7: parameters and momentum as after step 6, all finite
    for key in ckpt[6]:
        assert np.array_equal(ckpt[6][key], ckpt[7][key]), key
        assert np.isfinite(ckpt[8][key]).all(), key
    assert any(not np.array_equal(ckpt[7][k], ckpt[8][k]) for k in ckpt[7])
    records, (summary,) = read_log(out)
    assert summary["skipped_steps"] == 1 and records[-1]["skipped_steps"] == 1
    assert math.isfinite(records[-1]["train_loss"])
    assert "step 6: non-finite loss or gradient, update skipped" in err


# ------------------------------------------------------------------ stop at target
def test_stop_at_target_ends_at_the_first_evaluation_that_reaches_it(tmp_path, baseline):
    out = tmp_path / "out"
    recipe = with_changes(train={"stop_at_target": True})
    codes, err = run_sessions(tmp_path, [["--out", str(out)]], recipe)
    assert codes == [0], err[-3000:]
    want, _ = read_log(baseline)
    first_hit = next(r["step"] for r in want
                     if r["test_accuracy"] >= RECIPE["train"]["target_accuracy"])
    assert first_hit < TOTAL_STEPS, "pick a target the baseline reaches before its end"
    records, (summary,) = read_log(out)
    assert records[-1]["step"] == first_hit == summary["steps"] == summary["steps_to_target"]
    assert trace(out, 0)["ending"] == "target"
    assert checkpoint_steps(out)[-1] == first_hit      # the end is checkpointed


# ------------------------------------------------------------------ data and batches
def test_accumulation_splits_the_step_without_changing_it(tmp_path, baseline):
    out = tmp_path / "out"
    recipe = with_changes(batch={"per_worker": 8, "accumulation": 4})   # still 32 per step
    codes, err = run_sessions(tmp_path, [["--out", str(out)]], recipe)
    assert codes == [0], err[-3000:]
    want, got = params(baseline / "params-0.npz"), params(out / "params-0.npz")
    for name in want:       # the same mean gradient, summed in another order
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5)
    _, (summary,) = read_log(out)
    assert summary["global_batch"] == 32 and summary["accumulation"] == 4


def test_synthetic_data_kind_runs_through_the_same_path(tmp_path):
    out = tmp_path / "out"
    recipe = with_changes(data={"kind": "synthetic", "image_size": 8, "num_classes": 4,
                                "channels": 3, "train_limit": 256, "test_limit": 64},
                          train={"max_steps": 8, "target_accuracy": 1.0})
    codes, err = run_sessions(tmp_path, [["--out", str(out)]], recipe)
    assert codes == [0], err[-3000:]
    records, (summary,) = read_log(out)
    assert [r["step"] for r in records] == [8] and records[0]["test_examples"] == 64
    assert summary["steps_to_target"] is None


def test_resume_refuses_a_foreign_or_pickled_checkpoint_in_one_line(tmp_path, baseline):
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    for path in (baseline / "checkpoints").iterdir():
        (out / "checkpoints" / path.name).write_bytes(path.read_bytes())
    newest = out / "checkpoints" / "step-00000032.npz"
    state = params(newest)
    state["param/out.bias"] = np.array([{"run": "me"}], dtype=object)   # pickled on save
    np.savez(newest, **state)
    foreign = with_changes(framework="numpy_forgetful",
                           plugins=["hvdscale_numpy", "hvdscale_numpy.forgetful"])
    codes, err = run_sessions(tmp_path, [["--out", str(out), "--resume"]], foreign)
    assert codes == [2]
    assert 'error: --resume: checkpoint step 32 was written with framework "numpy", this ' \
           'run has "numpy_forgetful"' in err, err[-2000:]
    codes, err = run_sessions(tmp_path, [["--out", str(out), "--resume"]])
    assert codes == [2]
    line = next(l for l in err.splitlines() if "error:" in l)
    assert "--resume:" in line and "step-00000032.npz" in line and "pickle" in line, err[-2000:]
    assert "Traceback" not in err


def test_elastic_is_refused_for_a_backend_without_horovod(tmp_path):
    code = ("from hvdscale.config import config_from_dict\n"
            "from hvdscale.engine.elastic import check_elastic\n"
            "from hvdscale.errors import ConfigError\n"
            "cfg = config_from_dict({'framework': 'numpy', 'plugins': ['hvdscale_numpy'], "
            "'optimizer': {'name': 'sgd'}, 'model': {'name': 'mlp'}})\n"
            "try:\n    check_elastic(cfg)\nexcept ConfigError as err:\n    print('REFUSED', err)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(PLUGINS)]))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=60)
    assert "REFUSED --elastic needs Horovod, which the numpy backend does not use" \
        in proc.stdout, proc.stdout + proc.stderr


# ------------------------------------------------------------------ the Backend core alone
def test_a_backend_with_only_the_core_trains_writes_no_checkpoint_and_refuses_resume(tmp_path):
    """hvdscale_numpy/minimal.py has what every backend must do and none of the optional
    parts (hvdscale/engine/backend.py): the engine checks once and runs without them."""
    out = tmp_path / "out"
    recipe = with_changes(framework="numpy_minimal", callbacks=[],
                          plugins=["hvdscale_numpy", "hvdscale_numpy.minimal"],
                          train={"max_steps": 12})
    codes, err = run_sessions(tmp_path, [["--out", str(out)], ["--out", str(out), "--resume"]],
                              recipe)
    assert codes == [0, 2], err[-3000:]
    records, (summary,) = read_log(out)
    assert [r["step"] for r in records] == [8, 12] and summary["steps"] == 12
    assert not list(out.glob("checkpoints/step-*"))
    line = next(l for l in err.splitlines() if "error:" in l)
    assert "numpy_minimal backend writes no checkpoints" in line, err[-2000:]
