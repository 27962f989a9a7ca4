"""From the study's run records and probes to the numbers of results.json (per setting):
B_crit from the censored fit of McCandlish's trade-off with a seed bootstrap, the 2x rule as a
cross-check, B_noise at the target, their ratio, and the accuracy at the fixed epoch budget.

The statistics of the study's conclusions (framework-neutral, docs/study.md "Statistics"):
accuracy per batch with t-intervals over seeds, the drop against B_ref in percentage points
with Welch's interval, b_max, the positive control, B_crit with fit-form uncertainty, and
B_noise as the median over a window of snapshots around the target.
"""
import math
from typing import Mapping, Optional, Sequence, Tuple

import numpy as np

from hvdscale.core.metrics import (SweepPoint, bootstrap_tradeoff,
                                   fit_tradeoff)
from hvdscale.core.stats import Interval, mean_interval, welch_interval
from hvdscale.errors import ConfigError

MEAN_DROP_PP = 0.5       # b_max: mean drop below this ...
UPPER_DROP_PP = 1.0      # ... and the upper 95 % bound of the drop below this
CONTROL_DROP_PP = 1.0    # positive control: a mean drop of at least this, interval above 0


def accuracy_summary(values_by_batch: Mapping[int, Sequence[float]],
                     level: float = 0.95) -> dict:
    """Per batch the test accuracy (fractions, one per seed) as a mean with its t-interval, and
    the drop against the smallest batch B_ref in percentage points, 100 (mean_ref - mean_B),
    with Welch's interval (the seeds of two batch sizes are independent groups); b_max as in
    `b_max`. A batch with fewer than two seeds gets no interval (None)."""
    if not values_by_batch:
        raise ConfigError("accuracy summary: no batch sizes given")
    b_ref = min(values_by_batch)
    ref = [100.0 * a for a in values_by_batch[b_ref]]
    accuracy, drops = {}, {}
    for batch in sorted(values_by_batch):
        values = [100.0 * a for a in values_by_batch[batch]]
        if len(values) < 2 or len(ref) < 2:
            accuracy[batch] = drops[batch] = None
            continue
        accuracy[batch] = mean_interval(values, level)
        if batch != b_ref:
            drops[batch] = welch_interval(ref, values, level)
    drops.pop(b_ref, None)
    return {"b_ref": b_ref, "b_max": b_max(b_ref, drops), "accuracy_pct": accuracy,
            "drop_pp": drops}


def b_max(b_ref: int, drops: Mapping[int, Optional[Interval]]) -> int:
    """The largest batch whose mean drop is < 0.5 pp and whose upper 95 % bound of the drop is
    < 1 pp (issue 21's definition, batch by batch: a larger batch may qualify after a smaller
    one failed); B_ref itself when none does. A batch without an interval does not qualify."""
    ok = [b for b, d in drops.items() if d is not None and d.estimate < MEAN_DROP_PP
          and d.ci_high < UPPER_DROP_PP]
    return max([b_ref] + ok)


def positive_control(drops: Mapping[int, Optional[Interval]]) -> Optional[int]:
    """The smallest batch that loses >= 1 pp against B_ref with an interval excluding 0, or
    None (then the range or the budget is too small to show the effect)."""
    hits = [b for b, d in drops.items() if d is not None and d.estimate >= CONTROL_DROP_PP
            and d.ci_low > 0]
    return min(hits) if hits else None


def b_crit_fit_forms(points_by_seed: Mapping[object, Sequence[SweepPoint]],
                     replicates: int = 300, level: float = 0.95, seed: int = 0) -> dict:
    """B_crit from the steps-to-target fit with an interval that includes the uncertainty of
    the fit's form: the envelope of the seed-bootstrap intervals of the fit to every run and of
    the fit without the smallest batch, and of the per-seed fits (one run per batch: a point
    each, nothing to resample). The estimate is the fit to every run.
    Returns {"estimate", "ci_low", "ci_high", "fits": {name: {"estimate", "ci_low",
    "ci_high"}}}; None values when the fit to every run is impossible."""
    every = [p for pts in points_by_seed.values() for p in pts]
    fits = {}
    smallest = min((p.batch_size for p in every), default=None)
    for name, pts in (("all", every),
                      ("without_smallest", [p for p in every if p.batch_size != smallest])):
        fit, lo, hi, _ = bootstrap_tradeoff(pts, replicates, level, seed)
        if fit is not None:
            fits[name] = {"estimate": fit.b_crit, "ci_low": lo, "ci_high": hi}
    for key, pts in points_by_seed.items():
        fit = fit_tradeoff(list(pts))
        if fit is not None:
            fits[f"seed_{key}"] = {"estimate": fit.b_crit, "ci_low": fit.b_crit,
                                   "ci_high": fit.b_crit}
    if "all" not in fits:
        return {"estimate": None, "ci_low": None, "ci_high": None, "fits": fits}
    lows = [f["ci_low"] if f["ci_low"] is not None else f["estimate"] for f in fits.values()]
    highs = [f["ci_high"] if f["ci_high"] is not None else f["estimate"] for f in fits.values()]
    return {"estimate": fits["all"]["estimate"], "ci_low": min(lows), "ci_high": max(highs),
            "fits": fits}


