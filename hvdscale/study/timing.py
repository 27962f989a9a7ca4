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


def measure_costs(study, recipe: str, steps: int = 24, eval_every: int = 4) -> Dict[int, dict]:
    """Per batch size, in seconds: a training step (`step_s`), a validation evaluation
    (`eval_s`), and the rest of a run (`run_s`: building the trainer and sources, the last
    evaluation, the final test pass), from one short Engine run each (`steps` steps, an
    evaluation every `eval_every`); and one frozen-weights noise probe (`probe_s`, the same
    for every batch). The intervals between step ends that contain an evaluation give its
    cost, the others the step's."""
    import torch.nn.functional as F

    from hvdscale.study.engine_run import run_with_engine
    from hvdscale.study.probe import probe_noise_scale
    from hvdscale.study.sweep import probe_inputs, read_setting
    from hvdscale.torch.models import build_model

    setting = read_setting(recipe)
    train, val, test = study.data
    s = study.s
    x, y = probe_inputs(train)
    model = build_model(setting.model, 10, x.shape[1], x.shape[-1])
    start = time.perf_counter()
    probe_noise_scale(model, F.cross_entropy, x, y, micro=s.probe_micro, count=s.probe_count)
    probe_s = time.perf_counter() - start
    costs = {}
    for batch in s.batch_sizes:
        clock = _Clock()
        cfg = study.config(setting, batch, setting.base_lr, s.tune_seed,
                           max_steps=steps, eval_every=eval_every)
        res = run_with_engine(cfg, train, val, test, callbacks=[clock])
        plain, with_eval = [], []
        for a, b in zip(clock.steps[1:], clock.steps[2:]):     # the first step warms up
            (with_eval if any(a < e < b for e in clock.evals) else plain).append(b - a)
        step_s = _median(plain)
        eval_s = max(0.0, _median(with_eval) - step_s)
        inner = len(clock.steps) * step_s + (len(clock.evals) - 1) * eval_s
        costs[batch] = {"step_s": step_s, "eval_s": eval_s,
                        "run_s": max(0.0, res.wall_s - inner), "probe_s": probe_s}
    # the rest of a run hardly depends on the batch; the first run also pays one-off imports
    # and warm-up, so the smallest reading stands for all
    rest = min(c["run_s"] for c in costs.values())
    for c in costs.values():
        c["run_s"] = rest
    return costs


def estimate(runs: List[dict], costs: Dict[int, dict], evals_per_run: int, jobs: int,
             cores: int = None, probes_per_setting: int = 0) -> dict:
    """Seconds of every planned run (steps x step cost + evaluations x their cost + the rest
    of a run) plus `probes_per_setting` noise probes per optimizer, summed per optimizer; the
    wall time with min(jobs, cores) processes busy (one optimizer per process: the wall is at
    least the slowest optimizer's total). Costs measured on a loaded machine include the load
    at the time."""
    cores = cores or os.cpu_count() or 1
    per_setting = {}
    for r in runs:
        c = costs[r["batch"]]
        cpu = r["steps"] * c["step_s"] + evals_per_run * c["eval_s"] + c.get("run_s", 0.0)
        per_setting[r["setting"]] = per_setting.get(r["setting"], 0.0) + cpu
    probe_s = max((c.get("probe_s", 0.0) for c in costs.values()), default=0.0)
    for name in per_setting:
        per_setting[name] += probes_per_setting * probe_s
    total = sum(per_setting.values())
    parallel = max(1, min(jobs, cores, len(per_setting)))
    wall = max(total / parallel, max(per_setting.values(), default=0.0))
    return {"runs": len(runs), "cpu_s": total, "wall_s": wall, "processes": parallel,
            "per_setting_cpu_s": per_setting}
