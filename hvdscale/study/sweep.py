"""The large-batch study (issue 21, docs/study.md): per optimizer (one recipe each), accuracy at a
fixed epoch budget versus global batch under two protocols, steps to a target along the same
runs, and the noise scale probed around the target at B_ref.

Every run is one hvdscale Engine run in this process (hvdscale.study.engine_run): the recipe's
model, optimizer, linear warm-up over `warmup_fraction` of the budget and its decay to the end of
`epochs`; evaluations on the validation split (data.validation, a fixed seed-0 draw of the
training set), the untouched test set scored once at the end.

Plan per optimizer, B_ref = the smallest batch:
- settle (role "tune", protocol "scaled", at B_ref, seed `tune_seed`): every lr of
  `ref_lr_factors` x the recipe's lr at B_ref, crossed with the optimizer's own options in
  SETTLE (LARS trust coefficient, LAMB beta2/eps); the best final validation accuracy fixes
  lr_ref and those options for everything after.
- scaled (the seed's recipe): at every batch lr = rule(lr_ref, B_ref -> B) (the recipe's
  lr.scaling), no re-tuning; role "measure" with every fresh seed.
- tuned: at every batch above B_ref, `lr_factors` x the rule's lr with `tune_seed` (role
  "tune"), the best final validation accuracy chosen, then re-run with the fresh seeds (role
  "measure"). At B_ref the tuned lr is lr_ref: its runs are the scaled protocol's (not repeated).
- both grids (settle and tuned) grow past an edge while their best lr sits on it: half the
  lowest or twice the highest lr, at most `lr_extend` more runs (`extend_to_interior`), so a
  choice is not an artefact of where the grid happened to end.
"""
import itertools
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from hvdscale.errors import ConfigError
from hvdscale.registry import BACKENDS

RESULTS_FILE = "results.json"

# Options of an optimizer settled once at B_ref (issue 21: not left at untuned defaults).
SETTLE: Dict[str, Dict[str, list]] = {
    "lars": {"trust_coefficient": [0.001, 0.01]},
    "lamb": {"betas": [[0.9, 0.999], [0.9, 0.99]]},
}


@dataclass
class StudySettings:
    recipes: list
    batch_sizes: list
    target: float
    epochs: float = 4.0
    seeds: list = field(default_factory=lambda: [1, 2, 3])
    tune_seed: int = 0
    lr_factors: list = field(default_factory=lambda: [0.25, 0.5, 1.0, 2.0])
    ref_lr_factors: list = field(default_factory=lambda: [0.5, 1.0, 2.0])
    lr_extend: int = 3               # extra lrs per grid while its best sits at an edge
    warmup_fraction: float = 0.1
    evals_per_run: int = 16
    validation: int = 5000
    probe_micro: int = 32
    probe_count: int = 64
    snapshots_per_run: int = 32      # snapshots along each B_ref measurement run
    noise_every: int = 5             # online noise-scale reading every N steps on those runs
    noise_window: float = 0.25       # B_noise window: +- this fraction of the steps to target
    train_limit: Optional[int] = None
    test_limit: Optional[int] = None
    data_root: Optional[str] = None
    threads: int = 1
    jobs: int = 3
    bootstrap: int = 300


@dataclass
class Setting:
    label: str
    recipe: str
    optimizer: str
    base_lr: float
    reference_batch: int
    scaling: str
    model: str


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


def read_setting(recipe) -> Setting:
    """The parts of a recipe the study uses (validated by hvdscale's config loader)."""
    from hvdscale.config import load_config, read_recipe

    cfg = load_config(recipe)
    if not BACKENDS.get(cfg.framework).study:
        supported = ", ".join(b.name for b in BACKENDS if b.study)
        raise ConfigError(f"{recipe}: the study runs {supported} recipes, got framework "
                          f"{cfg.framework}")
    raw = read_recipe(recipe)
    return Setting(label=str(raw.get("name") or Path(recipe).stem), recipe=str(recipe),
                   optimizer=cfg.optimizer.name, base_lr=float(cfg.optimizer.base_lr),
                   reference_batch=int(cfg.batch.reference or cfg.batch.per_worker),
                   scaling=str(cfg.lr.scaling), model=cfg.model.name)


def rule_lr(lr_ref, b_ref, batch, rule):
    """Protocol (a): the lr at `batch` from lr_ref at b_ref by the recipe's scaling rule."""
    from hvdscale.core.scaling import scale_lr
    return scale_lr(lr_ref, b_ref, batch, rule)


