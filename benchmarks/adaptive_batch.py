"""Adaptive global batch (issue 22) against fixed batches on the large-batch study's problem.

The study's problem (docs/study.md): pipelines/sweep_sgd.yaml -- mlp4, momentum SGD, linear lr
scaling from B_ref with the study's warm-up fraction and cosine decay -- on Fashion-MNIST with
the study's validation split, its target (on validation) and epoch budget, all read from the
sweep's results.json. In one run, the same seeds for every arm:

  fixed B_ref        the study's reference batch at its settled lr (lr_ref)
  fixed best         b_max of sgd/scaled in results.json: the largest fixed batch whose final
                     test accuracy is within 0.5 pp of B_ref's (the study's "best fixed batch")
  fixed largest      the largest batch of the sweep
  adaptive           batch.adaptive from B_ref (lr_ref, the default rule adascale and the
                     default every_steps/threshold/min_samples), max_global = the largest,
                     noise_scale.every = the study's noise_every; not told b_max

Every run goes through the study's in-process runner (hvdscale.study.engine_run, the same
Engine as `hvdscale train`, one process, one thread). Per arm: optimizer steps, examples and
training time (the engine's clock: training steps only) to the validation target, each
interpolated between the two evaluations around the crossing, and the final test accuracy,
with 95 % t-intervals over the seeds; the ratios against best fixed and B_ref per seed (paired
by seed), with t-intervals. The fixed batches' trade-off curve is the study's (every sgd/scaled
batch of results.json: S(B) = S_min + E_min / B fitted, and the measured means); the adaptive
point is compared with the fitted curve at its examples to target. Plot: OUT/tradeoff.png.
Last line of stdout: one JSON object.

    PYTHONPATH=. .venv/bin/python benchmarks/adaptive_batch.py [/path/to/results.json]
        [--seeds 1,2,3] [--epochs E] [--out DIR]
"""
import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from hvdscale.config import load_config
from hvdscale.core.metrics import SweepPoint, fit_tradeoff
from hvdscale.core.stats import mean_interval
from hvdscale.engine.callbacks import Callback
from hvdscale.study import sweep
from hvdscale.study.engine_run import run_with_engine

RECIPE = "pipelines/sweep_sgd.yaml"
GOAL = {"steps_vs_best_max": 1.1, "steps_vs_ref_min_factor": 2.0, "accuracy_within_pp": 0.5}


class CrossingClock(Callback):
    """At every evaluation: (step, examples seen, training seconds, validation accuracy); and
    every change of the global batch (step, batch)."""

    def __init__(self):
        self.evals, self.batches = [], []

    def on_run_begin(self, engine):
        self.batches = [(engine.step, engine.global_batch)]

    def on_step_end(self, engine):
        if engine.global_batch != self.batches[-1][1]:
            self.batches.append((engine.step, engine.global_batch))

    def on_evaluate(self, engine, record):
        self.evals.append((engine.step, engine.examples, engine.train_time,
                           record["test_accuracy"]))


def crossing(evals, target):
    """(steps, examples, seconds) where the accuracy first reaches `target`, linear between
    the two evaluations around it (hvdscale.core.metrics.interpolated_crossing's rule: the
    later point when the earlier one already reached it or the accuracy did not rise)."""
    prev = None
    for cur in evals:
        if cur[3] >= target:
            if prev is None or prev[3] >= target or cur[3] <= prev[3]:
                return cur[:3]
            f = (target - prev[3]) / (cur[3] - prev[3])
            return tuple(p + f * (c - p) for p, c in zip(prev[:3], cur[:3]))
        prev = cur
    return None


def read_study(path):
    payload = json.loads(Path(path).read_text())
    if "design" not in payload:
        raise SystemExit(f"{path}: not a results.json of the current sweep (no 'design')")
    design = payload["design"]
    info = next(o for o in payload["optimizers"] if o["optimizer"] == "sgd")
    b_max = payload["summary"]["sgd"]["scaled"]["b_max"]
    curve = {}
    for r in payload["runs"]:
        if (r["optimizer"], r["protocol"], r["role"]) == ("sgd", "scaled", "measure"):
            curve.setdefault(r["batch"], []).append(r)
    return design, info, b_max, curve, payload.get("study_settings", {})


def config(study, setting, batch, lr, seed, options, adaptive=None, noise_every=0):
    """The study's config of a run (Study.config); for the adaptive arm the evaluations are
    every 1/evals_per_run of the budget in epochs (the fixed arms' cadence in examples), as
    a period in steps would thin out when the steps grow."""
    if adaptive is None:
        return study.config(setting, batch, lr, seed, options)
    s = study.s
    overrides = study.data_overrides() + [
        f"batch.per_worker={batch}", f"batch.reference={batch}", "batch.accumulation=1",
        f"optimizer.base_lr={lr!r}", f"train.epochs={s.epochs!r}", f"train.seed={seed}",
        "train.eval_every_steps=null", f"train.eval_every_epochs={s.epochs / s.evals_per_run!r}",
        f"train.target_accuracy={s.target!r}", f"train.threads={s.threads}",
        f"lr.warmup_epochs={s.warmup_fraction * s.epochs!r}", "lr.warmup_steps=null",
        "checkpoint.every_epochs=null", "faults.step_timeout_s=null",
        f"noise_scale.every={noise_every}", "batch.adaptive.enabled=true",
        f"batch.adaptive.max_global={adaptive}"]
    for name, value in (options or {}).items():
        overrides.append(f"optimizer.{name}={json.dumps(value)}")
    return load_config(setting.recipe, overrides)


