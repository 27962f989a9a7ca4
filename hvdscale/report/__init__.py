"""`hvdscale report`: runs compared on time to accuracy, as one self-contained HTML page.

Reads each run directory's metrics.jsonl (evaluations, the summary), steps.jsonl (training
curves at `log.every_steps`) and recipe.json (the resolved recipe), draws the curves with
matplotlib's Agg backend (no display, no server) and writes OUT/index.html with the PNGs
embedded, next to the PNGs themselves. Every input is read and checked before anything is
written, and every file is written under a temporary name and renamed, so a bad input leaves
no half-written report.
"""
import os
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from hvdscale.errors import DataError
from hvdscale.report.page import render_page
from hvdscale.report.plots import figures as draw_figures
from hvdscale.report.runs import (Run, check_comparable, label_runs, load_run,  # noqa: F401
                                  replayed_steps_dropped, run_numbers)

REPORT_PAGE = "index.html"


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
    figures = draw_figures(runs)
    names = sorted({r.recipe_name for r in runs if r.recipe_name})
    title = title or "hvdscale report: " + (", ".join(names) if names else
                                             ", ".join(r.path.name for r in runs))
    page = render_page(runs, figures, title).encode()
    out.mkdir(parents=True, exist_ok=True)
    for name, _, _, png in figures:
        _write_atomic(out / name, png)
    _write_atomic(out / REPORT_PAGE, page)       # last: the page marks a complete report
    return out / REPORT_PAGE
