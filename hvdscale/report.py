"""`hvdscale report`: runs compared on time to accuracy, as one self-contained HTML page.

Reads each run directory's metrics.jsonl (evaluations, the summary), steps.jsonl (training
curves at `log.every_steps`) and recipe.json (the resolved recipe), draws the curves with
matplotlib's Agg backend (no display, no server) and writes OUT/index.html with the PNGs
embedded, next to the PNGs themselves. Every input is read and checked before anything is
written, and every file is written under a temporary name and renamed, so a bad input leaves
no half-written report.
"""
import base64
import html
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from hvdscale.errors import DataError

METRICS_FILE = "metrics.jsonl"
STEPS_FILE = "steps.jsonl"          # written by hvdscale.engine.curves
RECIPE_FILE = "recipe.json"
REPORT_PAGE = "index.html"

# settings that name a run when they differ, in this order, with how to say them
NAMED_SETTINGS = (
    ("framework", lambda v: str(v)),
    ("workers", lambda v: f"{v} worker{'s' * (v != 1)}"),
    ("global_batch", lambda v: f"batch {v}"),
    ("optimizer", lambda v: str(v)),
    ("precision", lambda v: str(v)),
)
# recipe sections that do not change what a run computes: not used to tell runs apart
IGNORED_SECTIONS = ("name", "log", "checkpoint", "faults", "plugins", "callbacks")


@dataclass
class Run:
    path: Path
    evaluations: List[Dict[str, Any]]
    steps: List[Dict[str, Any]]
    summary: Optional[Dict[str, Any]]
    recipe: Optional[Dict[str, Any]]
    label: str = ""
    settings: Dict[str, Any] = field(default_factory=dict)

    @property
    def recipe_name(self) -> Optional[str]:
        if self.summary and self.summary.get("recipe"):
            return self.summary["recipe"]
        return (self.recipe or {}).get("name")


def _read_jsonl(path: Path) -> List[Dict[str, Any]]:
    records = []
    with open(path) as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(f"{path} line {number}: not a whole JSON record "
                                f"(truncated file?)") from None
            if not isinstance(record, dict):
                raise DataError(f"{path} line {number}: not a JSON object")
            records.append(record)
    return records