def check(settings):
    if not 0 < settings.target < 1:
        raise ConfigError(f"--target must be an accuracy in (0, 1), got {settings.target}")
    if not settings.seeds or settings.tune_seed in settings.seeds:
        raise ConfigError("--seeds: give fresh seeds, different from the tuning seed "
                          f"({settings.tune_seed})")
    if len(settings.lr_factors) < 4:
        raise ConfigError(f"--lr-factors: the tuned protocol needs >= 4 learning rates per "
                          f"batch, got {settings.lr_factors}")
    n = (settings.train_limit or 60000 - settings.validation)
    if max(settings.batch_sizes) > n:
        raise ConfigError(f"batch size {max(settings.batch_sizes)} is larger than the training "
                          f"split ({n} images)")
    if settings.probe_count * settings.probe_micro > n:      # checked now, not after the runs
        raise ConfigError(f"--probe {settings.probe_count}x{settings.probe_micro} needs "
                          f"{settings.probe_count * settings.probe_micro} training images, the "
                          f"training split has {n}")
    if settings.lr_extend < 0:
        raise ConfigError(f"--lr-extend must be >= 0, got {settings.lr_extend}")
    if not 0 <= settings.warmup_fraction < 1:
        raise ConfigError(f"--warmup-fraction must be in [0, 1), got {settings.warmup_fraction}")
    labels = [read_setting(r).label for r in settings.recipes]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"two recipes share the name {labels!r}: give each setting its own "
                          f"`name:`")


def settle_grid(setting: Setting, b_ref: int, factors) -> List[dict]:
    """The (lr, options) pairs tried at B_ref: the recipe's lr at B_ref times each factor,
    crossed with the optimizer's SETTLE options."""
    lr0 = rule_lr(setting.base_lr, setting.reference_batch, b_ref, setting.scaling)
    grid = SETTLE.get(setting.optimizer, {})
    names = sorted(grid)
    out = []
    for f in factors:
        for values in itertools.product(*(grid[n] for n in names)):
            out.append({"lr": lr0 * f, "options": dict(zip(names, values))})
    return out


def plan(settings: StudySettings, setting: Setting, n_train: int) -> List[dict]:
    """Every run of one optimizer as {protocol, role, batch, seed, lr or None}: the lrs of the
    settle and tuned steps depend on earlier results, so they are given as relative factors
    (`factor`) here; the count and the steps are what --plan needs. Grid extensions
    (`extension: True`) are the most `extend_to_interior` may add: an upper bound."""
    b_ref = settings.batch_sizes[0]
    runs = [dict(protocol="scaled", role="tune", batch=b_ref, seed=settings.tune_seed, **g)
            for g in settle_grid(setting, b_ref, settings.ref_lr_factors)]
    runs += [dict(protocol="scaled", role="tune", batch=b_ref, seed=settings.tune_seed,
                  extension=True) for _ in range(settings.lr_extend)]
    for batch in settings.batch_sizes:
        runs += [dict(protocol="scaled", role="measure", batch=batch, seed=s)
                 for s in settings.seeds]
        if batch != b_ref:
            runs += [dict(protocol="tuned", role="tune", batch=batch, seed=settings.tune_seed,
                          factor=f) for f in settings.lr_factors]
            runs += [dict(protocol="tuned", role="tune", batch=batch, seed=settings.tune_seed,
                          extension=True) for _ in range(settings.lr_extend)]
            runs += [dict(protocol="tuned", role="measure", batch=batch, seed=s)
                     for s in settings.seeds]
    for r in runs:
        r["steps"] = steps_of(settings, r["batch"], n_train)
        r["setting"] = setting.label
    return runs


