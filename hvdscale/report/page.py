"""The report's page: one self-contained HTML file (CSS inline, PNGs as data: URIs) with the
verdict, the runs' table and the plots."""
import base64
import html
import time
from typing import Optional, Sequence

from hvdscale.report.plots import colors
from hvdscale.report.runs import Run, run_numbers, target_of


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
    palette = colors()
    rows = []
    for run, color in zip(runs, palette):
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
    targets = sorted({t for t in (target_of(r) for r in runs) if t is not None})
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
