"""The learning rate of every step: the core scaling rule gives the peak LR for the global
batch, the core schedule gives warm-up and decay as a pure function of the step (so a resumed
run continues the schedule exactly)."""
from dataclasses import dataclass
from typing import Any, Callable

from hvdscale.core.scaling import scale_lr
from hvdscale.core.schedules import LRScheduleSpec, build_lr_schedule


@dataclass
class LRPlan:
    base_lr: float
    peak_lr: float
    warmup_steps: int
    schedule: Callable[[int], float]
    description: str


def plan_lr(cfg: Any, global_batch: int, steps_per_epoch: int, total_steps: int) -> LRPlan:
    """The peak LR for `global_batch` (the recipe's scaling rule) and the schedule of every
    step, from the recipe's `lr` section and `optimizer.base_lr`."""
    lr = cfg.lr
    base = cfg.optimizer.base_lr
    peak = scale_lr(base, cfg.batch.reference, global_batch, rule=lr.scaling)
    spec = LRScheduleSpec.from_config(lr)
    schedule = build_lr_schedule(spec, base, peak, steps_per_epoch, total_steps)
    if lr.warmup == "none":
        warmup_steps = 0
    elif lr.warmup_steps is not None:
        warmup_steps = lr.warmup_steps
    else:
        warmup_steps = int(round(lr.warmup_epochs * steps_per_epoch))
    warm = "no warm-up" if warmup_steps == 0 else f"{lr.warmup} warm-up {warmup_steps} steps"
    return LRPlan(base, peak, warmup_steps, schedule,
                  f"{lr.scaling} scaling, {warm}, {spec.describe_decay()}")
