"""The critical-batch-size study: per-batch-size learning-rate tuning, fresh-seed measurement
runs, the frozen-weights noise probe at the target, and the analysis (docs/study.md).

Plan, per optimizer setting (one recipe) and global batch size B, smallest first
- expected need: at B_ref `expected_epochs` epochs (from a timing probe); above it the steps
  the previous batch size needed, S(B_prev) (steps to a target never grow with the batch).
- budget: `budget_factor` x the expected need, capped at `max_budget_epochs`; evaluation every
  `eval_fraction` of the perfect-scaling lower bound S(B_prev) B_prev / B (so at most that
  fraction of the real need); warm-up `warmup_fraction` of the expected need.
- learning rates: 3 log-spaced points (factor `lr_factor`) around the previous batch size's
  best, scaled by the recipe's rule (linear for SGD, sqrt for LARS/LAMB); while a best is at an
  edge of the tried points, one more point beyond that edge (up to `max_extend`). Each tuning
  run uses seed `tune_seed`; it stops at the target once it has also trained the fixed
  accuracy budget (`accuracy_epochs`: constant lr for the first half, then a branch whose lr
  decays linearly to 0). Two bests: the fewest steps to the target (a diverged run is never
  best) and the highest accuracy at the budget; a low target favours bolder lrs than a long
  run can bear, so they may differ.
- measurement: each best re-run with the fresh `seeds` (not the tuning seed, so the winner's
  lucky draw does not bias them): role `measure` (steps to target; at B_ref the weights at the
  target for the noise probe) and, when the accuracy best differs, role `accuracy`.
Every run is in this process (hvdscale.study.inproc): the global batch is what matters.
"""
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hvdscale.errors import ConfigError
from hvdscale.registry import BACKENDS

RESULTS_FILE = "results.json"


@dataclass
class StudySettings:
    recipes: list
    batch_sizes: list
    target: float
    seeds: list = field(default_factory=lambda: [1, 2, 3])
    tune_seed: int = 0
    accuracy_epochs: float = 1.0
    expected_epochs: float = 0.5
    budget_factor: float = 3.0
    max_budget_epochs: float = 16.0
    eval_fraction: float = 0.05
    warmup_fraction: float = 0.05
    lr_factor: float = 2.0
    max_extend: int = 3
    probe_micro: int = 32
    probe_count: int = 64
    probe_snapshots: int = 8         # snapshots inside the noise window, per seed (about)
    noise_window: float = 0.25       # B_noise window: +- this fraction of the steps to target
    noise_every: int = 5
    eval_examples: int = 5000
    train_limit: int = None
    data_root: str = None
    threads: int = 1
    jobs: int = 3
    bootstrap: int = 300


@dataclass
class Setting:
    label: str
    optimizer: str
    optimizer_cfg: dict
    model: str
    base_lr: float
    reference_batch: int
    scaling: str


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


def read_setting(recipe):
    """The parts of a recipe the study uses (validated by hvdscale's config loader)."""
    from hvdscale.config import load_config, read_recipe

    cfg = load_config(recipe)
    if not BACKENDS.get(cfg.framework).study:
        supported = ", ".join(b.name for b in BACKENDS if b.study)
        raise ConfigError(f"{recipe}: the study runs {supported} recipes, got framework "
                          f"{cfg.framework}")
    raw = read_recipe(recipe)
    opt = {k: v for k, v in (raw.get("optimizer") or {}).items() if k not in ("name", "base_lr")}
    return Setting(label=str(raw.get("name") or Path(recipe).stem), optimizer=cfg.optimizer.name,
                   optimizer_cfg=opt, model=cfg.model.name, base_lr=float(cfg.optimizer.base_lr),
                   reference_batch=int(cfg.batch.reference or cfg.batch.per_worker),
                   scaling=str(cfg.lr.scaling))


def scaled(lr, from_batch, to_batch, rule):
    from hvdscale.core.scaling import scale_lr
    return scale_lr(lr, from_batch, to_batch, rule)


def check(settings):
    if not 0 < settings.target < 1:
        raise ConfigError(f"--target must be an accuracy in (0, 1), got {settings.target}")
    if not settings.seeds or settings.tune_seed in settings.seeds:
        raise ConfigError("--seeds: give fresh seeds, different from the tuning seed "
                          f"({settings.tune_seed})")
    n = settings.train_limit or 60000
    if max(settings.batch_sizes) > n:
        raise ConfigError(f"batch size {max(settings.batch_sizes)} is larger than the training "
                          f"set ({n} images)")
    if settings.budget_factor < 1 or settings.lr_factor <= 1:
        raise ConfigError("--budget-factor must be >= 1 and --lr-factor > 1")
    labels = [read_setting(r).label for r in settings.recipes]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"two recipes share the name {labels!r}: give each setting its own "
                          f"`name:`")