def replayed_steps_dropped(records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """A run resumed from a checkpoint older than its last lines logs those steps again: keep
    the later (resumed) history, so every curve moves forward in steps."""
    kept: List[Dict[str, Any]] = []
    for record in records:
        while kept and kept[-1]["step"] >= record["step"]:
            kept.pop()
        kept.append(record)
    return kept


def load_run(path) -> Run:
    """One run directory, checked: a DataError names the first problem."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: no such run directory")
    metrics = path / METRICS_FILE
    if not metrics.is_file():
        raise DataError(f"{path}: no {METRICS_FILE} in it (not a training run's output "
                        f"directory?)")
    records = _read_jsonl(metrics)
    evaluations = replayed_steps_dropped(
        [r for r in records if "event" not in r and "test_accuracy" in r])
    if not evaluations:
        raise DataError(f"{metrics}: no evaluation records (the run stopped before its "
                        f"first evaluation?)")
    summaries = [r for r in records if r.get("event") == "summary"]
    steps = replayed_steps_dropped(_read_jsonl(path / STEPS_FILE)) \
        if (path / STEPS_FILE).is_file() else []
    recipe = None
    if (path / RECIPE_FILE).is_file():
        try:
            recipe = json.loads((path / RECIPE_FILE).read_text())
        except json.JSONDecodeError:
            raise DataError(f"{path / RECIPE_FILE}: not valid JSON") from None
    run = Run(path, evaluations, steps, summaries[-1] if summaries else None, recipe)
    run.settings = _settings(run)
    return run


def _settings(run: Run) -> Dict[str, Any]:
    last = run.evaluations[-1]
    summary, recipe = run.summary or {}, run.recipe or {}
    train = recipe.get("train", {})
    return {
        "framework": summary.get("framework", last.get("framework")),
        "workers": summary.get("workers", last.get("workers")),
        "global_batch": summary.get("global_batch", last.get("global_batch")),
        "optimizer": summary.get("optimizer", recipe.get("optimizer", {}).get("name")),
        "precision": train.get("precision", "fp32" if recipe else None),
    }


def _flatten(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = json.dumps(value, sort_keys=True) if isinstance(value, list) else value
    return out


def label_runs(runs: Sequence[Run]) -> None:
    """Name each run by what differs between the runs: the main settings first (framework,
    workers, batch, optimizer, precision), then any other recipe value; one run, or runs
    that differ in nothing recorded, by their directory names."""
    if len(runs) == 1:
        runs[0].label = runs[0].path.name
        return
    parts = [[] for _ in runs]
    for key, say in NAMED_SETTINGS:
        values = [r.settings.get(key) for r in runs]
        if len(set(map(str, values))) > 1:
            for words, value in zip(parts, values):
                words.append(say(value) if value is not None else f"{key} ?")
    recipes = [_flatten({k: v for k, v in (r.recipe or {}).items()
                         if k not in IGNORED_SECTIONS}) for r in runs]
    if all(recipes):
        shown = {"framework", "optimizer.name", "batch.per_worker", "batch.accumulation",
                 "train.precision"}
        for key in sorted(set().union(*recipes) - shown):
            values = [rec.get(key) for rec in recipes]
            if len(set(map(str, values))) > 1:
                for words, value in zip(parts, values):
                    words.append(f"{key}={value}")
    labels = [", ".join(words) for words in parts]
    if len(set(labels)) < len(labels):          # nothing tells them apart: directory names
        labels = [f"{r.path.name}" + (f" ({label})" if label else "")
                  for r, label in zip(runs, labels)]
    for run, label in zip(runs, labels):
        run.label = label


def check_comparable(runs: Sequence[Run]) -> None:
    names = {r.recipe_name for r in runs if r.recipe_name}
    if len(names) > 1:
        listed = ", ".join(f"{r.path} ({r.recipe_name})" for r in runs)
        raise DataError(f"runs of different recipes: {listed}; compare runs of one recipe "
                        f"(or pass --any-recipe)")


# ---------------------------------------------------------------------------- numbers
def _target(run: Run) -> Optional[float]:
    if run.summary and run.summary.get("target_accuracy") is not None:
        return run.summary["target_accuracy"]
    return (run.recipe or {}).get("train", {}).get("target_accuracy")


def run_numbers(run: Run) -> Dict[str, Any]:
    """The table's row: from the summary where the run finished, else from its evaluations."""
    s, evals = run.summary or {}, run.evaluations
    target = _target(run)
    hit = next((e for e in evals if target is not None and e["test_accuracy"] >= target), None)
    ips = s.get("images_per_sec", evals[-1].get("images_per_sec"))
    workers = run.settings.get("workers") or 1
    return {
        "finished": run.summary is not None,
        "steps": s.get("steps", evals[-1]["step"]),
        "epochs": s.get("epochs", evals[-1].get("epoch")),
        "final_accuracy": s.get("final_test_accuracy", evals[-1]["test_accuracy"]),
        "best_accuracy": s.get("best_test_accuracy", max(e["test_accuracy"] for e in evals)),
        "target": target,
        "time_to_target_s": s.get("time_to_target_s") if run.summary else
        (hit["elapsed_s"] if hit else None),
        "steps_to_target": s.get("steps_to_target") if run.summary else
        (hit["step"] if hit else None),
        "images_per_sec": ips,
        "images_per_sec_per_worker": ips / workers if ips is not None else None,
        "scaling_efficiency": s.get("scaling_efficiency"),
        "tau_ref": s.get("tau_ref"),
        "train_time_s": s.get("train_time_s", evals[-1].get("elapsed_s")),
        "hardware": s.get("hardware"),
    }


def _examples(records: List[Dict[str, Any]]) -> List[float]:
    """Training examples seen at each record: the batch can change between records
    (elastic runs), so the steps are summed at each record's global batch."""
    seen, last_step, out = 0.0, 0, []
    for r in records:
        seen += (r["step"] - last_step) * r.get("global_batch", 0)
        last_step = r["step"]
        out.append(seen)
    return out


# ---------------------------------------------------------------------------- drawing
def _colors() -> List[str]:
    """The curves' colours as #rrggbb (matplotlib's default cycle), shared by the plots and
    the table's swatches."""
    import matplotlib
    from matplotlib.colors import to_hex
    return [to_hex(c) for c in matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]] * 10


