"""The sweep report: one Markdown file and PNG plots from the sweep's run records.

Input is the list of run records written by hvdscale.study.sweep (results.json); the report
can be regenerated from that file alone (`hvdscale sweep --report-only DIR`).
Plots use matplotlib's Agg backend, so no display is needed.
"""
import math
import statistics
from collections import defaultdict
from pathlib import Path

from hvdscale.core.metrics import B_CRIT_RULE, SweepPoint, b_crit_from_sweep, fit_steps_model

STEPS_PLOT = "steps_vs_batch.png"
ACCURACY_PLOT = "accuracy_vs_batch.png"
NOISE_PLOT = "noise_scale.png"


def aggregate(runs):
    """One point per (setting, batch size), repeats over seeds combined.

    Steps to target: the geometric mean when every seed reached the target; otherwise the point
    is censored (missed) at the largest number of steps any seed ran, so a single lucky seed
    does not hide a failure.
    """
    groups = defaultdict(list)
    for run in runs:
        groups[(run["setting"], run["batch_size"])].append(run)
    points = {}
    for (setting, batch), group in groups.items():
        ok = [r for r in group if r.get("status") == "ok"]
        reached = [r for r in ok if r.get("steps_to_target") is not None]
        row = {
            "setting": setting, "batch_size": batch, "seeds": len(group),
            "optimizer": group[0].get("optimizer"),
            "failed": len(group) - len(ok),
            "reached": len(reached) == len(group),
            "steps_to_target": _geomean([r["steps_to_target"] for r in reached])
            if len(reached) == len(group) else None,
            # a censored point needs more than the steps its missing seeds ran
            "steps_run": max((r.get("steps_run") or 0) for r in group
                             if len(reached) == len(group) or r not in reached),
            "time_to_target_s": _mean([r.get("time_to_target_s") for r in reached])
            if len(reached) == len(group) else None,
            "epochs_to_target": _mean([r.get("epochs_to_target") for r in reached])
            if len(reached) == len(group) else None,
            "time_per_step_s": _mean([r.get("time_per_step_s") for r in ok]),
            "time_s": _mean([r.get("time_s") for r in ok]),
            "best_accuracy": _mean([r.get("best_accuracy") for r in ok]),
            "accuracy_at_budget": _mean([r.get("accuracy_at_budget") for r in ok]),
            "b_simple_at_target": _median([r.get("b_simple_at_target") for r in reached]),
            "peak_lr": group[0].get("peak_lr"),
        }
        points[(setting, batch)] = row
    return points


def _clean(values):
    return [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]


def _mean(values):
    values = _clean(values)
    return sum(values) / len(values) if values else None


def _median(values):
    values = _clean(values)
    return statistics.median(values) if values else None


def _geomean(values):
    values = _clean(values)
    if not values:
        return None
    return math.exp(sum(math.log(max(v, 1e-12)) for v in values) / len(values))


def analyse(runs):
    """Per setting: the measured B_crit (rule), the model fit and the noise-scale prediction."""
    points = aggregate(runs)
    settings = _settings_in_order(runs)
    analysis = {}
    for setting in settings:
        rows = sorted((r for (s, _), r in points.items() if s == setting),
                      key=lambda r: r["batch_size"])
        sweep_points = [SweepPoint(r["batch_size"], r["steps_to_target"], r["steps_run"])
                        for r in rows]
        measured = b_crit_from_sweep(sweep_points)
        fit = fit_steps_model(sweep_points)
        predictions = _clean([r["b_simple_at_target"] for r in rows])
        analysis[setting] = {
            "rows": rows,
            "measured": measured,
            "fit": fit,
            "predicted": statistics.median(predictions) if predictions else None,
            "predicted_range": (min(predictions), max(predictions)) if predictions else None,
        }
    return analysis


def _settings_in_order(runs):
    seen = []
    for run in runs:
        if run["setting"] not in seen:
            seen.append(run["setting"])
    return seen


def _fmt(value, spec="{:.0f}", missing="-"):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return spec.format(value)


def _b_crit_cell(measured):
    if measured.status == "measured":
        return f"{measured.b_crit:.0f}"
    if measured.status == "upper_bound":
        return f"<= {measured.b_crit:.0f}"
    if measured.status == "above_range":
        return f"> {measured.bracket[0]}"
    return "undefined"


def _ratio_note(measured, predicted):
    if predicted is None or measured.b_crit is None:
        return "-"
    ratio = predicted / measured.b_crit
    return f"{ratio:.2f}x"


