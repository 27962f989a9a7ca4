"""report.md and the plots of the study from the results.json payload (hvdscale.study.sweep +
hvdscale.study.analysis): accuracy versus batch with 95 % intervals for both protocols,
steps to target with the fitted trade-off, the noise scale over training."""
from pathlib import Path

COLORS = {"sgd": "tab:blue", "lars": "tab:orange", "lamb": "tab:green", "adamw": "tab:red"}
PROTOCOLS = ("scaled", "tuned")


def _fmt(v, digits=0):
    return "-" if v is None else f"{v:.{digits}f}"


def _ci(d, digits=0):
    if not d or d.get("estimate") is None:
        return "-"
    return f"{d['estimate']:.{digits}f} [{_fmt(d.get('ci_low'), digits)}, " \
           f"{_fmt(d.get('ci_high'), digits)}]"


def write_report(payload, report_dir):
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    plots = write_plots(payload, report_dir)
    path = report_dir / "report.md"
    path.write_text(render(payload, plots))
    return path


def render(payload, plots):
    d = payload["design"]
    lines = ["# Large-batch study (hvdscale sweep)", "",
             f"Command: `{d['command']}`", "",
             f"Model {d['model']}; train/validation/test {d['train']}/{d['validation']}/"
             f"{d['test']}; {d['epochs']} epochs; batches {d['batch_sizes']}; seeds "
             f"{d['seeds']}; {len(payload['runs'])} runs; wall {d['wall_s']:.0f} s; load "
             f"{d['load']}.", "",
             "Test accuracy (%, mean [95 % t-interval] over seeds) and drop against B_ref "
             "(pp, Welch 95 %):", ""]
    batches = d["batch_sizes"]
    lines.append("| optimizer | protocol | b_max | " + " | ".join(map(str, batches)) + " |")
    lines.append("|---|---|---|" + "---|" * len(batches))
    for opt, by in payload["summary"].items():
        for p in PROTOCOLS:
            s = by[p]
            cells = []
            for b in batches:
                acc, drop = s["accuracy_pct"].get(str(b)), s["drop_pp"].get(str(b))
                cells.append(_ci(acc, 2) + ("" if drop is None else f"; drop {_ci(drop, 2)}"))
            lines.append(f"| {opt} | {p} | {s['b_max']} | " + " | ".join(cells) + " |")
    pc = payload["positive_control"]
    lines += ["", "Positive control: " + ("none: the range or budget cannot show the effect"
                                           if pc is None else
                                           f"{pc['optimizer']} ({pc['protocol']}) at B = "
                                           f"{pc['batch']} loses {_ci(pc['drop_pp'], 2)} pp"),
              "", "| optimizer | B_crit [95 %] | B_noise [95 %] | predicted / measured |",
              "|---|---|---|---|"]
    for opt, n in payload["noise"].items():
        lines.append(f"| {opt} | {_ci(n['b_crit'])} | {_ci(n['b_noise'])} | "
                     f"{_fmt(n['predicted_over_measured'], 2)} |")
    lines += ["", "Do LARS/LAMB push the limit (b_max >= 4x SGD's and, at that batch, a test-"
              "accuracy gain over SGD whose 95 % interval excludes 0)?", ""]
    for opt, by in payload.get("limit", {}).items():
        for p, v in by.items():
            lines.append(f"- {opt}, {p}: b_max {v['b_max']} vs SGD {v['sgd_b_max']} "
                         f"({v['ratio']:g}x), difference at {v['b_max']}: "
                         f"{_ci(v['diff_pp'], 2)} pp -> "
                         f"{'yes' if v['pushes_limit'] else 'no'}")
    edges = grid_edges(payload["runs"])
    lines += ["", "Chosen lrs still on an edge of their grid after its extensions (the optimum "
              "may lie beyond): " + (", ".join(f"{o} {p} B={b} lr={lr:.4g} ({side})"
                                              for o, p, b, lr, side in edges) or "none") + "."]
    lines += [""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(lines)


def grid_edges(runs):
    """(optimizer, protocol, batch, lr, "lowest" | "highest") for every tuning grid whose chosen
    lr (the one its measurement runs use) is the lowest or highest lr tried with its options."""
    out = []
    keys = {(r["optimizer"], r["protocol"], r["batch"]) for r in runs if r["role"] == "tune"}
    for opt, protocol, batch in sorted(keys):
        measured = [r for r in runs if r["role"] == "measure" and r["optimizer"] == opt
                    and r["batch"] == batch and r["protocol"] == protocol]
        if not measured:
            continue
        chosen, options = measured[0]["lr"], measured[0]["options"]
        lrs = sorted(r["lr"] for r in runs if r["role"] == "tune" and r["optimizer"] == opt
                     and r["protocol"] == protocol and r["batch"] == batch
                     and r["options"] == options)
        if len(lrs) > 1 and chosen in (lrs[0], lrs[-1]):
            out.append((opt, protocol, batch, chosen,
                        "lowest" if chosen == lrs[0] else "highest"))
    return out


def write_plots(payload, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    # the y range shows the band where optimizers differ; a mean below it (runs at chance,
    # diverged) is drawn as a down triangle on the bottom edge instead of stretching the axis
    means = [v["estimate"] for by in payload["summary"].values() for p in PROTOCOLS
             for v in by[p]["accuracy_pct"].values() if v]
    top = max(means) + 0.5
    bottom = max(min(means), top - 12.0) - 0.5
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, p in zip(axes, PROTOCOLS):
        for opt, by in payload["summary"].items():
            acc = {int(b): v for b, v in by[p]["accuracy_pct"].items() if v}
            shown = [b for b in sorted(acc) if acc[b]["estimate"] >= bottom]
            low = [b for b in sorted(acc) if acc[b]["estimate"] < bottom]
            ys = [acc[b]["estimate"] for b in shown]
            err = [[acc[b]["estimate"] - max(acc[b]["ci_low"], 0.0) for b in shown],
                   [min(acc[b]["ci_high"], 100.0) - acc[b]["estimate"] for b in shown]]
            ax.errorbar(shown, ys, yerr=err, marker="o", capsize=3, label=opt,
                        color=COLORS.get(opt))
            if low:
                ax.plot(low, [bottom + 0.15] * len(low), "v", color=COLORS.get(opt),
                        markersize=8)
        ax.set_ylim(bottom, top)
        ax.set_xscale("log", base=2)
        ax.set_title(f"protocol: {p} (v: mean below the axis)")
        ax.set_xlabel("global batch")
    axes[0].set_ylabel("test accuracy (%), 95 % t-interval")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(Path(out) / "accuracy_vs_batch.png", dpi=110)
    plt.close(fig)
    names.append("accuracy_vs_batch.png")

    fig, ax = plt.subplots(figsize=(5, 3.8))
    for r in payload["runs"]:
        if r["role"] == "measure" and r["steps_to_target"] is not None and \
                (r["protocol"] == "tuned" or r["batch"] == min(payload["design"]["batch_sizes"])):
            ax.plot(r["batch"], r["steps_to_target"], "o", alpha=0.6,
                    color=COLORS.get(r["optimizer"]))
    bs = sorted(payload["design"]["batch_sizes"])
    for opt, n in payload["noise"].items():
        if n.get("s_min") and n.get("e_min"):      # S(B) = S_min + E_min / B
            xs = [bs[0] * (bs[-1] / bs[0]) ** (k / 50) for k in range(51)]
            ax.plot(xs, [n["s_min"] + n["e_min"] / b for b in xs], "-",
                    color=COLORS.get(opt), label=f"{opt} fit")
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("global batch")
    ax.set_ylabel("steps to target (validation)")
    fig.tight_layout()
    fig.savefig(Path(out) / "steps_vs_batch.png", dpi=110)
    plt.close(fig)
    names.append("steps_vs_batch.png")

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for opt, n in payload["noise"].items():
        for probe in n["probes"][:1]:
            pts = [(o["step"], o["b_simple"]) for o in probe["over_training"]
                   if o["b_simple"] is not None and o["b_simple"] > 0]
            if pts:
                ax.plot(*zip(*pts), "o-", label=f"{opt} probe", color=COLORS.get(opt))
            if probe["online_trace"]:
                ax.plot(*zip(*probe["online_trace"]), ":", label=f"{opt} online EMA",
                        color=COLORS.get(opt))
            target, w = probe.get("steps_to_target"), (n.get("b_noise") or {}).get("window")
            if target and w:      # the window whose probes give B_noise
                ax.axvspan(target * (1 - w), target * (1 + w), color=COLORS.get(opt),
                           alpha=0.08)
    ax.set_yscale("log")
    ax.set_xlabel("step at B_ref (shaded: the window around the target)")
    ax.set_ylabel("B_simple")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(Path(out) / "noise_scale.png", dpi=110)
    plt.close(fig)
    names.append("noise_scale.png")
    return names
