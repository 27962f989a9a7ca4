"""report.md and the four plots of the study, from the results.json payload
(hvdscale.study.sweep + hvdscale.study.analysis)."""
from pathlib import Path

import numpy as np

COLORS = {"sgd": "tab:blue", "lars": "tab:orange", "lamb": "tab:green", "adamw": "tab:red"}


def _fmt(v, digits=0):
    return "-" if v is None else f"{v:.{digits}f}"


def _ci(d, digits=0):
    if not d or d.get("estimate") is None:
        return "-"
    lo, hi = d.get("ci_low"), d.get("ci_high")
    return f"{d['estimate']:.{digits}f} [{_fmt(lo, digits)}, {_fmt(hi, digits)}]"


def write_report(payload, report_dir):
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    plots = write_plots(payload, report_dir)
    text = render(payload, plots)
    path = report_dir / "report.md"
    path.write_text(text)
    return path


def render(payload, plots):
    meta = payload["meta"]
    settings = payload["settings_results"]
    lines = [f"# Critical batch size, tuned per batch size: {', '.join(s['setting'] for s in settings)}",
             "",
             f"- command: `{meta['command']}`",
             f"- machine: {meta['machine']}; load average at start {meta['load_start']}, "
             f"at end {meta['load_end']}",
             f"- date: {meta['date']}; wall time {meta['wall_s'] / 60:.1f} min, CPU time "
             f"{meta.get('cpu_s', 0) / 60:.1f} min in {meta.get('jobs', 1)} worker process(es) "
             f"of one torch thread ({meta['runs']} training runs)",
             f"- data: {meta['data']}; held-out subset for steps-to-target: "
             f"{meta['eval_examples']} fixed test images; accuracy at the budget: all "
             f"10000 test images",
             f"- target: {meta['target']} held-out accuracy; accuracy budget "
             f"{meta['accuracy_epochs']} epoch(s); fresh seeds {meta['seeds']} (tuning seed "
             f"{meta['tune_seed']})",
             "- runs: in this process (hvdscale.study.inproc), one process whose batch is the "
             "global batch: the same updates as K Horovod workers averaging K shares of it.",
             "",
             "## Result", "",
             "| setting | B_crit fit [95% CI, fit forms] | 2x rule - 2 B_ref | B_noise, window "
             "median [95% CI] | online B_simple at target | predicted / measured [95% CI] "
             "| b_max | positive control |",
             "|---|---|---|---|---|---|---|---|"]
    for s in settings:
        ratio = s["predicted_over_measured"]
        rci = s.get("predicted_over_measured_ci")
        control = s.get("positive_control_batch")
        lines.append(
            f"| {s['setting']} | {_ci(s['b_crit'])} | {_fmt(s['b_crit_2x_rule_offset_removed'])} "
            f"| {_ci(s['b_noise'])} "
            f"| {_fmt(s['b_simple_online_at_target'])} "
            f"| {_fmt(ratio, 2)} [{_fmt(rci[0], 2) if rci else '-'}, "
            f"{_fmt(rci[1], 2) if rci else '-'}] "
            f"| {s['b_max']} | {control if control is not None else 'none'} |")
    lines += ["", "## Findings", ""]
    for s in settings:
        noise = s["b_noise"]
        lines.append(
            f"- **{s['setting']}**: B_crit = {_ci(s['b_crit'])} (S_min {_fmt(s['s_min'])} steps, "
            f"E_min {_fmt(s['e_min'])} examples; the interval spans the fits with and without "
            f"the smallest batch and per seed); B_noise = {_ci(noise)}, the median of "
            f"{noise['snapshots']} frozen-weights probes within +-{100 * noise['window']:.0f} % "
            f"of each seed's steps to target, {_fmt(s['predicted_over_measured'], 2)}x the fit. "
            f"b_max (mean drop < 0.5 pp, upper 95 % bound < 1 pp against B_ref={s['b_ref']}) "
            f"is {s['b_max']}.")
    lines += ["", "## Accuracy at the fixed epoch budget (%, mean [95 % t-interval] over the "
              "fresh seeds; drop against B_ref in pp [Welch 95 %])", "",
              "| batch | " + " | ".join(s["setting"] for s in settings) + " |",
              "|---:|" + "---|" * len(settings)]
    batches = sorted({int(b) for s in settings for b in s["accuracy_values"]})
    for b in batches:
        cells = []
        for s in settings:
            acc, drop = s["accuracy_pct"].get(str(b)), s["drop_pp"].get(str(b))
            cell = _ci(acc, 2)
            if drop is not None:
                cell += f"; drop {_ci(drop, 2)}"
            cells.append(cell)
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    lines += ["", "## Learning rates tried per batch size (bold: fewest steps to target; "
              "+: best accuracy at the epoch budget)", "",
              "| batch | " + " | ".join(s["setting"] for s in settings) + " |",
              "|---:|" + "---|" * len(settings)]
    for b in batches:
        cells = []
        for s in settings:
            grid = s["lr_grid"].get(str(b), [])
            chosen = s["chosen_lr"].get(str(b))
            chosen_acc = s.get("chosen_lr_accuracy", {}).get(str(b))
            cells.append(", ".join((f"**{v:.3g}**" if v == chosen else f"{v:.3g}")
                                   + ("+" if v == chosen_acc else "") for v in grid))
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    lines += [""] + [f"![{name}]({name})" for name in plots] + [""]
    lines += ["## Runs", "",
              "Steps to target are interpolated between evaluations; `>` = missed within the "
              "budget (a censored point, an inequality in the fit); `div` = diverged.", "",
              "| setting | batch | role | lr | seed | status | steps to target | budget | "
              "eval every | warm-up | acc @ budget | wall (s) |",
              "|---|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in payload["runs"]:
        steps = _fmt(r["steps_to_target"], 1) if r["status"] == "reached" else \
            (f"div@{r['diverged_at']}" if r["status"] == "diverged" else f">{r['steps_run']}")
        acc = _fmt(100 * r["accuracy_at_budget"], 2) if r["accuracy_at_budget"] is not None else "-"
        lines.append(f"| {r['setting']} | {r['batch_size']} | {r['role']} | {r['lr']:.4g} | "
                     f"{r['seed']} | {r['status']} | {steps} | {r['budget_steps']} | "
                     f"{r['eval_every']} | {r['warmup_steps']} | {acc} | {r['wall_s']:.1f} |")
    return "\n".join(lines) + "\n"


def write_plots(payload, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = payload["settings_results"]
    runs = [r for r in payload["runs"] if r["role"] == "measure"]
    names = []
    n = len(settings)

    # 1. steps to target vs batch, fitted hyperbola and bootstrap band
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.6), squeeze=False)
    for ax, s in zip(axes[0], settings):
        c = COLORS.get(s["optimizer"], "k")
        mine = [r for r in runs if r["setting"] == s["setting"]]
        for r in mine:
            if r["status"] == "reached":
                ax.plot(r["batch_size"], r["steps_to_target"], "o", color=c, alpha=0.7)
            else:
                ax.plot(r["batch_size"], r["steps_run"] if r["status"] == "censored"
                        else r["budget_steps"], "^", color="red", alpha=0.7)
        if s["s_min"]:
            bs = np.geomspace(min(r["batch_size"] for r in mine), max(r["batch_size"] for r in mine), 100)
            ax.plot(bs, s["s_min"] + s["e_min"] / bs, "-", color=c,
                    label=f"fit, B_crit={s['b_crit']['estimate']:.0f}")
            reps = np.array(s.get("fit_replicates") or [])
            if len(reps):
                curves = reps[:, :1] + reps[:, 1:] / bs[None, :]
                lo, hi = np.percentile(curves, [2.5, 97.5], axis=0)
                ax.fill_between(bs, lo, hi, color=c, alpha=0.2, label="95% CI (seed bootstrap)")
            ax.axvline(s["b_crit"]["estimate"], color=c, ls=":", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(s["setting"])
        ax.set_xlabel("global batch B")
        ax.set_ylabel("steps to target")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "steps_vs_batch.png", dpi=110)
    plt.close(fig)
    names.append("steps_vs_batch.png")

    # 2. examples vs steps trade-off
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for s in settings:
        c = COLORS.get(s["optimizer"], "k")
        mine = [r for r in runs if r["setting"] == s["setting"] and r["status"] == "reached"]
        ax.plot([r["steps_to_target"] for r in mine],
                [r["steps_to_target"] * r["batch_size"] for r in mine], "o", color=c, alpha=0.6)
        if s["s_min"]:
            ss = np.geomspace(s["s_min"] * 1.02, s["s_min"] * 60, 200)
            ee = s["e_min"] * (1 + 1 / (ss / s["s_min"] - 1))
            ax.plot(ss, ee, "-", color=c, label=f"{s['setting']}: (S/S_min-1)(E/E_min-1)=1")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("steps to target S")
    ax.set_ylabel("examples to target E = B S")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "tradeoff.png", dpi=110)
    plt.close(fig)
    names.append("tradeoff.png")

    # 3. accuracy at the fixed epoch budget vs batch, 95 % t-intervals over seeds
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for s in settings:
        c = COLORS.get(s["optimizer"], "k")
        rows = sorted((int(b), v) for b, v in s["accuracy_pct"].items() if v is not None)
        if not rows:
            continue
        bs = [b for b, _ in rows]
        mean = np.array([v["estimate"] for _, v in rows])
        err = [mean - [v["ci_low"] for _, v in rows], [v["ci_high"] for _, v in rows] - mean]
        ax.errorbar(bs, mean, yerr=err, marker="o", capsize=3, color=c, label=s["setting"])
        ax.axhline(mean[0] - 0.5, color=c, ls=":", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("global batch B")
    ax.set_ylabel(f"test accuracy (%) after {payload['meta']['accuracy_epochs']} epoch(s)")
    ax.set_title("mean, 95% t-interval over seeds; dotted: B_ref - 0.5 pp")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_batch.png", dpi=110)
    plt.close(fig)
    names.append("accuracy_vs_batch.png")

    # 4. noise scale over training at B_ref: frozen probes, online EMA, B_crit
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.6), squeeze=False)
    for ax, s in zip(axes[0], settings):
        c = COLORS.get(s["optimizer"], "k")
        first = next((p for p in s["probes"] if p.get("over_training")), None)
        if first:
            # a probe that did not resolve |G|^2 (b_simple None, upper bound inf) is left out
            tr = [t for t in first["over_training"] if t["b_simple"] is not None
                  and t["b_simple_ci"] and None not in t["b_simple_ci"]]
            steps = [t["step"] for t in tr]
            b = [t["b_simple"] for t in tr]
            lo = [t["b_simple_ci"][0] for t in tr]
            hi = [t["b_simple_ci"][1] for t in tr]
            ax.errorbar(steps, b, yerr=[np.subtract(b, lo), np.subtract(hi, b)], fmt="o-",
                        color=c, capsize=2, label=f"probe B_simple ({tr[0]['count']}x"
                        f"{tr[0]['micro']}, frozen)" if tr else "probe B_simple")
            if first.get("online_trace"):
                on = np.array(first["online_trace"])
                ax.plot(on[:, 0], on[:, 1], "-", color="gray", alpha=0.6, lw=1,
                        label="online EMA (half-batch pairs)")
            if first.get("steps_to_target"):
                ax.axvline(first["steps_to_target"], color="k", ls=":", lw=1, label="target")
        if s["b_noise"]["estimate"] and first and first.get("steps_to_target"):
            w, t = s["b_noise"]["window"], first["steps_to_target"]
            ax.plot([t * (1 - w), t * (1 + w)], [s["b_noise"]["estimate"]] * 2, "-", lw=3,
                    color="k", alpha=0.5, label="B_noise (window median, all seeds)")
        if s["b_crit"]["estimate"]:
            ax.axhline(s["b_crit"]["estimate"], color="red", lw=1, label="B_crit fit")
            if s["b_crit"]["ci_low"]:
                ax.axhspan(s["b_crit"]["ci_low"], s["b_crit"]["ci_high"], color="red", alpha=0.1)
        ax.set_yscale("log")
        ax.set_xlabel("step at B_ref")
        ax.set_ylabel("noise scale (examples)")
        ax.set_title(s["setting"])
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "noise_scale.png", dpi=110)
    plt.close(fig)
    names.append("noise_scale.png")
    return names