def findings(analysis):
    """Plain sentences: predicted vs measured B_crit per setting, and each setting's B_crit and
    small-batch cost against the first setting (the baseline)."""
    out = []
    settings = list(analysis)
    for setting in settings:
        a = analysis[setting]
        measured, predicted = a["measured"], a["predicted"]
        text = f"- **{setting}**: {measured.describe()}"
        if predicted is not None and measured.b_crit is not None:
            ratio = predicted / measured.b_crit
            word = "below" if ratio < 1 else "above"
            text += (f"; the noise scale predicts {predicted:.0f}, {ratio:.2f}x the measured value "
                     f"({abs(math.log2(ratio)):.1f} octaves {word})")
        elif predicted is not None:
            text += f"; the noise scale predicts {predicted:.0f}"
        else:
            text += "; no noise-scale reading at the target"
        out.append(text + ".")
    if len(settings) > 1:
        base = analysis[settings[0]]
        base_row = base["rows"][0]
        for setting in settings[1:]:
            a = analysis[setting]
            row = a["rows"][0]
            parts = []
            mb, bb = a["measured"], base["measured"]
            if mb.b_crit is not None and bb.b_crit is not None:
                parts.append(f"B_crit {mb.b_crit / bb.b_crit:.2f}x that of {settings[0]} "
                             f"({'up' if mb.b_crit > bb.b_crit else 'down'})")
            else:
                parts.append(f"B_crit not comparable with {settings[0]} "
                             f"({mb.status} vs {bb.status})")
            if row["reached"] and base_row["reached"] and row["batch_size"] == base_row["batch_size"]:
                parts.append(f"at batch {row['batch_size']} it needs "
                             f"{row['steps_to_target'] / base_row['steps_to_target']:.2f}x the "
                             f"steps of {settings[0]}")
            largest = [r for r in a["rows"] if r["reached"]]
            if largest:
                top = largest[-1]
                parts.append(f"largest batch reaching the target: {top['batch_size']} in "
                             f"{top['steps_to_target']:.0f} steps")
            out.append(f"- {setting} vs {settings[0]}: " + "; ".join(parts) + ".")
        base_reached = [r for r in base["rows"] if r["reached"]]
        if base_reached:
            top = base_reached[-1]
            out.append(f"- {settings[0]}: largest batch reaching the target: {top['batch_size']} "
                       f"in {top['steps_to_target']:.0f} steps.")
    return out