class Study:
    """Runs the plan of the module docstring and keeps every run's record."""

    def __init__(self, settings, out_dir, log=print, data=None):
        import torch

        self.s = settings
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = log
        torch.set_num_threads(max(1, settings.threads))
        self._data = data
        self.runs = []           # every run's record (results.json "runs")
        self.settings_out = {}   # per setting: lr grids, chosen lrs, probes

    @property
    def data(self):
        if self._data is None:      # loaded on first use (not in a parent of worker processes)
            from hvdscale.study.inproc import load_data
            self._data = load_data(self.s.data_root, self.s.eval_examples, self.s.train_limit)
        return self._data

    # ---------------------------------------------------------------- one run
    def _run(self, setting, batch, lr, seed, role, budget, eval_every, warmup, **extra):
        from hvdscale.study import inproc
        from hvdscale.study.inproc import RunConfig

        cfg = RunConfig(optimizer=setting.optimizer, optimizer_cfg=setting.optimizer_cfg,
                        model=setting.model, batch_size=batch, lr=lr, seed=seed,
                        max_steps=budget, eval_every=eval_every, target=self.s.target,
                        warmup_steps=warmup, **extra)
        res = inproc.train(cfg, self.data)
        record = {
            "setting": setting.label, "optimizer": setting.optimizer, "batch_size": batch,
            "lr": lr, "seed": seed, "role": role, "status": res.status,
            "steps_to_target": res.steps_to_target, "steps_run": res.steps_run,
            "budget_steps": budget, "eval_every": eval_every, "warmup_steps": warmup,
            "examples_to_target": res.steps_to_target * batch if res.reached else None,
            "accuracy_at_budget": res.accuracy_at_budget,
            "best_eval_accuracy": max(a for _, a, _ in res.evals),
            "diverged_at": res.diverged_at, "wall_s": round(res.wall_s, 3),
            "evals": [[s, round(a, 4), None if l is None else round(l, 4)]
                      for s, a, l in res.evals],
        }
        self.runs.append(record)
        steps = f"{res.steps_to_target:.1f}" if res.reached else f">{res.steps_run}"
        self.log(f"  {setting.label} B={batch} lr={lr:.4g} seed={seed} {role}: {res.status} "
                 f"{steps} steps, acc@budget {res.accuracy_at_budget}, {res.wall_s:.1f}s")
        return record, res

    # ---------------------------------------------------------------- one setting
    def run_setting(self, recipe):
        s = self.s
        setting = read_setting(recipe)
        n = self.data.n_train
        b_ref = s.batch_sizes[0]
        center = scaled(setting.base_lr, setting.reference_batch, b_ref, setting.scaling)
        out = {"setting": setting.label, "optimizer": setting.optimizer, "recipe": str(recipe),
               "scaling": setting.scaling, "lr_grid": {}, "chosen_lr": {}, "chosen_lr_accuracy": {},
               "probes": []}
        prev = None        # (batch, steps at that batch)
        for batch in s.batch_sizes:
            per_epoch = n // batch
            if prev is None:
                need = floor = s.expected_epochs * per_epoch
            else:
                need = prev[1]
                floor = prev[1] * prev[0] / batch        # perfect scaling: the fewest steps
            budget = int(math.ceil(min(s.budget_factor * need, s.max_budget_epochs * per_epoch)))
            eval_every = max(1, int(s.eval_fraction * floor))
            warmup = int(round(s.warmup_fraction * floor))
            tried = {}

            def tune(lr):
                tried[lr], _ = self._run(setting, batch, lr, s.tune_seed, "tune", budget,
                                         eval_every, warmup, accuracy_epochs=s.accuracy_epochs)

            for lr in (center / s.lr_factor, center, center * s.lr_factor):
                tune(lr)
            for _ in range(s.max_extend):
                ordered = sorted(tried)
                edge = next((b for b in (_best_lr(tried), _best_lr_accuracy(tried))
                             if b in (ordered[0], ordered[-1])), None)
                if edge is None:
                    break
                tune(ordered[0] / s.lr_factor if edge == ordered[0] else
                     ordered[-1] * s.lr_factor)
            best, best_acc = _best_lr(tried), _best_lr_accuracy(tried)
            out["lr_grid"][str(batch)] = sorted(tried)
            out["chosen_lr"][str(batch)] = best
            out["chosen_lr_accuracy"][str(batch)] = best_acc
            steps = []
            first = batch == b_ref
            for seed in s.seeds:
                extra = dict(noise_every=s.noise_every if first else 0)
                if first:        # snapshots for the noise window, on both sides of the target
                    extra["snapshot_every"] = max(
                        1, int(2 * s.noise_window * need / s.probe_snapshots))
                    extra["continue_after_target"] = s.noise_window
                if best_acc == best:     # one run measures both
                    extra["accuracy_epochs"] = s.accuracy_epochs
                record, res = self._run(setting, batch, best, seed, "measure", budget,
                                        eval_every, warmup, **extra)
                steps.append(res.steps_to_target if res.reached else res.steps_run)
                if first:
                    self._probe(setting, out, seed, res)
                if best_acc != best:
                    self._run(setting, batch, best_acc, seed, "accuracy", budget, eval_every,
                              warmup, accuracy_epochs=s.accuracy_epochs)
            prev = (batch, _median(steps))
            if batch != s.batch_sizes[-1]:
                nxt = s.batch_sizes[s.batch_sizes.index(batch) + 1]
                center = scaled(best, batch, nxt, setting.scaling)
        self.settings_out[setting.label] = out
        return out

    def _probe(self, setting, out, seed, res):
        """Frozen-weights probes at the snapshots within the noise window around this seed's
        target (B_noise is their median over the seeds), and for the first seed at every
        snapshot (the noise-over-training plot)."""
        import torch.nn.functional as F

        from hvdscale.study.inproc import RunConfig, build
        from hvdscale.study.probe import probe_noise_scale

        s = self.s

        def at(state):
            cfg = RunConfig(setting.optimizer, setting.optimizer_cfg, setting.model, 1, 1.0,
                            seed, 1, 1, s.target)
            model, _ = build(cfg)
            model.load_state_dict(state["model"])
            return probe_noise_scale(model, F.cross_entropy, self.data.x_train,
                                     self.data.y_train, micro=s.probe_micro,
                                     count=s.probe_count, seed=seed)

        entry = {"seed": seed, "online_trace": res.online_noise,
                 "steps_to_target": res.steps_to_target, "window": [], "over_training": []}
        target = res.steps_to_target
        for state in res.snapshots:
            offset = state["step"] / target - 1 if target else None
            inside = offset is not None and abs(offset) <= s.noise_window
            if not inside and seed != s.seeds[0]:
                continue
            record = _probe_record(at(state), state["step"])
            if inside:
                entry["window"].append(dict(record, offset=offset))
            if seed == s.seeds[0]:
                entry["over_training"].append(record)
        if target:
            online = [b for st, b in res.online_noise if st <= target]
            entry["online_b_simple_at_target"] = online[-1] if online else None
        out["probes"].append(entry)

    def run(self, jobs=1):
        """Every setting; with jobs > 1 the settings run in parallel worker processes (one
        torch thread each), the way to use several cores without OpenMP barriers."""
        start = time.time()
        cpu = time.process_time()
        if jobs <= 1 or len(self.s.recipes) == 1:
            for recipe in self.s.recipes:
                self.log(f"setting {recipe}")
                self.run_setting(recipe)
            self.cpu_s = time.process_time() - cpu
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            ctx = multiprocessing.get_context("spawn")     # no forked torch thread pools
            with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
                results = list(pool.map(_run_one_setting,
                                        [(self.s, str(self.out), r) for r in self.s.recipes]))
            self.cpu_s = 0.0
            for runs, info, cpu_s in results:
                self.runs += runs
                self.settings_out[info["setting"]] = info
                self.cpu_s += cpu_s
        self.wall_s = time.time() - start
        return self.runs