def _figures(runs: Sequence[Run]) -> List[tuple]:
    """(file name, title, caption, PNG bytes) for each plot."""
    import io

    # a Figure with the Agg canvas: no display, and pyplot's global state is left alone
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter

    colors = _colors()
    targets = {t for t in (_target(r) for r in runs) if t is not None}
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
        for run, color in zip(runs, colors):
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
             lambda r: (_examples(r.evaluations), [e["test_accuracy"] for e in r.evaluations]),
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
        figures.append(draw("global_batch.png", "Global batch",
                            "Changes when workers leave or join an elastic run.",
                            "global batch", "epochs", curve("global_batch")))
    return figures


# ---------------------------------------------------------------------------- the page
def _fmt(value, kind):
    if value is None:
        return "&ndash;"
    if kind == "acc":
        return f"{value:.4f}"
    if kind == "time":
        return f"{value:.1f} s" if value < 120 else f"{value / 60:.1f} min"
    if kind == "rate":
        return f"{value:,.0f}"
    if kind == "eff":
        return f"{value:.3f}"
    return html.escape(str(value))


TABLE_COLUMNS = (
    # (heading, key in run_numbers or settings, kind, tooltip)
    ("framework", "framework", "text", None),
    ("workers", "workers", "text", None),
    ("global batch", "global_batch", "text", None),
    ("optimizer", "optimizer", "text", None),
    ("precision", "precision", "text", None),
    ("steps", "steps", "text", None),
    ("time to target", "time_to_target_s", "time", "training time until the first "
     "evaluation at or above the target"),
    ("steps to target", "steps_to_target", "text", None),
    ("final accuracy", "final_accuracy", "acc", None),
    ("best accuracy", "best_accuracy", "acc", None),
    ("img/s", "images_per_sec", "rate", "all workers, training steps only"),
    ("img/s per worker", "images_per_sec_per_worker", "rate", None),
    ("scaling efficiency", "scaling_efficiency", "eff", "img/s / (workers x tau_ref); "
     "needs tau_ref (hvdscale bench --save-ref, train --tau-ref)"),
)

STYLE = """
body { font: 14px/1.45 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #222;
       margin: 24px auto; max-width: 1340px; padding: 0 16px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; }
.meta { color: #666; margin-bottom: 16px; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
table { width: 100%; }
th, td { border-bottom: 1px solid #ddd; padding: 5px 8px; text-align: right; }
td { white-space: nowrap; }
th { background: #f3f4f6; font-weight: 600; vertical-align: bottom; font-size: 13px; }
.verdict { font-size: 15px; margin: 4px 0 14px; }
td.run, th.run { text-align: left; }
.swatch { display: inline-block; width: 12px; height: 12px; border-radius: 2px;
          margin-right: 6px; vertical-align: -1px; }
.note { color: #666; font-size: 13px; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(460px, 1fr));
        gap: 18px; }
figure { margin: 0; border: 1px solid #e5e7eb; border-radius: 6px; padding: 8px; }
figure img { width: 100%; height: auto; display: block; }
figcaption { color: #555; font-size: 13px; margin-top: 4px; }
code { background: #f3f4f6; padding: 1px 4px; border-radius: 3px; }
"""


def verdict(runs: Sequence[Run]) -> Optional[str]:
    """One sentence: which run reached the target first, and how much later the others did."""
    if len(runs) < 2:
        return None
    numbers = [(r, run_numbers(r)) for r in runs]
    targets = {n["target"] for _, n in numbers}
    if len(targets) != 1 or None in targets:
        return None
    target = targets.pop()
    reached = sorted(((n["time_to_target_s"], r) for r, n in numbers
                      if n["time_to_target_s"] is not None), key=lambda item: item[0])
    if not reached:
        return f"No run reached the target test accuracy {target:g}."
    best_time, best = reached[0]
    others = []
    for seconds, run in reached[1:]:
        ratio = f", {seconds / best_time:.1f}x as long" if best_time > 0 else ""
        others.append(f"{run.label} in {_fmt(seconds, 'time')}{ratio}")
    others += [f"{r.label} not at all" for r, n in numbers if n["time_to_target_s"] is None]
    return (f"First to test accuracy {target:g}: <b>{html.escape(best.label)}</b> in "
            f"{_fmt(best_time, 'time')} of training" +
            (f" ({html.escape('; '.join(others))})." if others else "."))


