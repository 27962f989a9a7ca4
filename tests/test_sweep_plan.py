"""The sweep's plan (batch layouts, budgets, overrides), its reading of metrics.jsonl and the
report it writes, on hand-made run logs with known answers. The real end-to-end sweep is in
test_sweep_e2e.py."""
import json
import math

import pytest

from hvdscale.errors import ConfigError
from hvdscale.study import report, sweep


def _recipe(tmp_path, name, optimizer="sgd"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: {name}\noptimizer: {{name: {optimizer}}}\n")
    return str(path)


def test_batch_layout_uses_accumulation_beyond_the_micro_batch_cap():
    assert sweep.batch_layout(64, 1, 512) == (64, 1)
    assert sweep.batch_layout(16384, 1, 512) == (512, 32)
    assert sweep.batch_layout(16384, 2, 512) == (512, 16)
    assert sweep.batch_layout(3000, 1, 512) == (500, 6)      # the first exact divisor
    with pytest.raises(ConfigError, match="does not split evenly over 2 workers"):
        sweep.batch_layout(99, 2, 512)


def test_batch_sizes_are_checked():
    assert sweep.parse_batch_sizes("256,64,1024") == [64, 256, 1024]
    for bad in ("64", "64,x", "64,64", "0,64"):
        with pytest.raises(ConfigError, match="--batch-sizes"):
            sweep.parse_batch_sizes(bad)


def test_plan_budgets_and_overrides(tmp_path):
    settings = sweep.SweepSettings(recipes=[_recipe(tmp_path, "sgd_lin"), _recipe(tmp_path, "lamb", "lamb")],
                                   batch_sizes=[64, 4096], target=0.85, seeds=[1, 2],
                                   epochs=2, min_steps=50, eval_examples=2048)
    runs = sweep.plan(settings, tmp_path / "out")
    assert [(r.setting, r.batch_size, r.seed) for r in runs] == [
        ("sgd_lin", 64, 1), ("sgd_lin", 64, 2), ("sgd_lin", 4096, 1), ("sgd_lin", 4096, 2),
        ("lamb", 64, 1), ("lamb", 64, 2), ("lamb", 4096, 1), ("lamb", 4096, 2)]
    small, big = runs[0], runs[2]
    assert small.max_steps == 2 * (60000 // 64) and small.eval_every_steps == 32
    assert big.max_steps == 50 and big.eval_every_steps == 1      # the step floor binds
    assert (big.per_worker, big.accumulation) == (512, 8)
    sets = dict(s.split("=", 1) for s in big.overrides(settings))
    assert sets["batch.accumulation"] == "8" and sets["train.stop_at_target"] == "false"
    # the engine runs round(epochs * steps_per_epoch) steps: exactly the budget
    assert round(float(sets["train.epochs"]) * (60000 // 4096)) == 50
    assert sets["train.max_steps"] == "50" and sets["train.target_accuracy"] == "0.85"
    cmd = sweep.train_command(big, settings)
    assert cmd[1:5] == ["-m", "hvdscale.cli", "train", big.recipe]


def test_plan_rejects_bad_input(tmp_path):
    a = _recipe(tmp_path, "same")
    b = tmp_path / "other.yaml"
    b.write_text("name: same\n")
    with pytest.raises(ConfigError, match="share the name"):
        sweep.plan(sweep.SweepSettings([a, str(b)], [64, 128], 0.8), tmp_path)
    with pytest.raises(ConfigError, match="--target"):
        sweep.plan(sweep.SweepSettings([a], [64, 128], 85), tmp_path)


def _log(path, evals, summary=True):
    lines = [json.dumps(e) for e in evals]
    lines.append("{not json, a line cut short")
    if summary:
        lines.append(json.dumps({"event": "summary", "steps": evals[-1]["step"],
                                 "images_per_sec": 6400.0, "optimizer": "sgd"}))
    path.write_text("\n".join(lines) + "\n")


def test_run_record_is_read_off_the_evaluation_log(tmp_path):
    settings = sweep.SweepSettings(recipes=[], batch_sizes=[64, 128], target=0.85, epochs=1)
    spec = sweep.RunSpec("sgd_lin", "r.yaml", 64, 1, 64, 1, 2000, 100, str(tmp_path))
    evals = [{"step": s, "epoch": s * 64 / 60000, "lr": 0.1, "test_accuracy": a,
              "elapsed_s": s / 100, **({"b_simple": b} if b else {})}
             for s, a, b in [(100, 0.70, None), (200, 0.80, 150.0), (300, 0.86, 180.0),
                             (400, 0.84, 200.0), (1000, 0.88, 300.0), (1500, 0.89, 350.0)]]
    _log(tmp_path / "metrics.jsonl", evals)
    got, summary = sweep.read_metrics(tmp_path / "metrics.jsonl")
    assert len(got) == 6 and summary["steps"] == 1500
    rec = sweep.summarize_run(spec, got, summary, settings, returncode=0)
    assert rec["status"] == "ok" and rec["steps_to_target"] == 300
    assert rec["time_to_target_s"] == 3.0 and rec["b_simple_at_target"] == 180.0
    assert rec["best_accuracy"] == 0.89
    assert rec["accuracy_at_budget"] == 0.86          # step 1000 is epoch 1.07, past the budget
    assert rec["time_per_step_s"] == pytest.approx(0.01)
    assert rec["b_simple_trace"][0] == (200, 150.0)


def test_a_diverged_run_is_a_missed_target_and_a_crash_is_a_failure(tmp_path):
    settings = sweep.SweepSettings(recipes=[], batch_sizes=[64, 128], target=0.85)
    spec = sweep.RunSpec("sgd_lin", "r.yaml", 8192, 1, 512, 16, 60, 1, str(tmp_path))
    evals = [{"step": 1, "epoch": 0.1, "test_accuracy": 0.1, "elapsed_s": 1.0}]
    rec = sweep.summarize_run(spec, evals, None, settings, 1,
                              "hvdscale train: error: non-finite loss at step 3")
    assert rec["status"] == "ok" and rec["diverged"] and rec["steps_to_target"] is None
    assert rec["steps_run"] == 60
    rec = sweep.summarize_run(spec, evals, None, settings, 1, "Traceback\nImportError: no torch")
    assert rec["status"] == "failed" and rec["error"] == "ImportError: no torch"


def _fake_runs():
    """Two settings on the paper's model S = S_min (1 + B_crit / B), one with a missed point."""
    runs = []
    for setting, s_min, b_crit in (("sgd_lin", 40, 1000), ("lamb", 30, 4000)):
        for batch in (64, 256, 1024, 4096, 16384):
            steps = s_min * (1 + b_crit / batch)
            reached = not (setting == "sgd_lin" and batch == 16384)
            runs.append({"setting": setting, "optimizer": setting.split("_")[0],
                         "batch_size": batch, "seed": 1, "status": "ok",
                         "steps_to_target": steps if reached else None,
                         "steps_run": steps if reached else 60,
                         "epochs_to_target": steps * batch / 60000 if reached else None,
                         "time_to_target_s": steps * 0.01 if reached else None,
                         "time_s": steps * 0.01, "time_per_step_s": 0.01,
                         "best_accuracy": 0.87, "accuracy_at_budget": 0.86 - batch / 1e5,
                         "b_simple_at_target": b_crit * 0.8, "peak_lr": 0.1,
                         "b_simple_trace": [(10, b_crit * 0.5), (100, b_crit * 0.8)]})
    return runs


def test_report_states_the_rule_and_the_measured_and_predicted_b_crit(tmp_path):
    runs = _fake_runs()
    meta = {"command": "hvdscale sweep x", "machine": "test", "target": 0.85,
            "epoch_budget": 3, "date": "today", "data": "fake"}
    path = report.write_report(runs, tmp_path, meta)
    text = path.read_text()
    analysis = report.analyse(runs)
    lamb = analysis["lamb"]
    assert lamb["measured"].status == "measured"
    assert lamb["measured"].b_crit == pytest.approx(4000 + 128, rel=0.15)
    assert lamb["fit"][1] == pytest.approx(4000)
    assert lamb["predicted"] == pytest.approx(3200)
    assert "exceed perfect scaling" in text and "2x" in text
    assert "| lamb | lamb |" in text and "backward_passes_per_step" in text
    assert "> 60" in text                     # the missed point is shown as a lower bound
    # findings: prediction vs measurement, and the second setting's B_crit against the first
    ratio = lamb["predicted"] / lamb["measured"].b_crit
    assert f"predicts 3200, {ratio:.2f}x the measured value" in text
    up = lamb["measured"].b_crit / analysis["sgd_lin"]["measured"].b_crit
    assert f"lamb vs sgd_lin: B_crit {up:.2f}x that of sgd_lin (up)" in text
    row = next(line for line in text.splitlines() if line.startswith("| 1024 | lamb"))
    assert f"{30 * (1 + 4000 / 1024):.0f}" in row
    for png in (report.STEPS_PLOT, report.ACCURACY_PLOT, report.NOISE_PLOT):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10000


def test_seeds_are_combined_and_one_miss_censors_the_point():
    runs = _fake_runs()
    extra = dict(runs[0], seed=2, steps_to_target=None, steps_run=500)
    extra2 = dict(runs[1], seed=2, steps_to_target=runs[1]["steps_to_target"] * 4)
    points = report.aggregate(runs + [extra, extra2])
    assert not points[("sgd_lin", 64)]["reached"] and points[("sgd_lin", 64)]["steps_run"] == 500
    assert points[("sgd_lin", 256)]["steps_to_target"] == pytest.approx(
        runs[1]["steps_to_target"] * 2)      # geometric mean of x and 4x


def test_the_sweep_model_mlp_matches_its_analytic_parameter_count():
    torch = pytest.importorskip("torch")
    from hvdscale.core import model_zoo as zoo
    from hvdscale.torch.models import build_model
    model = build_model("mlp", 10, 1, 28)
    assert sum(p.numel() for p in model.parameters()) == zoo.param_count("mlp", 10, 1, 28) \
        == 784 * 128 + 128 + 128 * 10 + 10
    # flattening follows Keras' (H, W, C) order: a pixel's weight column does not depend on
    # the layout once the channel axis is 1
    x = torch.zeros(1, 1, 28, 28)
    x[0, 0, 3, 5] = 1.0
    with torch.no_grad():
        hidden = model.fc1(torch.flatten(x.permute(0, 2, 3, 1), 1))
        assert torch.allclose(hidden, model.fc1.weight[:, 3 * 28 + 5] + model.fc1.bias)