def _run_one_setting(job):
    """Worker process: one setting's tuning, measurement and probes."""
    import sys

    settings, out, recipe = job
    cpu = time.process_time()
    study = Study(settings, out, log=lambda m: print(m, file=sys.stderr, flush=True))
    study.log(f"setting {recipe}")
    info = study.run_setting(recipe)
    return study.runs, info, time.process_time() - cpu


def _probe_record(p, step):
    def finite(v):
        return v if math.isfinite(v) else None      # JSON has no inf: an unresolved |G|^2

    return {"step": step, "b_simple": finite(p.b_simple),
            "b_simple_ci": [finite(p.ci_low), finite(p.ci_high)], "g2": p.g2,
            "trace": p.trace, "micro": p.micro, "count": p.count}


def _best_lr(tried):
    """Fewest steps to the target; among runs that missed it, the best held-out accuracy;
    a diverged run only when nothing else ran."""
    def key(item):
        lr, r = item
        if r["status"] == "reached":
            return (0, r["steps_to_target"])
        if r["status"] == "censored":
            return (1, -r["best_eval_accuracy"])
        return (2, -lr)
    return min(tried.items(), key=key)[0]


def _best_lr_accuracy(tried):
    """Highest test accuracy at the fixed epoch budget (fewer steps to target breaks ties)."""
    return max(tried.items(), key=lambda item: (item[1]["accuracy_at_budget"] or 0.0,
                                                -(item[1]["steps_to_target"] or 1e12)))[0]


def _median(values):
    v = sorted(values)
    k = len(v) // 2
    return v[k] if len(v) % 2 else 0.5 * (v[k - 1] + v[k])


def save_results(path, payload):
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=_plain))
    os.replace(tmp, path)


def _plain(value):
    try:
        import numpy as np
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            return value.tolist()
    except ImportError:
        pass
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def load_results(out_dir):
    path = Path(out_dir) / RESULTS_FILE
    if not path.is_file():
        raise ConfigError(f"no {RESULTS_FILE} in {out_dir}: run the sweep first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON ({err.msg})") from None


def settings_dict(settings):
    return asdict(settings)
