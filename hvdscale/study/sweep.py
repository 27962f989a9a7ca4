"""The critical-batch-size sweep: one `hvdscale train` run per (optimizer setting, global batch
size, seed), each in its own process and output folder, then the report.

Plan of one run
- global batch B = workers * per_worker * accumulation; the per-worker micro-batch is capped
  (`max_per_worker`) and larger batches use gradient accumulation, the same update as more
  workers would make.
- budget: max(`epochs` epochs, `min_steps` steps). The run does not stop at the target: the
  steps to target are read off its evaluation log, and the accuracy at the fixed epoch budget
  comes from the same run. The step floor gives large batches enough updates to show how far
  above perfect scaling they land.
- evaluation every max(1, eval_examples // B) steps, so steps to target are resolved to about
  `eval_examples` training examples at every batch size.
"""
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hvdscale.errors import ConfigError

RESULTS_FILE = "results.json"


@dataclass
class SweepSettings:
    recipes: list
    batch_sizes: list
    target: float
    seeds: list = field(default_factory=lambda: [42])
    workers: int = 1
    max_per_worker: int = 512
    epochs: float = 3.0
    min_steps: int = 60
    eval_examples: int = 4096
    noise_every: int = 10
    noise_ema: float = 0.95
    train_limit: int = None
    extra_sets: list = field(default_factory=list)
    run_timeout: int = 1200
    in_process: bool = True      # one worker: run the engine here, no per-run start-up


@dataclass
class RunSpec:
    setting: str
    recipe: str
    batch_size: int
    seed: int
    per_worker: int
    accumulation: int
    max_steps: int
    eval_every_steps: int
    out: str

    def overrides(self, settings):
        sets = [
            f"batch.per_worker={self.per_worker}",
            f"batch.accumulation={self.accumulation}",
            f"train.seed={self.seed}",
            f"train.target_accuracy={settings.target}",
            "train.stop_at_target=false",
            f"train.epochs={_epochs_for_steps(self.max_steps, self.batch_size, settings)}",
            f"train.max_steps={self.max_steps}",
            f"train.eval_every_steps={self.eval_every_steps}",
            "train.eval_every_epochs=null",
            f"noise_scale.every={settings.noise_every}",
            f"noise_scale.ema={settings.noise_ema}",
            "log.progress=false",
            "log.tensorboard=false",
            "checkpoint.every_epochs=null",
            "checkpoint.every_steps=null",
        ]
        if settings.train_limit:
            sets.append(f"data.train_limit={settings.train_limit}")
        return sets + list(settings.extra_sets)


