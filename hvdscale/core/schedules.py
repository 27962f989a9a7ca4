"""Learning-rate schedules as pure functions of the optimizer step (warm-up + decay).

A schedule is built once from an `LRScheduleSpec` and called with the 0-based step index of
the update about to be applied. It returns a Python float; the torch and TF adapters read the
same function, so both backends see the same sequence (TF as a float32 table of it).

Warm-up over W steps (W = warmup_steps, or round(warmup_epochs * steps_per_epoch)):
    linear  lr(t) = base_lr + (peak_lr - base_lr) * t / W        t < W  (Goyal et al.: starts at
            the reference lr, which is known to be safe, and reaches peak_lr at t = W)
    zero    lr(t) = peak_lr * (t + 1) / W                         t < W  (never a wasted 0-lr step)
    none    no warm-up
Decay from t = W on, with progress p = min(1, (t - W) / (total_steps - W)):
    constant     peak_lr
    multistep    peak_lr * gamma ** (number of milestones m with t >= round(m * steps_per_epoch));
                 milestones are absolute epochs (e.g. 30/60/80), counted from step 0
    cosine       end_lr + (peak_lr - end_lr) * (1 + cos(pi * p)) / 2
    polynomial   end_lr + (peak_lr - end_lr) * (1 - p) ** power   (MLPerf LARS recipe: power 2)
    exponential  peak_lr * decay_rate ** ((t - W) / (decay_epochs * steps_per_epoch)),
                 frozen from total_steps on
Every schedule is constant from `total_steps` on, so a finite table describes it exactly.
"""
import math
from typing import Any, Mapping, Optional, Tuple, Union
from dataclasses import dataclass, fields

from hvdscale.errors import ConfigError

WARMUPS = ("linear", "zero", "none")
DECAYS = ("constant", "multistep", "cosine", "polynomial", "exponential")


@dataclass
class LRScheduleSpec:
    warmup: str = "linear"
    warmup_epochs: float = 0.0
    warmup_steps: Optional[int] = None
    decay: str = "constant"
    milestones: Tuple[float, ...] = ()
    gamma: float = 0.1
    power: float = 2.0
    end_lr: float = 0.0
    decay_rate: float = 0.97
    decay_epochs: float = 1.0

    def describe_decay(self) -> str:
        """The decay in words, for run headers (e.g. "cosine to 0")."""
        return {"multistep": f"multistep x{self.gamma:g} at epochs {list(self.milestones)}",
                "cosine": f"cosine to {self.end_lr:g}",
                "polynomial": f"polynomial (power {self.power:g}) to {self.end_lr:g}",
                "exponential": f"exponential x{self.decay_rate:g} every {self.decay_epochs:g} "
                               "epochs",
                "constant": "constant"}.get(self.decay, self.decay)

    @classmethod
    def from_config(cls, section: Any) -> "LRScheduleSpec":
        """Build from a recipe's `lr` section (dict or object); keys it does not know
        (e.g. `scaling`) belong to other parts of the recipe and are ignored here."""
        get = section.get if isinstance(section, dict) else (lambda k, d: getattr(section, k, d))
        values = {}
        for f in fields(cls):
            v = get(f.name, None)
            if v is not None:
                values[f.name] = v
        return cls(**values)


def _number(value, what, low=None, low_inclusive=True, high=None):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{what} must be a finite number, got {value!r}")
    if low is not None and (value < low or (value == low and not low_inclusive)):
        raise ConfigError(f"{what} must be {'>=' if low_inclusive else '>'} {low}, got {value!r}")
    if high is not None and value > high:
        raise ConfigError(f"{what} must be <= {high}, got {value!r}")
    return float(value)


def _steps(value, what, low):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{what} must be an integer >= {low}, got {value!r}")
    return value