def render_page(runs: Sequence[Run], figures, title: str) -> str:
    colors = _colors()
    rows = []
    for run, color in zip(runs, colors):
        numbers = {**run.settings, **run_numbers(run)}
        cells = [f'<td class="run"><span class="swatch" style="background:{color}"></span>'
                 f'{html.escape(run.label)}</td>']
        for _, key, kind, _ in TABLE_COLUMNS:
            text = _fmt(numbers.get(key), kind)
            if key == "time_to_target_s" and numbers.get(key) is None and numbers["target"]:
                text = "not reached"
            cells.append(f'<td data-key="{key}">{text}</td>')
        rows.append(f'<tr data-run="{html.escape(str(run.path))}">' + "".join(cells) + "</tr>")
    heads = ['<th class="run">run</th>'] + [
        f'<th title="{html.escape(tip)}">{name}</th>' if tip else f"<th>{name}</th>"
        for name, _, _, tip in TABLE_COLUMNS]
    notes = []
    targets = sorted({t for t in (_target(r) for r in runs) if t is not None})
    if targets:
        notes.append("Target test accuracy " + ", ".join(f"{t:g}" for t in targets) +
                     "; time to target is training time (evaluation and checkpoints "
                     "excluded) until the first evaluation at or above it.")
    if all(r.summary is None or r.summary.get("scaling_efficiency") is None for r in runs):
        notes.append("Scaling efficiency needs one worker's images/s (tau_ref): "
                     "<code>hvdscale bench --save-ref</code>, then "
                     "<code>hvdscale train --tau-ref FILE</code>.")
    unfinished = [r for r in runs if r.summary is None]
    if unfinished:
        notes.append("Not finished (numbers from the last evaluation): " +
                     ", ".join(html.escape(r.label) for r in unfinished) + ".")
    details = []
    for run in runs:
        hardware = (run.summary or {}).get("hardware")
        details.append(f"<li><b>{html.escape(run.label)}</b>: <code>"
                       f"{html.escape(str(run.path.resolve()))}</code>"
                       + (f" &middot; {html.escape(hardware)}" if hardware else "") + "</li>")
    figs = []
    for name, fig_title, caption, png in figures:
        data = base64.b64encode(png).decode()
        figs.append(f'<figure><img src="data:image/png;base64,{data}" '
                    f'alt="{html.escape(fig_title)}" data-file="{name}">'
                    f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    when = time.strftime("%Y-%m-%d %H:%M %Z")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title><style>{STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<div class="meta">{len(runs)} run{'s' * (len(runs) != 1)} &middot; written {when} by
<code>hvdscale report</code></div>
{f'<p class="verdict">{verdict(runs)}</p>' if verdict(runs) else ''}
<table id="runs"><thead><tr>{''.join(heads)}</tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody></table>
<p class="note">{'<br>'.join(notes)}</p>
<h2>Curves</h2>
<div class="grid">
{chr(10).join(figs)}
</div>
<h2>Runs</h2>
<ul>{''.join(details)}</ul>
</body></html>
"""


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)     # mkstemp's 0600 would hide the report from the group
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def default_out(run_dirs: Sequence[Path]) -> Path:
    """One run: RUN/report; several: report/ in their common parent directory."""
    dirs = [Path(d).resolve() for d in run_dirs]
    if len(dirs) == 1:
        return dirs[0] / "report"
    return Path(os.path.commonpath([str(d.parent) for d in dirs])) / "report"


def write_report(run_dirs: Sequence, out_dir=None, *, any_recipe: bool = False,
                 title: Optional[str] = None) -> Path:
    """Read and check every run, then write OUT/index.html and the PNGs; returns the page's
    path. Raises DataError (one line) for a bad input before writing anything."""
    if not run_dirs:
        raise DataError("no run directories given")
    runs = [load_run(d) for d in run_dirs]
    seen = set()
    for run in runs:
        key = run.path.resolve()
        if key in seen:
            raise DataError(f"{run.path}: given twice")
        seen.add(key)
    if not any_recipe:
        check_comparable(runs)
    label_runs(runs)
    out = Path(out_dir) if out_dir is not None else default_out(run_dirs)
    figures = _figures(runs)
    names = sorted({r.recipe_name for r in runs if r.recipe_name})
    title = title or "hvdscale report: " + (", ".join(names) if names else
                                             ", ".join(r.path.name for r in runs))
    page = render_page(runs, figures, title).encode()
    out.mkdir(parents=True, exist_ok=True)
    for name, _, _, png in figures:
        _write_atomic(out / name, png)
    _write_atomic(out / REPORT_PAGE, page)       # last: the page marks a complete report
    return out / REPORT_PAGE