def parse_batch_sizes(text):
    try:
        sizes = [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--batch-sizes: expected comma-separated integers, got {text!r}") from None
    if len(sizes) < 2:
        raise ConfigError("--batch-sizes: a sweep needs at least two batch sizes")
    if any(s < 1 for s in sizes) or len(set(sizes)) != len(sizes):
        raise ConfigError(f"--batch-sizes: sizes must be positive and distinct, got {text!r}")
    return sorted(sizes)


def batch_layout(global_batch, workers, max_per_worker):
    """(per_worker, accumulation) for a global batch: the largest micro-batch that fits under
    max_per_worker and divides the per-worker share exactly."""
    if global_batch % workers:
        raise ConfigError(f"batch size {global_batch} does not split evenly over {workers} workers")
    share = global_batch // workers
    accumulation = max(1, math.ceil(share / max_per_worker))
    while share % accumulation:
        accumulation += 1
    return share // accumulation, accumulation


def train_examples(settings):
    """Training-set size the budget is counted in (Fashion-MNIST: 60000, or train_limit)."""
    return settings.train_limit or 60000


def steps_per_epoch(batch_size, settings):
    """As the engine counts them: full global batches per pass over the training set."""
    return max(1, train_examples(settings) // batch_size)


def _epochs_for_steps(max_steps, batch_size, settings):
    # train.epochs must cover max_steps (the engine rounds epochs * steps_per_epoch), so that
    # max_steps is the budget that binds
    return round((max_steps + 0.25) / steps_per_epoch(batch_size, settings), 6)


def plan(settings, out_dir):
    """Every run of the sweep, smallest batch first within each setting."""
    if not 0 < settings.target <= 1:
        raise ConfigError(f"--target must be an accuracy in (0, 1], got {settings.target}")
    labels = [setting_label(r) for r in settings.recipes]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"two recipes share the name {labels!r}: give each setting its own "
                          f"`name:`")
    runs = []
    n_train = train_examples(settings)
    for recipe, label in zip(settings.recipes, labels):
        for batch in settings.batch_sizes:
            per_worker, accumulation = batch_layout(batch, settings.workers,
                                                    settings.max_per_worker)
            if batch > n_train:
                raise ConfigError(f"batch size {batch} is larger than the training set "
                                  f"({n_train} images)")
            steps = max(math.ceil(settings.epochs * steps_per_epoch(batch, settings)),
                        settings.min_steps)
            for seed in settings.seeds:
                runs.append(RunSpec(
                    setting=label, recipe=str(recipe), batch_size=batch, seed=seed,
                    per_worker=per_worker, accumulation=accumulation, max_steps=steps,
                    eval_every_steps=max(1, settings.eval_examples // batch),
                    out=str(Path(out_dir) / "runs" / f"{label}_b{batch}_s{seed}")))
    return runs


def setting_label(recipe):
    """A recipe's `name:` (falls back to the file stem), used as the curve's label."""
    from hvdscale.config import read_recipe
    raw = read_recipe(recipe)
    return str(raw.get("name") or Path(recipe).stem)


def train_command(spec, settings):
    """The command line of one run (horovodrun -np K ... when the sweep uses several workers)."""
    cmd = [sys.executable, "-m", "hvdscale.cli", "train", spec.recipe, "--out", spec.out]
    for text in spec.overrides(settings):
        cmd += ["--set", text]
    if settings.workers > 1:
        horovodrun = Path(sys.executable).parent / "horovodrun"
        if not horovodrun.exists():
            raise ConfigError(f"--np {settings.workers} needs horovodrun next to "
                              f"{sys.executable}")
        cmd = [str(horovodrun), "-np", str(settings.workers), "--gloo"] + cmd
    return cmd


def read_metrics(path):
    """(evaluation records, summary or None) from a run's metrics.jsonl."""
    evals, summary = [], None
    path = Path(path)
    if not path.is_file():
        return evals, summary
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue       # a line cut short by a killed run
        if record.get("event") == "summary":
            summary = record
        elif record.get("event") is None and "test_accuracy" in record:
            evals.append(record)
    return evals, summary


def summarize_run(spec, evals, summary, settings, returncode, stderr_tail="", wall_s=None):
    """One record of results.json from a run's log."""
    record = asdict(spec)
    record.update({"optimizer": (summary or {}).get("optimizer") or _recipe_optimizer(spec),
                   "workers": settings.workers, "returncode": returncode,
                   "wall_s": wall_s})
    evals = sorted(evals, key=lambda r: r["step"])
    hit = next((r for r in evals if r["test_accuracy"] >= settings.target), None)
    within = [r["test_accuracy"] for r in evals if r.get("epoch", math.inf) <= settings.epochs + 1e-9]
    steps_run = (summary or {}).get("steps") or (evals[-1]["step"] if evals else 0)
    time_s = evals[-1].get("elapsed_s") if evals else None
    ips = (summary or {}).get("images_per_sec")
    gns_trace = [(r["step"], r["b_simple"]) for r in evals if r.get("b_simple") is not None]
    gns_at_target = None
    if hit is not None:
        before = [b for s, b in gns_trace if s <= hit["step"]]
        gns_at_target = before[-1] if before else None
    lrs = [r["lr"] for r in evals if r.get("lr") is not None]
    record.update({
        "steps_to_target": hit["step"] if hit else None,
        "epochs_to_target": hit.get("epoch") if hit else None,
        "time_to_target_s": hit.get("elapsed_s") if hit else None,
        "steps_run": steps_run,
        "time_s": time_s,
        "time_per_step_s": spec.batch_size / ips if ips else
        (time_s / steps_run if time_s and steps_run else None),
        "best_accuracy": max((r["test_accuracy"] for r in evals), default=None),
        "accuracy_at_budget": max(within) if within else None,
        "final_accuracy": evals[-1]["test_accuracy"] if evals else None,
        "b_simple_at_target": gns_at_target,
        "b_simple_trace": gns_trace,
        "peak_lr": max(lrs) if lrs else None,
    })
    if returncode == 0 and summary is not None:
        record["status"] = "ok"
    elif _diverged(stderr_tail):
        # the optimizer setting fails at this batch size: a missed target, not a broken run
        record["status"] = "ok"
        record["diverged"] = True
        record["steps_to_target"] = None
        record["steps_run"] = max(spec.max_steps, steps_run or 0)
    else:
        record["status"] = "failed"
        record["error"] = stderr_tail.strip().splitlines()[-1] if stderr_tail.strip() else \
            f"exit code {returncode}"
    return record


def _diverged(stderr_tail):
    text = stderr_tail.lower()
    return "non-finite" in text or "nonfinite" in text or "diverged" in text


def _recipe_optimizer(spec):
    from hvdscale.config import read_recipe
    try:
        return (read_recipe(spec.recipe).get("optimizer") or {}).get("name")
    except ConfigError:
        return None


def run_sweep(settings, out_dir, progress=True, log=print):
    """Run every planned run (resuming: a run whose results are already in results.json with
    the same plan is not run again) and return the list of run records."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = plan(settings, out_dir)
    done = {_key(r): r for r in load_results(out_dir)["runs"]} if \
        (out_dir / RESULTS_FILE).is_file() else {}
    records = []
    bar = _progress(len(runs), progress)
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    repo_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = repo_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        for spec in runs:
            bar.set_description(f"{spec.setting} B={spec.batch_size} seed={spec.seed}")
            previous = done.get(_key(asdict(spec)))
            if previous is not None and previous.get("status") == "ok" and \
                    previous.get("max_steps") == spec.max_steps:
                records.append(previous)
                bar.update(1)
                continue
            record = _run_one(spec, settings, env)
            records.append(record)
            save_results(out_dir, settings, records)
            bar.set_postfix_str(_postfix(record))
            bar.update(1)
            if record["status"] != "ok":
                log(f"hvdscale sweep: run {spec.setting} B={spec.batch_size} seed={spec.seed} "
                    f"failed: {record.get('error')}")
    finally:
        bar.close()
    save_results(out_dir, settings, records)
    return records


def _run_one(spec, settings, env):
    Path(spec.out).mkdir(parents=True, exist_ok=True)
    metrics = Path(spec.out) / "metrics.jsonl"
    if metrics.exists():
        metrics.unlink()     # a previous, different attempt must not leak into this record
    if settings.in_process and settings.workers == 1:
        return _run_in_process(spec, settings)
    cmd = train_command(spec, settings)
    start = time.time()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                              timeout=settings.run_timeout)
        returncode, stderr = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as err:
        returncode = 124
        stderr = (err.stderr or b"").decode(errors="replace") if isinstance(err.stderr, bytes) \
            else (err.stderr or "")
        stderr += f"\nrun timed out after {settings.run_timeout} s"
    (Path(spec.out) / "train.log").write_text(stderr or "")
    evals, summary = read_metrics(metrics)
    return summarize_run(spec, evals, summary, settings, returncode, stderr[-4000:],
                         wall_s=time.time() - start)


def _run_in_process(spec, settings):
    """The same run as `hvdscale train` in this process (one worker, no Horovod): saves the
    framework import and start-up per run, which dominate small runs on a busy machine. A run
    has no time limit here; the budget in steps bounds it."""
    import argparse
    import contextlib
    import io
    import traceback

    from hvdscale.commands import train as train_command_module
    from hvdscale.errors import NonFiniteLossError, UsageError

    start = time.time()
    log = io.StringIO()
    returncode = 0
    try:
        with contextlib.redirect_stdout(log):
            # the train command's own parser and set-up, so this is exactly `hvdscale train`
            parser = argparse.ArgumentParser(prog="hvdscale train")
            train_command_module.add_arguments(parser)
            argv = [spec.recipe, "--out", spec.out, "--no-horovod"]
            for text in spec.overrides(settings):
                argv += ["--set", text]
            train_command_module.build_engine(parser.parse_args(argv)).run()
    except NonFiniteLossError as err:
        returncode = 3
        log.write(f"\nhvdscale train: error: {err}\n")
    except UsageError as err:
        returncode = 2
        log.write(f"\nhvdscale train: error: {err}\n")
    except Exception:  # noqa: BLE001 -- one broken run is recorded, the sweep goes on
        returncode = 1
        log.write("\n" + traceback.format_exc())
    text = log.getvalue()
    (Path(spec.out) / "train.log").write_text(text)
    evals, summary = read_metrics(Path(spec.out) / "metrics.jsonl")
    return summarize_run(spec, evals, summary, settings, returncode, text[-4000:],
                         wall_s=time.time() - start)


def _postfix(record):
    if record["status"] != "ok":
        return "failed"
    if record.get("diverged"):
        return "diverged"
    if record["steps_to_target"] is None:
        return f"missed (best {record['best_accuracy'] or 0:.3f})"
    return f"{record['steps_to_target']} steps to target"


def _key(record):
    return (record["setting"], record["batch_size"], record["seed"])


class _NoBar:
    def set_description(self, *_):
        pass

    def set_postfix_str(self, *_):
        pass

    def update(self, *_):
        pass

    def close(self):
        pass


def _progress(total, enabled):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm
    return tqdm(total=total, unit="run", dynamic_ncols=True, file=sys.stderr)


def save_results(out_dir, settings, records):
    path = Path(out_dir) / RESULTS_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"settings": asdict(settings), "runs": records}, indent=1))
    os.replace(tmp, path)


def load_results(out_dir):
    path = Path(out_dir) / RESULTS_FILE
    if not path.is_file():
        raise ConfigError(f"no {RESULTS_FILE} in {out_dir}: run the sweep first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON ({err.msg})") from None
