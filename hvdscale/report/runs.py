"""What `hvdscale report` reads: a run directory's metrics.jsonl (evaluations, the
summary), steps.jsonl (training curves) and recipe.json, checked, with the names and numbers
that compare runs."""
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from hvdscale.errors import DataError

METRICS_FILE = "metrics.jsonl"
STEPS_FILE = "steps.jsonl"          # written by hvdscale.engine.curves
RECIPE_FILE = "recipe.json"

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


def target_of(run: Run) -> Optional[float]:
    if run.summary and run.summary.get("target_accuracy") is not None:
        return run.summary["target_accuracy"]
    return (run.recipe or {}).get("train", {}).get("target_accuracy")


def run_numbers(run: Run) -> Dict[str, Any]:
    """The table's row: from the summary where the run finished, else from its evaluations."""
    s, evals = run.summary or {}, run.evaluations
    target = target_of(run)
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


def examples_seen(records: List[Dict[str, Any]]) -> List[float]:
    """Training examples seen at each record: the batch can change between records
    (elastic runs), so the steps are summed at each record's global batch."""
    seen, last_step, out = 0.0, 0, []
    for r in records:
        seen += (r["step"] - last_step) * r.get("global_batch", 0)
        last_step = r["step"]
        out.append(seen)
    return out