def noise_in_window(readings: Sequence[Tuple[float, float]], half_width: float,
                    replicates: int = 4000, level: float = 0.95, seed: int = 0,
                    groups: Optional[Sequence] = None) -> Interval:
    """B_noise over a window of snapshots around the target: readings are (steps from the
    target, B_simple) pairs (several seeds' snapshots may be pooled, each seed's steps counted
    from its own target); the median of those within +-half_width steps, with a percentile
    bootstrap interval (an unresolved probe, inf, counts as a large value, not dropped).
    groups: the seed of each reading. Snapshots of one run are correlated, so the bootstrap
    then draws seeds with replacement and, within each drawn seed, its snapshots with
    replacement; without groups it draws the readings themselves."""
    labels = list(groups) if groups is not None else list(range(len(readings)))
    if len(labels) != len(readings):
        raise ConfigError(f"noise window: {len(labels)} group labels for {len(readings)} "
                          f"readings")
    by_group = {}
    for (step, value), label in zip(readings, labels):
        if abs(step) <= half_width:
            by_group.setdefault(label, []).append(float(value))
    inside = np.array([v for vs in by_group.values() for v in vs])
    if len(inside) < 3:
        raise ConfigError(f"noise window: {len(inside)} snapshot(s) within +-{half_width:g} "
                          f"steps of the target, need at least 3 (more snapshots, or a wider "
                          f"window)")
    rng = np.random.default_rng(seed)
    if groups is None:
        boot = np.median(inside[rng.integers(0, len(inside), size=(replicates, len(inside)))],
                         axis=1)
    else:
        # seeds as rows of a NaN-padded table; a replicate draws rows, then within each row
        # as many of its snapshots as it has (positions past a row's size stay NaN)
        sizes = np.array([len(vs) for vs in by_group.values()])
        table = np.full((len(sizes), sizes.max()), np.nan)
        for k, vs in enumerate(by_group.values()):
            table[k, :len(vs)] = vs
        rows = rng.integers(0, len(sizes), size=(replicates, len(sizes)))
        n = sizes[rows][..., None]                                      # [R, G, 1]
        cols = np.floor(rng.random((replicates, len(sizes), sizes.max())) * n).astype(int)
        drawn = np.where(np.arange(sizes.max()) < n, table[rows[..., None], cols], np.nan)
        boot = np.nanmedian(drawn.reshape(replicates, -1), axis=1)
    tail = 0.5 * (1 - level)
    return Interval(float(np.median(inside)), float(np.quantile(boot, tail, method="lower")),
                    float(np.quantile(boot, 1 - tail, method="higher")))


def measurement_points(runs, optimizer, protocol):
    """{seed: SweepPoints} of one optimizer's fresh-seed runs under `protocol` (the tuned
    protocol's B_ref runs are the scaled protocol's: same lr, same seeds)."""
    out = {}
    for r in _measures(runs, optimizer, protocol):
        if r["status"] == "reached":
            point = SweepPoint(r["batch"], r["steps_to_target"], r["steps_to_target"])
        else:   # missed within the budget, or diverged (it would never have reached it)
            steps = r["budget_steps"] if r["diverged"] else r["steps"]
            point = SweepPoint(r["batch"], None, steps)
        out.setdefault(r["seed"], []).append(point)
    return out


def _measures(runs, optimizer, protocol):
    b_ref = min(r["batch"] for r in runs if r["optimizer"] == optimizer)
    for r in runs:
        if r["optimizer"] != optimizer or r["role"] != "measure":
            continue
        if r["protocol"] == protocol or (r["batch"] == b_ref and r["protocol"] == "scaled"):
            yield r


def accuracy_by_batch(runs, optimizer, protocol):
    """batch -> the test accuracies at the end of the epoch budget, one per fresh seed."""
    by = {}
    for r in _measures(runs, optimizer, protocol):
        by.setdefault(r["batch"], []).append(r["test_accuracy"])
    return by


def _as_dict(interval):
    return interval.as_dict() if interval is not None else None


def protocol_summary(runs, optimizer, protocol):
    """summary[optimizer][protocol] of results.json: b_ref, b_max, and per batch the test
    accuracy (%) and the drop against B_ref (pp) with their 95 % intervals."""
    values = accuracy_by_batch(runs, optimizer, protocol)
    acc = accuracy_summary(values)
    return {"b_ref": acc["b_ref"], "b_max": acc["b_max"],
            "positive_control_batch": positive_control(acc["drop_pp"]),
            "accuracy_pct": {str(b): _as_dict(v) for b, v in acc["accuracy_pct"].items()},
            "drop_pp": {str(b): _as_dict(v) for b, v in acc["drop_pp"].items()},
            "test_accuracy_values": {str(b): v for b, v in sorted(values.items())}}


