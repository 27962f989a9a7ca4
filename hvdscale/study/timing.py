"""`hvdscale sweep --plan`: the number of runs and the wall time the study will take, from
per-step and per-evaluation costs measured on this machine with short Engine runs (a pilot),
so the full sweep can be sized before it is started."""
import os
import time
from typing import Dict, List

from hvdscale.engine.callbacks import Callback


class _Clock(Callback):
    """Times of every step end and evaluation of a run."""

    name = ""

    def __init__(self):
        self.steps, self.evals = [], []

    def on_step_end(self, engine):
        self.steps.append(time.perf_counter())

    def on_evaluate(self, engine, record):
        self.evals.append(time.perf_counter())


def _median(values):
    v = sorted(values)
    return v[len(v) // 2] if v else 0.0


def measure_costs(study, recipe: str, steps: int = 12, eval_every: int = 3) -> Dict[int, dict]:
    """Per batch size: seconds per training step and per validation evaluation, from one
    short Engine run each (`steps` steps, an evaluation every `eval_every`). The intervals
    between step ends that contain an evaluation give its cost; the others the step's."""
    from hvdscale.study.engine_run import run_with_engine
    from hvdscale.study.sweep import read_setting

    setting = read_setting(recipe)
    train, val, test = study.data
    costs = {}
    for batch in study.s.batch_sizes:
        clock = _Clock()
        cfg = study.config(setting, batch, setting.base_lr, study.s.tune_seed,
                           max_steps=steps, eval_every=eval_every)
        run_with_engine(cfg, train, val, test, callbacks=[clock])
        plain, with_eval = [], []
        for a, b in zip(clock.steps[1:], clock.steps[2:]):     # the first step warms up
            (with_eval if any(a < e < b for e in clock.evals) else plain).append(b - a)
        step_s = _median(plain)
        costs[batch] = {"step_s": step_s, "eval_s": max(0.0, _median(with_eval) - step_s)}
    return costs


def estimate(runs: List[dict], costs: Dict[int, dict], evals_per_run: int, jobs: int,
             cores: int = None, test_passes: float = 2.0) -> dict:
    """CPU seconds of every planned run (steps x step cost + evaluations x their cost, the
    final test pass counted as `test_passes` validation passes: 10000 test images against 5000
    validation ones), and the wall time with min(jobs, cores) processes busy (one optimizer
    per process: the wall is at least the slowest optimizer's total). Not counted: each run's
    start-up and the noise probes at B_ref."""
    cores = cores or os.cpu_count() or 1
    per_setting = {}
    for r in runs:
        c = costs[r["batch"]]
        cpu = r["steps"] * c["step_s"] + (evals_per_run + 1 + test_passes) * c["eval_s"]
        per_setting[r["setting"]] = per_setting.get(r["setting"], 0.0) + cpu
    total = sum(per_setting.values())
    parallel = max(1, min(jobs, cores, len(per_setting)))
    wall = max(total / parallel, max(per_setting.values(), default=0.0))
    return {"runs": len(runs), "cpu_s": total, "wall_s": wall, "processes": parallel,
            "per_setting_cpu_s": per_setting}