def summarise(values):
    values = [v for v in values if v is not None]
    if len(values) < 2:
        return {"mean": values[0] if values else None, "ci95": None, "n": len(values)}
    iv = mean_interval(values)
    return {"mean": iv.estimate, "ci95": [iv.ci_low, iv.ci_high], "n": len(values)}


def curve_steps_at(fit, examples):
    """Steps of the fitted fixed-batch trade-off (S - S_min)(E - E_min) = S_min E_min at
    `examples` (None left of its asymptote)."""
    if examples is None or examples <= fit.e_min:
        return None
    return fit.s_min + fit.s_min * fit.e_min / (examples - fit.e_min)


def plot(path, curve_means, fit, runs, target):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6.8, 4.6), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    pts = sorted((b, e, s) for b, (e, s) in curve_means.items())
    ax.plot([p[1] for p in pts], [p[2] for p in pts], "o-", color="0.55",
            label="fixed batches (study, mean over seeds)")
    for b, e, s in pts:
        ax.annotate(str(b), (e, s), textcoords="offset points", xytext=(4, 3), fontsize=7,
                    color="0.4")
    if fit is not None and pts:
        lo = min(p[1] for p in pts) * 0.8
        hi = max(p[1] for p in pts) * 1.3
        xs = [fit.e_min + (lo * (hi / lo) ** (i / 99) - fit.e_min) for i in range(100)]
        xs = [x for x in xs if x > fit.e_min * 1.0001]
        ax.plot(xs, [curve_steps_at(fit, x) for x in xs], "--", color="0.3", linewidth=1,
                label=f"fit S_min {fit.s_min:.0f}, E_min {fit.e_min:.3g}")
    markers = {"fixed B_ref": "s", "fixed best": "D", "fixed largest": "^", "adaptive": "*"}
    colors = {"fixed B_ref": "tab:blue", "fixed best": "tab:green",
              "fixed largest": "tab:orange", "adaptive": "tab:red"}
    for arm in markers:
        mine = [r for r in runs if r["arm"] == arm and r["steps_to_target"] is not None]
        if mine:
            ax.scatter([r["examples_to_target"] for r in mine],
                       [r["steps_to_target"] for r in mine], marker=markers[arm],
                       color=colors[arm], s=90 if arm == "adaptive" else 40, zorder=3,
                       label=f"{arm} (this run, one point per seed)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"examples to validation accuracy {target}")
    ax.set_ylabel("optimizer steps to target")
    ax.set_title("Steps against examples to target: fixed batches and adaptive", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path)


def cpu_model():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines()
                    if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "?"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="?", default="docs/results/results.json",
                        help="the sweep's results.json (b_max, lr_ref, design, the curve)")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--epochs", type=float, default=None,
                        help="epoch budget (default: the study's)")
    parser.add_argument("--out", default="/tmp/hvdscale-adaptive-bench")
    args = parser.parse_args()

    design, info, b_max, curve_runs, study_settings = read_study(args.results)
    seeds = [int(s) for s in args.seeds.split(",")]
    batches = list(design["batch_sizes"])
    b_ref, largest = batches[0], max(batches)
    epochs = args.epochs if args.epochs is not None else float(design["epochs"])
    target = float(design["target"])
    settings = sweep.StudySettings(
        recipes=[RECIPE], batch_sizes=batches, target=target, epochs=epochs,
        warmup_fraction=float(design.get("warmup_fraction", 0.1)),
        validation=int(design.get("validation", 5000)),
        evals_per_run=int(study_settings.get("evals_per_run", 16)), threads=1)
    noise_every = int(study_settings.get("noise_every", 5))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    study = sweep.Study(settings, out / "study", log=lambda *_: None)
    setting = sweep.read_setting(RECIPE)
    lr_ref, options = float(info["lr_ref"]), info.get("settled_options") or {}
    train, val, test = study.data
    load_start = os.getloadavg()
    start = time.time()

    arms = [("fixed B_ref", b_ref), ("fixed best", b_max), ("fixed largest", largest),
            ("adaptive", b_ref)]
    runs = []
    for seed in seeds:
        for arm, batch in arms:
            adaptive = largest if arm == "adaptive" else None
            cfg = config(study, setting, batch, sweep.rule_lr(lr_ref, b_ref, batch,
                                                              setting.scaling),
                         seed, options, adaptive=adaptive,
                         noise_every=noise_every if adaptive else 0)
            clock = CrossingClock()
            res = run_with_engine(cfg, train, val, test, callbacks=[clock])
            hit = crossing(clock.evals, target)
            run = {"arm": arm, "batch": batch, "seed": seed, "status": res.status,
                   "steps": res.steps_run, "test_accuracy": res.test_accuracy,
                   "final_val_accuracy": clock.evals[-1][3] if clock.evals else None,
                   "steps_to_target": hit[0] if hit else None,
                   "examples_to_target": hit[1] if hit else None,
                   "seconds_to_target": hit[2] if hit else None,
                   "train_seconds": clock.evals[-1][2] if clock.evals else None,
                   "wall_s": round(res.wall_s, 2)}
            if adaptive:
                run["batches"] = clock.batches
            runs.append(run)
            print(json.dumps(run), flush=True)
    wall = time.time() - start

    by_arm = {}
    for arm, batch in arms:
        mine = [r for r in runs if r["arm"] == arm]
        by_arm[arm] = {"batch": batch, "reached": sum(r["steps_to_target"] is not None
                                                      for r in mine),
                       **{k: summarise([r[k] for r in mine]) for k in (
                           "steps_to_target", "examples_to_target", "seconds_to_target",
                           "test_accuracy", "steps")}}

    def paired(arm, other, key, ratio=True):
        """Per seed, adaptive vs `other`: ratio (or difference), with a t-interval."""
        values = []
        for seed in seeds:
            a = next(r[key] for r in runs if r["arm"] == arm and r["seed"] == seed)
            b = next(r[key] for r in runs if r["arm"] == other and r["seed"] == seed)
            if a is not None and b is not None:
                values.append(a / b if ratio else 100 * (a - b))
        return summarise(values)

    comparison = {
        "steps_adaptive_over_best": paired("adaptive", "fixed best", "steps_to_target"),
        "steps_ref_over_adaptive": paired("fixed B_ref", "adaptive", "steps_to_target"),
        "seconds_adaptive_over_best": paired("adaptive", "fixed best", "seconds_to_target"),
        "seconds_adaptive_over_ref": paired("adaptive", "fixed B_ref", "seconds_to_target"),
        "test_accuracy_adaptive_minus_ref_pp": paired("adaptive", "fixed B_ref",
                                                      "test_accuracy", ratio=False),
    }

    # the fixed batches' trade-off curve: the study's sgd/scaled runs
    points, curve_means = [], {}
    for batch, rs in sorted(curve_runs.items()):
        for r in rs:
            points.append(SweepPoint(batch, r["steps_to_target"], r.get("steps")))
        reached = [r["steps_to_target"] for r in rs if r["steps_to_target"] is not None]
        if len(reached) == len(rs) and reached:
            s = sum(reached) / len(reached)
            curve_means[batch] = (s * batch, s)
    fit = fit_tradeoff(points)
    adaptive_runs = [r for r in runs if r["arm"] == "adaptive" and r["steps_to_target"]]
    position = None
    if fit is not None and adaptive_runs:
        per_seed = [r["steps_to_target"] / curve_steps_at(fit, r["examples_to_target"])
                    for r in adaptive_runs if curve_steps_at(fit, r["examples_to_target"])]
        e_mean = by_arm["adaptive"]["examples_to_target"]["mean"]
        position = {"fit": {"s_min": fit.s_min, "e_min": fit.e_min, "b_crit": fit.b_crit},
                    "curve_steps_at_adaptive_examples": curve_steps_at(fit, e_mean),
                    "adaptive_steps_over_curve": summarise(per_seed),
                    # each seed's point against the curve at its own examples
                    "adaptive_points_below_curve": f"{sum(v <= 1 for v in per_seed)} of "
                                                   f"{len(adaptive_runs)}"}
    plot(out / "tradeoff.png", curve_means, fit, runs, target)

    ratio = comparison["steps_adaptive_over_best"]["mean"]
    speedup = comparison["steps_ref_over_adaptive"]["mean"]
    acc = comparison["test_accuracy_adaptive_minus_ref_pp"]
    below = position["adaptive_steps_over_curve"]["mean"] if position else None
    goal = {
        "steps_le_1.1x_best": ratio is not None and ratio <= GOAL["steps_vs_best_max"],
        "steps_2x_fewer_than_ref": speedup is not None
        and speedup >= GOAL["steps_vs_ref_min_factor"],
        "accuracy_within_0.5pp_of_ref": acc["mean"] is not None
        and abs(acc["mean"]) <= GOAL["accuracy_within_pp"],
        "on_or_below_curve": below is not None and below <= 1.0,
    }
    summary = {"benchmark": "adaptive_batch", "results": str(args.results), "recipe": RECIPE,
               "target": target, "epochs": epochs, "study_epochs": design["epochs"],
               "seeds": seeds, "b_ref": b_ref, "b_max": b_max, "largest": largest,
               "lr_ref": lr_ref, "noise_every": noise_every, "arms": by_arm,
               "comparison": comparison, "tradeoff": position, "goal": goal,
               "plot": str(out / "tradeoff.png"), "wall_s": round(wall, 1),
               "cpu": cpu_model(), "cores": os.cpu_count(),
               "load": {"start": [round(v, 2) for v in load_start],
                        "end": [round(v, 2) for v in os.getloadavg()]},
               "python": sys.version.split()[0]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