def steps_of(settings, batch, n_train):
    return int(settings.epochs * (n_train // batch))


class Study:
    """Runs the plan of the module docstring for one or more recipes and keeps every run."""

    def __init__(self, settings: StudySettings, out_dir, log=print, data=None):
        import torch

        self.s = settings
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = log
        torch.set_num_threads(max(1, settings.threads))
        self._data = data
        self.runs = []           # every run's record (results.json "runs")
        self.settings_out = {}   # per optimizer: settled options, chosen lrs, probes

    def data_overrides(self):
        s = self.s
        out = [f"data.validation={s.validation}"]
        if s.train_limit:
            out.append(f"data.train_limit={s.train_limit}")
        if s.test_limit:
            out.append(f"data.test_limit={s.test_limit}")
        if s.data_root:
            out.append(f"data.path={s.data_root}")
        return out

    @property
    def data(self):
        """(train, validation, test) ArrayDatasets, loaded on first use."""
        if self._data is None:
            from hvdscale.config import load_config
            from hvdscale.data.arrays import load_splits
            cfg = load_config(self.s.recipes[0], self.data_overrides())
            self._data = load_splits(cfg.data)
        return self._data

    def config(self, setting: Setting, batch, lr, seed, options=None, max_steps=None,
               eval_every=None, noise_every=0):
        """The hvdscale Config of one run: the recipe with the study's batch, lr (reference =
        batch, so the engine applies it as given), budget, warm-up, evaluation cadence, seed."""
        from hvdscale.config import load_config

        s = self.s
        steps = max_steps or steps_of(s, batch, len(self.data[0]))
        every = eval_every or max(1, steps // s.evals_per_run)
        overrides = self.data_overrides() + [
            f"batch.per_worker={batch}", f"batch.reference={batch}", "batch.accumulation=1",
            f"optimizer.base_lr={lr!r}", f"train.epochs={s.epochs!r}", f"train.seed={seed}",
            f"train.eval_every_steps={every}", "train.eval_every_epochs=null",
            f"train.target_accuracy={s.target!r}", f"train.threads={s.threads}",
            f"lr.warmup_epochs={s.warmup_fraction * s.epochs!r}", "lr.warmup_steps=null",
            "checkpoint.every_epochs=null", "faults.step_timeout_s=null",
            f"noise_scale.every={noise_every}"]
        if max_steps:        # a timing run: a few steps, no warm-up to fit into them
            overrides += [f"train.max_steps={max_steps}", "lr.warmup=none"]
        for name, value in (options or {}).items():
            overrides.append(f"optimizer.{name}={json.dumps(value)}")
        return load_config(setting.recipe, overrides)

    # ---------------------------------------------------------------- one run
    def _run(self, setting, protocol, role, batch, lr, seed, options, snapshot_every=0,
             extension=False):
        from hvdscale.study.engine_run import CHANCE, run_with_engine

        # the online noise-scale EMA beside the probes: on the runs that keep snapshots
        cfg = self.config(setting, batch, lr, seed, options,
                          noise_every=self.s.noise_every if snapshot_every else 0)
        train, val, test = self.data
        res = run_with_engine(cfg, train, val, test, snapshot_every=snapshot_every)
        diverged = res.status == "diverged"
        record = {
            "optimizer": setting.optimizer, "setting": setting.label, "protocol": protocol,
            "role": role, "batch": batch, "lr": lr, "seed": seed, "options": options,
            "val_accuracy": CHANCE if diverged or not res.evals else res.evals[-1][1],
            "test_accuracy": res.test_accuracy, "steps": res.steps_run,
            "budget_steps": cfg.train.max_steps or steps_of(self.s, batch, len(train)),
            "steps_to_target": res.steps_to_target, "status": res.status,
            "diverged": diverged, "wall_s": round(res.wall_s, 3), "extension": extension,
            "evals": [[s, round(a, 4), None if l is None else round(l, 4)]
                      for s, a, l, _ in res.evals],
        }
        self.runs.append(record)
        self.log(f"  {setting.label} {protocol}/{role} B={batch} lr={lr:.4g} seed={seed} "
                 f"{options or ''}: val {record['val_accuracy']:.4f} test "
                 f"{record['test_accuracy']:.4f} target@{res.steps_to_target} "
                 f"{res.wall_s:.1f}s")
        return record, res

    # ---------------------------------------------------------------- one optimizer
    def run_setting(self, recipe):
        s = self.s
        setting = read_setting(recipe)
        b_ref = s.batch_sizes[0]
        info = {"setting": setting.label, "optimizer": setting.optimizer, "recipe": str(recipe),
                "scaling": setting.scaling, "b_ref": b_ref, "lr_grid": {}, "chosen_lr": {},
                "probes": []}
        # settle lr_ref and the optimizer's options at B_ref, on validation
        tried = [self._run(setting, "scaled", "tune", b_ref, g["lr"], s.tune_seed,
                           g["options"])[0]
                 for g in settle_grid(setting, b_ref, s.ref_lr_factors)]
        tried = extend_to_interior(
            tried, lambda lr, opts: self._run(setting, "scaled", "tune", b_ref, lr,
                                              s.tune_seed, opts, extension=True)[0],
            s.lr_extend)
        best = choose_on_validation(tried)
        lr_ref, options = best["lr"], best["options"]
        info.update(lr_ref=lr_ref, settled_options=options)
        info["lr_grid"][str(b_ref)] = sorted({r["lr"] for r in tried})
        info["chosen_lr"][str(b_ref)] = lr_ref
        # protocol (a): the rule's lr at every batch, fresh seeds; at B_ref with snapshots
        n_steps_ref = steps_of(s, b_ref, len(self.data[0]))
        for batch in s.batch_sizes:
            lr = rule_lr(lr_ref, b_ref, batch, setting.scaling)
            for seed in s.seeds:
                snap = max(1, n_steps_ref // s.snapshots_per_run) if batch == b_ref else 0
                _, res = self._run(setting, "scaled", "measure", batch, lr, seed, options,
                                   snapshot_every=snap)
                if batch == b_ref:
                    self._probe(setting, info, seed, res)
        # protocol (b): tuned on validation at every batch above B_ref, then fresh seeds
        for batch in s.batch_sizes[1:]:
            center = rule_lr(lr_ref, b_ref, batch, setting.scaling)
            tried = [self._run(setting, "tuned", "tune", batch, center * f, s.tune_seed,
                               options)[0] for f in s.lr_factors]
            tried = extend_to_interior(
                tried, lambda lr, opts, b=batch: self._run(setting, "tuned", "tune", b, lr,
                                                           s.tune_seed, opts,
                                                           extension=True)[0],
                s.lr_extend)
            lr = choose_on_validation(tried)["lr"]
            info["lr_grid"][str(batch)] = sorted(r["lr"] for r in tried)
            info["chosen_lr"][str(batch)] = lr
            for seed in s.seeds:
                self._run(setting, "tuned", "measure", batch, lr, seed, options)
        self.settings_out[setting.label] = info
        return info

    def _probe(self, setting, info, seed, res):
        """Frozen-weights probes at the snapshots within the noise window around this seed's
        target (B_noise is their median over the seeds), and for the first seed at every
        snapshot (the noise-over-training plot)."""
        import torch.nn.functional as F

        from hvdscale.study.probe import probe_noise_scale
        from hvdscale.torch.models import build_model

        s = self.s
        x, y = probe_inputs(self.data[0])
        model = build_model(setting.model, 10, x.shape[1], x.shape[-1])
        entry = {"seed": seed, "online_trace": res.online_noise,
                 "steps_to_target": res.steps_to_target, "window": [], "over_training": []}
        target = res.steps_to_target
        for state in res.snapshots:
            offset = state["step"] / target - 1 if target else None
            inside = offset is not None and abs(offset) <= s.noise_window
            if not inside and seed != s.seeds[0]:
                continue
            model.load_state_dict(state["model"])
            record = _probe_record(probe_noise_scale(model, F.cross_entropy, x, y,
                                                     micro=s.probe_micro, count=s.probe_count,
                                                     seed=seed), state["step"])
            if inside:
                entry["window"].append(dict(record, offset=offset))
            if seed == s.seeds[0]:
                entry["over_training"].append(record)
        if target:
            online = [b for st, b in res.online_noise if st <= target]
            entry["online_b_simple_at_target"] = online[-1] if online else None
        info["probes"].append(entry)

    def run(self, jobs=1):
        """Every recipe; with jobs > 1 the recipes run in parallel worker processes (one torch
        thread each), the way to use several cores without OpenMP barriers."""
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


def probe_inputs(train):
    """The training split as torch tensors for the noise probe: NHWC arrays, NCHW model input
    (the model flattens in (H, W, C) order, as the trainer feeds it)."""
    import torch
    return torch.from_numpy(train.x).permute(0, 3, 1, 2), torch.from_numpy(train.y)


def probes_planned(settings) -> int:
    """Noise probes per optimizer, at most: every snapshot of the first seed's B_ref run, and
    the window snapshots of the others (bounded here by all of theirs)."""
    return settings.snapshots_per_run * len(settings.seeds)


def extend_to_interior(tried, run_lr, extend):
    """Grows an lr grid past its edge while the best run on validation sits on it: the next
    lr is half the lowest (best at the low end, or everything diverged) or twice the highest
    lr tried with the best run's options, one run at a time, at most `extend` more runs.
    `run_lr(lr, options)` returns the new run's record; returns every record."""
    tried = list(tried)
    for _ in range(extend):
        best = choose_on_validation(tried)
        lrs = sorted(r["lr"] for r in tried if r["options"] == best["options"])
        if best["lr"] == lrs[0]:
            lr = lrs[0] / 2
        elif best["lr"] == lrs[-1]:
            lr = lrs[-1] * 2
        else:
            break
        tried.append(run_lr(lr, best["options"]))
    return tried


def choose_on_validation(records):
    """The run with the highest final validation accuracy (a diverged run scores chance);
    ties go to the smaller lr. The test accuracy is never read here."""
    return max(records, key=lambda r: (r["val_accuracy"], -r["lr"]))


def _run_one_setting(job):
    """Worker process: one optimizer's runs and probes."""
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
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON ({err.msg})") from None
    if not isinstance(payload, dict) or "design" not in payload:
        raise ConfigError(f"{path} has the layout from before issue 21 (no 'design'): run the "
                          f"sweep again to regenerate it")
    return payload


def settings_dict(settings):
    return asdict(settings)
