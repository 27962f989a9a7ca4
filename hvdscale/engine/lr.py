"""The learning rate of every step: the core scaling rule gives the peak LR for the global
batch, the core schedule gives warm-up and decay as a pure function of the step (so a resumed
run continues the schedule exactly)."""
from dataclasses import dataclass
from typing import Callable

from hvdscale.core.scaling import scale_lr
from hvdscale.core.schedules import LRScheduleSpec, build_lr_schedule


@dataclass
class LRPlan:
    base_lr: float
    peak_lr: float
    warmup_steps: int
    schedule: Callable[[int], float]
    description: str


def plan_lr(cfg, global_batch, steps_per_epoch, total_steps):
    lr = cfg.lr
    base = cfg.optimizer.base_lr
    peak = scale_lr(base, cfg.batch.reference, global_batch, rule=lr.scaling)
    spec = LRScheduleSpec(warmup=lr.warmup, warmup_epochs=lr.warmup_epochs,
                          warmup_steps=lr.warmup_steps, decay=lr.decay,
                          milestones=tuple(lr.milestones), gamma=lr.gamma, power=lr.power,
                          end_lr=lr.end_lr, decay_rate=lr.decay_rate,
                          decay_epochs=lr.decay_epochs)
    schedule = build_lr_schedule(spec, base, peak, steps_per_epoch, total_steps)
    if lr.warmup == "none":
        warmup_steps = 0
    elif lr.warmup_steps is not None:
        warmup_steps = lr.warmup_steps
    else:
        warmup_steps = int(round(lr.warmup_epochs * steps_per_epoch))
    decay = {"multistep": f"multistep x{lr.gamma:g} at epochs {list(lr.milestones)}",
             "cosine": f"cosine to {lr.end_lr:g}",
             "polynomial": f"polynomial (power {lr.power:g}) to {lr.end_lr:g}",
             "exponential": f"exponential x{lr.decay_rate:g} every {lr.decay_epochs:g} epochs",
             "constant": "constant"}[lr.decay]
    warm = "no warm-up" if warmup_steps == 0 else f"{lr.warmup} warm-up {warmup_steps} steps"
    return LRPlan(base, peak, warmup_steps, schedule,
                  f"{lr.scaling} scaling, {warm}, {decay}")