class LRSchedule:
    """A built schedule: call it with a 0-based step. Picklable, no framework state."""

    def __init__(self, spec, base_lr, peak_lr, steps_per_epoch, total_steps):
        if spec.warmup not in WARMUPS:
            raise ConfigError(f"unknown warm-up {spec.warmup!r} (choose from {', '.join(WARMUPS)})")
        if spec.decay not in DECAYS:
            raise ConfigError(f"unknown lr decay {spec.decay!r} (choose from {', '.join(DECAYS)})")
        self.spec = spec
        self.base_lr = _number(base_lr, "base_lr", low=0.0)
        self.peak_lr = _number(peak_lr, "peak_lr", low=0.0, low_inclusive=False)
        self.steps_per_epoch = _steps(steps_per_epoch, "steps_per_epoch", 1)
        self.total_steps = _steps(total_steps, "total_steps", 1)
        if spec.warmup == "none":
            self.warmup_steps = 0
        elif spec.warmup_steps is not None:
            self.warmup_steps = _steps(spec.warmup_steps, "warmup_steps", 0)
        else:
            epochs = _number(spec.warmup_epochs, "warmup_epochs", low=0.0)
            self.warmup_steps = int(round(epochs * self.steps_per_epoch))
        self.gamma = _number(spec.gamma, "gamma", low=0.0, low_inclusive=False)
        self.power = _number(spec.power, "power", low=0.0, low_inclusive=False)
        self.end_lr = _number(spec.end_lr, "end_lr", low=0.0, high=self.peak_lr)
        self.decay_rate = _number(spec.decay_rate, "decay_rate", low=0.0, low_inclusive=False)
        self.decay_epochs = _number(spec.decay_epochs, "decay_epochs", low=0.0, low_inclusive=False)
        milestones = list(spec.milestones or ())
        for m in milestones:
            _number(m, "milestone epoch", low=0.0, low_inclusive=False)
        if milestones != sorted(milestones):
            raise ConfigError(f"lr milestones must be increasing epochs, got {milestones}")
        if spec.decay == "multistep" and not milestones:
            raise ConfigError("multistep decay needs at least one milestone epoch")
        self.milestone_steps = [int(round(m * self.steps_per_epoch)) for m in milestones]

    def __call__(self, step):
        t = min(int(step), self.total_steps)
        if t < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        w = self.warmup_steps
        if t < w:
            if self.spec.warmup == "linear":
                return self.base_lr + (self.peak_lr - self.base_lr) * t / w
            return self.peak_lr * (t + 1) / w
        decay = self.spec.decay
        if decay == "constant":
            return self.peak_lr
        if decay == "multistep":
            passed = sum(1 for m in self.milestone_steps if t >= m)
            return self.peak_lr * self.gamma ** passed
        if decay == "exponential":
            return self.peak_lr * self.decay_rate ** ((t - w) / (self.decay_epochs * self.steps_per_epoch))
        span = self.total_steps - w
        p = 1.0 if span <= 0 else (t - w) / span
        if decay == "cosine":
            return self.end_lr + (self.peak_lr - self.end_lr) * 0.5 * (1.0 + math.cos(math.pi * p))
        return self.end_lr + (self.peak_lr - self.end_lr) * (1.0 - p) ** self.power

    def table(self):
        """lr for steps 0..total_steps; every later step has the last value."""
        return [self(t) for t in range(self.total_steps + 1)]

    def __repr__(self):
        return (f"LRSchedule(warmup={self.spec.warmup}:{self.warmup_steps} steps, decay={self.spec.decay}, "
                f"base_lr={self.base_lr:g}, peak_lr={self.peak_lr:g}, total_steps={self.total_steps})")


def build_lr_schedule(spec: Union["LRScheduleSpec", Mapping[str, Any]], base_lr: float,
                      peak_lr: float, steps_per_epoch: int, total_steps: int) -> "LRSchedule":
    """The schedule as a callable step -> lr (see the module docstring for the formulas)."""
    if isinstance(spec, dict):
        spec = LRScheduleSpec.from_config(spec)
    return LRSchedule(spec, base_lr, peak_lr, steps_per_epoch, total_steps)