def write_report(runs, out_dir, meta):
    """Write report.md and the PNGs into out_dir; returns the path of report.md.

    meta: {"command", "machine", "target", "epoch_budget", "date", "data", "notes": [...]}
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    analysis = analyse(runs)
    plots = plot_all(runs, analysis, out_dir, meta)
    lines = [f"# Critical batch size: {meta.get('title', 'batch-size sweep')}", ""]
    lines += [f"- command: `{meta.get('command', '?')}`",
              f"- machine: {meta.get('machine', '?')}",
              f"- date: {meta.get('date', '?')}",
              f"- data: {meta.get('data', '?')}; target test accuracy "
              f"{meta.get('target')}; fixed epoch budget for the accuracy plot: "
              f"{meta.get('epoch_budget')}",
              f"- runs: {len(runs)} ({sum(1 for r in runs if r.get('status') != 'ok')} failed)",
              "", "## How B_crit is read", "", f"{B_CRIT_RULE}.",
              "Large global batches on few processes use gradient accumulation (Horovod's "
              "`backward_passes_per_step`): the micro-batch gradients of one step are averaged "
              "before the single optimizer update, which is the same update as one worker per "
              "micro-batch would make with an allreduce. Steps count optimizer updates; time is "
              "this machine's wall clock, so only its ratios between runs mean anything.",
              "The model fit is McCandlish et al.'s S(B) = S_min (1 + B_crit / B), least squares "
              "on the runs that reached the target. The prediction is the online simple noise "
              "scale B_simple = tr(Sigma)/|G|^2 (EMA, logged as `b_simple` in metrics.jsonl), "
              "read at the evaluation where each run first reached the target, median over the "
              "runs of the setting.", ""]
    lines += ["## Result", "",
              "| setting | optimizer | B_crit measured (2x rule) | bracket | B_crit fit | "
              "S_min fit | B_simple predicted (range) | predicted / measured |",
              "|---|---|---|---|---|---|---|---|"]
    for setting, a in analysis.items():
        measured, fit = a["measured"], a["fit"]
        bracket = "-" if not measured.bracket else " - ".join(str(b) for b in measured.bracket)
        rng = a["predicted_range"]
        predicted = (f"{a['predicted']:.0f} ({rng[0]:.0f} - {rng[1]:.0f})"
                     if a["predicted"] is not None else "-")
        lines.append(f"| {setting} | {a['rows'][0]['optimizer']} | {_b_crit_cell(measured)} | "
                     f"{bracket} | {_fmt(fit[1] if fit else None)} | "
                     f"{_fmt(fit[0] if fit else None)} | {predicted} | "
                     f"{_ratio_note(measured, a['predicted'])} |")
    lines += ["", "## Findings (computed from the table below)", ""] + findings(analysis)
    lines += ["", f"![steps to target vs batch size]({plots['steps']})", "",
              f"![accuracy vs batch size at a fixed epoch budget]({plots['accuracy']})", ""]
    if plots.get("noise"):
        lines += [f"![online noise scale during training]({plots['noise']})", ""]
    lines += ["## Runs", "",
              "Steps / epochs / time are to the target (`>` = missed it within the budget: "
              "the steps run). Accuracy is the best test accuracy of the run; "
              f"'acc @ {meta.get('epoch_budget')} ep' is the best within the fixed epoch budget.",
              "",
              "| batch size | setting | optimizer | peak lr | steps | epochs | time/step (s) | "
              f"time (s) | accuracy | acc @ {meta.get('epoch_budget')} ep | S / S_perfect | "
              "B_simple at target |",
              "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for setting, a in analysis.items():
        excess = a["measured"].excess
        for row in a["rows"]:
            missed = not row["reached"]
            steps = (f"> {row['steps_run']}" if missed else _fmt(row["steps_to_target"]))
            ratio = excess.get(row["batch_size"])
            lines.append(
                f"| {row['batch_size']} | {setting} | {row['optimizer']} | "
                f"{_fmt(row['peak_lr'], '{:.4g}')} | {steps} | "
                f"{_fmt(row['epochs_to_target'], '{:.2f}')} | "
                f"{_fmt(row['time_per_step_s'], '{:.3f}')} | "
                f"{_fmt(row['time_to_target_s'] if not missed else row['time_s'], '{:.1f}')}"
                f"{' (ran)' if missed else ''} | {_fmt(row['best_accuracy'], '{:.4f}')} | "
                f"{_fmt(row['accuracy_at_budget'], '{:.4f}')} | "
                f"{(('>= ' if missed else '') + format(ratio, '.2f')) if ratio else '-'} | "
                f"{_fmt(row['b_simple_at_target'])} |")
    notes = meta.get("notes") or []
    if notes:
        lines += ["", "## Notes", ""] + [f"{n}" for n in notes]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def plot_all(runs, analysis, out_dir, meta):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    plots = {}

    fig, ax = plt.subplots(figsize=(7, 5))
    for i, (setting, a) in enumerate(analysis.items()):
        color = colors[i % len(colors)]
        rows = a["rows"]
        hit = [r for r in rows if r["reached"]]
        miss = [r for r in rows if not r["reached"]]
        ax.plot([r["batch_size"] for r in hit], [r["steps_to_target"] for r in hit], "o-",
                color=color, label=setting)
        if miss:
            ax.plot([r["batch_size"] for r in miss], [max(r["steps_run"], 1) for r in miss], "^",
                    color=color, markerfacecolor="none", label=f"{setting}: missed (> steps run)")
        base = rows[0]
        if base["reached"]:
            xs = [r["batch_size"] for r in rows]
            perfect = [base["steps_to_target"] * base["batch_size"] / b for b in xs]
            ax.plot(xs, perfect, ":", color=color, alpha=0.7)
        measured = a["measured"]
        if measured.b_crit is not None:
            ax.axvline(measured.b_crit, color=color, linestyle="--", alpha=0.6)
        if a["predicted"] is not None:
            ax.axvline(a["predicted"], color=color, linestyle="-.", alpha=0.4)
    ax.set_xscale("log", base=2)
    if ax.has_data():
        ax.set_yscale("log")
    ax.set_xlabel("global batch size")
    ax.set_ylabel(f"steps to {meta.get('target')} test accuracy")
    ax.set_title("Steps to target (dotted: perfect scaling; dashed: B_crit measured; "
                 "dash-dot: B_simple)", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / STEPS_PLOT, dpi=110)
    plt.close(fig)
    plots["steps"] = STEPS_PLOT

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (setting, a) in enumerate(analysis.items()):
        rows = [r for r in a["rows"] if r["accuracy_at_budget"] is not None]
        ax.plot([r["batch_size"] for r in rows], [r["accuracy_at_budget"] for r in rows], "o-",
                color=colors[i % len(colors)], label=setting)
    if meta.get("target"):
        ax.axhline(meta["target"], color="grey", linestyle=":", label="target")
    if ax.has_data():
        ax.set_xscale("log", base=2)
    ax.set_xlabel("global batch size")
    ax.set_ylabel(f"test accuracy after {meta.get('epoch_budget')} epoch(s)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / ACCURACY_PLOT, dpi=110)
    plt.close(fig)
    plots["accuracy"] = ACCURACY_PLOT

    traces = [r for r in runs if r.get("b_simple_trace")]
    if traces:
        fig, ax = plt.subplots(figsize=(7, 4))
        settings = list(analysis)
        for run in traces:
            steps, values = zip(*run["b_simple_trace"])
            color = colors[settings.index(run["setting"]) % len(colors)]
            examples = [s * run["batch_size"] for s in steps]
            ax.plot(examples, values, color=color, alpha=0.35 + 0.5 / (1 + len(traces)),
                    label=f"{run['setting']} B={run['batch_size']}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training examples seen")
        ax.set_ylabel("B_simple (EMA)")
        ax.grid(True, which="both", alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        if len(labels) <= 12:
            ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out_dir / NOISE_PLOT, dpi=110)
        plt.close(fig)
        plots["noise"] = NOISE_PLOT
    return plots
