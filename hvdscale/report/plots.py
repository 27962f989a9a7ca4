"""The report's plots: one PNG per view, a curve per run, drawn on matplotlib's Agg canvas
(no display, pyplot's global state untouched)."""
import io
from typing import List, Sequence

from hvdscale.report.runs import Run, examples_seen, target_of


def colors() -> List[str]:
    """The curves' colours as #rrggbb (matplotlib's default cycle), shared by the plots and
    the table's swatches."""
    import matplotlib
    from matplotlib.colors import to_hex
    return [to_hex(c) for c in matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]] * 10


def figures(runs: Sequence[Run]) -> List[tuple]:
    """(file name, title, caption, PNG bytes) for each plot."""
    # a Figure with the Agg canvas: no display, and pyplot's global state is left alone
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter

    palette = colors()
    targets = {t for t in (target_of(r) for r in runs) if t is not None}
    longest = max(e["elapsed_s"] for r in runs for e in r.evaluations)
    minutes = longest > 300
    time_unit = "min" if minutes else "s"

    def seconds(values):
        return [v / 60 for v in values] if minutes else list(values)

    def draw(name, title, caption, ylabel, xlabel, series, target_line=False, eng_x=False):
        fig = Figure(figsize=(6.4, 3.9), dpi=110)
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        drawn = False
        for run, color in zip(runs, palette):
            xs, ys = series(run)
            pts = [(x, y) for x, y in zip(xs, ys) if x is not None and y is not None]
            if not pts:
                continue
            drawn = True
            ax.plot(*zip(*pts), color=color, label=run.label, linewidth=1.8,
                    marker="o" if len(pts) <= 30 else None, markersize=4)
        if target_line:
            for t in sorted(targets):
                ax.axhline(t, color="0.45", linestyle="--", linewidth=1)
                ax.annotate(f"target {t:g}", xy=(1, t), xycoords=("axes fraction", "data"),
                            xytext=(-4, 3), textcoords="offset points", ha="right",
                            fontsize=8, color="0.35")
        if eng_x:                          # 250k, 1M rather than 250000, 1e6
            ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        ax.set_title(title, fontsize=11)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if not drawn:
            ax.text(0.5, 0.5, "no data recorded", ha="center", va="center",
                    transform=ax.transAxes, color="0.4")
        elif len(runs) > 1:
            ax.legend(fontsize=8, loc="best")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return name, title, caption, buf.getvalue()

    def evals(key_x):
        return lambda r: ([e.get(key_x) for e in r.evaluations],
                          [e["test_accuracy"] for e in r.evaluations])

    def curve(key, per_worker=False, fallback=None):
        def series(run):
            if run.steps:
                ys = [s.get(key) for s in run.steps]
                if per_worker:
                    ys = [y / s["workers"] if y is not None else None
                          for y, s in zip(ys, run.steps)]
                return [s["epoch"] for s in run.steps], ys
            if fallback is None:
                return [], []
            ys = [e.get(fallback) for e in run.evaluations]
            if per_worker:
                ys = [y / e["workers"] if y is not None else None
                      for y, e in zip(ys, run.evaluations)]
            return [e["epoch"] for e in run.evaluations], ys
        return series

    figures = [
        draw("accuracy_time.png", "Test accuracy against training time",
             "Training time excludes evaluation and checkpoints; the dashed line is the "
             "target.", "test accuracy", f"training time ({time_unit})",
             lambda r: (seconds(e["elapsed_s"] for e in r.evaluations),
                        [e["test_accuracy"] for e in r.evaluations]), target_line=True),
        draw("accuracy_epochs.png", "Test accuracy against epochs",
             "Statistical efficiency: what each pass over the data buys.", "test accuracy",
             "epochs", evals("epoch"), target_line=True),
        draw("accuracy_examples.png", "Test accuracy against examples seen",
             "Training examples over all workers.", "test accuracy", "examples seen",
             lambda r: (examples_seen(r.evaluations), [e["test_accuracy"] for e in r.evaluations]),
             target_line=True, eng_x=True),
        draw("train_loss.png", "Training loss",
             "Mean over all workers' examples since the previous point (log.every_steps).",
             "training loss", "epochs", curve("loss", fallback="train_loss")),
        draw("images_per_sec.png", "Throughput per worker",
             "Training images/s per worker; evaluation, checkpoints and each session's first "
             "step are excluded.", "images/s per worker", "epochs",
             curve("images_per_sec", per_worker=True, fallback="images_per_sec")),
        draw("lr.png", "Learning rate", "The rate of the step at each point (warm-up, decay).",
             "learning rate", "epochs", curve("lr", fallback="lr")),
    ]
    if any(len({s.get("global_batch") for s in r.steps}) > 1 for r in runs):
        figures.append(batch_panels(runs, palette, evals("epoch"), curve("global_batch"),
                                    curve("lr", fallback="lr"), targets))
    return figures


def batch_panels(runs, palette, accuracy, batch, lr, targets):
    """Test accuracy, the global batch and the learning rate over the same epochs, one panel
    each: how the batch (batch.adaptive, an elastic world change) moved beside what the
    accuracy did."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    fig = Figure(figsize=(6.4, 7.2), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, 1, sharex=True)
    rows = ((accuracy, "test accuracy", "-", False), (batch, "global batch", "steps-post", True),
            (lr, "learning rate", "-", False))
    for ax, (series, ylabel, style, log_y) in zip(axes, rows):
        for run, color in zip(runs, palette):
            xs, ys = series(run)
            pts = [(x, y) for x, y in zip(xs, ys) if x is not None and y is not None]
            if pts:
                ax.plot(*zip(*pts), color=color, label=run.label, linewidth=1.8,
                        drawstyle=style if style != "-" else "default")
        if log_y:                          # 64, 128, ... rather than 2^6, 2^7
            ax.set_yscale("log", base=2)
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    for t in sorted(targets):
        axes[0].axhline(t, color="0.45", linestyle="--", linewidth=1)
    axes[0].set_title("Accuracy, global batch and learning rate", fontsize=11)
    axes[-1].set_xlabel("epochs")
    if len(runs) > 1:
        axes[0].legend(fontsize=8, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return ("global_batch.png", "Accuracy, global batch and learning rate",
            "The global batch in force at each point (it grows under batch.adaptive, and "
            "changes when workers leave or join an elastic run under rescale_lr), beside the "
            "test accuracy and the learning rate; the dashed line is the target.",
            buf.getvalue())
