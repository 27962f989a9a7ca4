"""From the study's run records and probes to the numbers of results.json (per setting):
B_crit from the censored fit of McCandlish's trade-off with a seed bootstrap, the 2x rule as a
cross-check, B_noise at the target, their ratio, and the accuracy at the fixed epoch budget.
"""
import math

import numpy as np

from hvdscale.core.metrics import (SweepPoint, b_crit_2x_offset_removed, bootstrap_tradeoff)

WITHIN = 0.003       # 0.3 percentage points


def measurement_points(runs, setting):
    """SweepPoints of the fresh-seed runs of one setting (the tuning runs are left out)."""
    out = []
    for r in runs:
        if r["setting"] != setting or r["role"] != "measure":
            continue
        if r["status"] == "reached":
            out.append(SweepPoint(r["batch_size"], r["steps_to_target"], r["steps_to_target"]))
        else:   # missed within the budget, or diverged (it would never have reached it)
            steps = r["budget_steps"] if r["status"] == "diverged" else r["steps_run"]
            out.append(SweepPoint(r["batch_size"], None, steps))
    return out


def combined_points(points):
    """One point per batch size (geometric mean of the seeds' steps; missed if any missed)."""
    by = {}
    for p in points:
        by.setdefault(p.batch_size, []).append(p)
    out = []
    for b, group in sorted(by.items()):
        steps = [p.steps_to_target if p.reached else p.steps_run for p in group]
        gm = math.exp(sum(math.log(v) for v in steps) / len(steps))
        reached = all(p.reached for p in group)
        out.append(SweepPoint(b, gm if reached else None, gm))
    return out


def accuracy_table(runs, setting):
    """batch -> {"mean", "std", "n", "values"} of the accuracy at the fixed epoch budget."""
    by = {}
    for r in runs:
        if r["setting"] == setting and r["role"] in ("measure", "accuracy") and \
                r["accuracy_at_budget"] is not None:
            acc = r["accuracy_at_budget"]
            by.setdefault(r["batch_size"], []).append(0.0 if acc is None else acc)
    table = {}
    for b, values in sorted(by.items()):
        arr = np.array(values)
        table[b] = {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1
                    else 0.0, "n": len(arr), "values": [float(v) for v in arr]}
    return table


def max_batch_within(table, tolerance=WITHIN):
    """Largest batch such that it and every batch between it and B_ref keep a mean accuracy
    within `tolerance` of B_ref's mean."""
    sizes = sorted(table)
    ref = table[sizes[0]]["mean"]
    best = sizes[0]
    for b in sizes[1:]:
        if table[b]["mean"] >= ref - tolerance:
            best = b
        else:
            break
    return best


def within_by_seed(table, tolerance=WITHIN, replicates=500, seed=0):
    """Bootstrap over seeds of max_batch_within: the 2.5/97.5 percentiles (batch sizes)."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(replicates):
        sample = {}
        for b, row in table.items():
            v = np.array(row["values"])
            sample[b] = {"mean": float(v[rng.integers(0, len(v), len(v))].mean())}
        values.append(max_batch_within(sample, tolerance))
    lo, hi = np.percentile(values, [2.5, 97.5])
    return int(lo), int(hi)


def analyse_setting(runs, info, bootstrap=300):
    from hvdscale.study.probe import combine_seeds

    label = info["setting"]
    points = measurement_points(runs, label)
    fit, lo, hi, refits = bootstrap_tradeoff(points, replicates=bootstrap)
    combined = combined_points(points)
    two_x, raw = b_crit_2x_offset_removed(combined)
    probes = [p["_result"] for p in info["probes"] if "_result" in p]
    noise = combine_seeds(probes)
    online = [p.get("online_b_simple_at_target") for p in info["probes"]
              if p.get("online_b_simple_at_target") is not None]
    table = accuracy_table(runs, label)
    b_max = max_batch_within(table)
    b_max_ci = within_by_seed(table)
    ratio = ratio_ci = None
    if fit is not None and noise is not None:
        ratio = noise.estimate / fit.b_crit
        if lo and hi:
            ratio_ci = [noise.ci_low / hi, noise.ci_high / lo]
    return {
        "setting": label,
        "optimizer": info["optimizer"],
        "seeds": len({r["seed"] for r in runs if r["setting"] == label and r["role"] == "measure"}),
        "lr_grid": info["lr_grid"],
        "chosen_lr": info["chosen_lr"],
        "chosen_lr_accuracy": info["chosen_lr_accuracy"],
        "scaling": info["scaling"],
        "b_crit": {"estimate": fit.b_crit if fit else None, "ci_low": lo, "ci_high": hi},
        "s_min": fit.s_min if fit else None,
        "fit_replicates": [[f.s_min, f.e_min] for f in refits],
        "e_min": fit.e_min if fit else None,
        "b_crit_2x_rule_offset_removed": two_x,
        "b_crit_2x_rule_raw": raw.b_crit,
        "b_noise_at_target": noise.as_dict() if noise else
        {"estimate": None, "ci_low": None, "ci_high": None},
        "b_simple_online_at_target": float(np.median(online)) if online else None,
        "predicted_over_measured": ratio,
        "predicted_over_measured_ci": ratio_ci,
        "accuracy_at_budget": {str(b): row for b, row in table.items()},
        "max_batch_within_0p3pp": b_max,
        "max_batch_within_0p3pp_seed_bootstrap": list(b_max_ci),
        "probes": [{k: v for k, v in p.items() if k != "_result"} for p in info["probes"]],
    }