def noise_summary(runs, info, bootstrap=300, noise_window=0.25):
    """noise[optimizer]: B_crit from the tuned protocol's steps to target (fit-form
    envelope), B_noise as the median of the window probes around each seed's target, and
    their ratio."""
    by_seed = measurement_points(runs, info["optimizer"], "tuned")
    b_crit = b_crit_fit_forms(by_seed, replicates=bootstrap)
    fit = fit_tradeoff([p for pts in by_seed.values() for p in pts])
    readings = [(w["offset"], w["b_simple"] if w["b_simple"] is not None else math.inf)
                for p in info["probes"] for w in p.get("window", [])]
    seeds = [p["seed"] for p in info["probes"] for _ in p.get("window", [])]
    try:
        noise = noise_in_window(readings, noise_window, groups=seeds)
    except ConfigError:          # too few snapshots near the target: no B_noise
        noise = None
    online = [p.get("online_b_simple_at_target") for p in info["probes"]
              if p.get("online_b_simple_at_target") is not None]
    ratio = ratio_ci = None
    if b_crit["estimate"] and noise is not None and b_crit["ci_low"]:
        ratio = noise.estimate / b_crit["estimate"]
        ratio_ci = [noise.ci_low / b_crit["ci_high"], noise.ci_high / b_crit["ci_low"]]
    return {"b_crit": {k: b_crit[k] for k in ("estimate", "ci_low", "ci_high")},
            "b_crit_fits": b_crit["fits"],
            "s_min": fit.s_min if fit else None, "e_min": fit.e_min if fit else None,
            "b_noise": dict(_as_dict(noise) or {"estimate": None, "ci_low": None,
                                                "ci_high": None},
                            window=noise_window, snapshots=len(readings)),
            "b_simple_online_at_target": float(np.median(online)) if online else None,
            "predicted_over_measured": ratio, "predicted_over_measured_ci": ratio_ci,
            "probes": info["probes"]}


def analyse_study(runs, infos, bootstrap=300, noise_window=0.25):
    """summary, positive_control and noise of results.json from every run and each
    optimizer's info (issue 21). The positive control is rule-scaled SGD's smallest batch that
    loses >= 1 pp with an interval above 0 (any optimizer's when there is no SGD)."""
    summary, noise = {}, {}
    for info in infos:
        opt = info["optimizer"]
        summary[opt] = {p: protocol_summary(runs, opt, p) for p in ("scaled", "tuned")}
        noise[opt] = noise_summary(runs, info, bootstrap, noise_window)
    control = None
    for opt in sorted(summary, key=lambda o: o != "sgd"):
        s = summary[opt]["scaled"]
        if s["positive_control_batch"] is not None:
            b = s["positive_control_batch"]
            control = {"optimizer": opt, "protocol": "scaled", "batch": b,
                       "drop_pp": s["drop_pp"][str(b)]}
            break
    return {"summary": summary, "positive_control": control, "noise": noise,
            "limit": limit_verdict(runs, summary)}


PUSH_FACTOR = 4          # "LARS/LAMB push the limit": b_max at least this times SGD's ...


def limit_verdict(runs, summary, level: float = 0.95) -> dict:
    """Issue 21 item 4, per layer-wise optimizer and protocol: its b_max against SGD's, and at
    its b_max the test-accuracy difference to SGD (pp, optimizer - SGD) with Welch's interval.
    `pushes_limit` is True only when b_max >= 4x SGD's and that interval lies above 0 (under
    "scaled" this is the claim; under "tuned" it says whether the gap survives tuning)."""
    if "sgd" not in summary:
        return {}
    out = {}
    for opt in summary:
        if opt == "sgd":
            continue
        out[opt] = {}
        for protocol in summary[opt]:
            mine, base = summary[opt][protocol], summary["sgd"][protocol]
            batch = mine["b_max"]
            a = [100.0 * v for v in accuracy_by_batch(runs, opt, protocol).get(batch, [])]
            b = [100.0 * v for v in accuracy_by_batch(runs, "sgd", protocol).get(batch, [])]
            diff = welch_interval(a, b, level) if len(a) >= 2 and len(b) >= 2 else None
            ratio = batch / base["b_max"]
            out[opt][protocol] = {
                "b_max": batch, "sgd_b_max": base["b_max"], "ratio": ratio,
                "diff_pp": _as_dict(diff),
                "pushes_limit": bool(ratio >= PUSH_FACTOR and diff is not None
                                     and diff.ci_low > 0)}
    return out
