"""Adaptive global batch: when to grow the batch from the gradient noise scale, and how much
the learning rate follows it. Plain Python; the engine side is hvdscale/engine/adaptive.py.

Noise scale (McCandlish et al. 2018): B_noise = tr(Sigma) / |G|^2, with tr(Sigma) the trace
of the per-example gradient covariance and G the true gradient (hvdscale.core.noise_scale
estimates both). Their empirical model of the steps S and examples E needed to reach a loss
at batch B,
    S(B) = S_min (1 + B_noise / B),      E(B) = E_min (1 + B / B_noise),
says that growing the batch toward B_noise cuts steps at a modest cost in examples, and that
past B_noise the steps hardly fall while the examples grow. So the rule grows the batch toward
B_noise (rounded to what the workers can run), and only when the predicted fraction of steps
saved, 1 - S(B_new) / S(B_now), exceeds a threshold (so the batch does not flap).

Learning rate at scale s = B / B_0 (B_0 the batch the recipe's schedule is planned for):
    linear    gain s                                    (Goyal et al. 2017)
    sqrt      gain sqrt(s)
    adascale  gain r = (sigma^2 + |G|^2) / (sigma^2 / s + |G|^2)     (Johnson et al. 2020)
              sigma^2 = tr(Sigma) / B_0, the variance of a B_0-batch gradient. r -> 1 when the
              gradient is nearly noise-free (sigma^2 << |G|^2: a larger batch barely helps) and
              r -> s when noise dominates (the linear rule); always 1 <= r <= s.
"""
import math
from dataclasses import dataclass
from typing import Iterable, List, Optional, Tuple

from hvdscale.errors import ConfigError

RULES = ("adascale", "linear", "sqrt")


def adascale_gain(scale: float, g2: float, trace: float, reference_batch: int = 1) -> float:
    """AdaScale's gain r for a batch `scale` times the reference batch.

    g2: the |G|^2 estimate; trace: tr(Sigma) of one example's gradient, so the variance of a
    reference-batch gradient is trace / reference_batch (reference_batch=1 gives the formula
    in Johnson et al.'s notation, where the variance is that of the base batch). Estimates
    below zero (noise swamping the signal) are read as zero: g2 <= 0 gives r = s, a zero
    trace r = 1, and with neither there is nothing to go on (r = 1).
    """
    if not scale >= 1:
        raise ValueError(f"adascale gain needs a scale >= 1, got {scale!r}")
    variance = max(0.0, float(trace)) / float(reference_batch)
    signal = max(0.0, float(g2))
    if variance == 0.0:
        return 1.0
    return (variance + signal) / (variance / scale + signal)


def lr_gain(rule: str, scale: float, g2: Optional[float] = None,
            trace: Optional[float] = None, reference_batch: int = 1) -> float:
    """The factor on the learning rate of the reference batch at `scale` = B / B_0."""
    if rule == "linear":
        return float(scale)
    if rule == "sqrt":
        return math.sqrt(scale)
    if rule == "adascale":
        if g2 is None or trace is None:
            raise ValueError("the adascale gain needs the |G|^2 and tr(Sigma) estimates")
        return adascale_gain(scale, g2, trace, reference_batch)
    raise ConfigError(f"batch.adaptive.rule: {rule!r} is not one of {', '.join(RULES)}")


def steps_ratio(b_noise: float, current: int, proposed: int) -> float:
    """S(proposed) / S(current) under S(B) = S_min (1 + B_noise / B)."""
    return (1.0 + b_noise / proposed) / (1.0 + b_noise / current)


def examples_ratio(b_noise: float, current: int, proposed: int) -> float:
    """E(proposed) / E(current) under E(B) = E_min (1 + B / B_noise)."""
    return (1.0 + proposed / b_noise) / (1.0 + current / b_noise)


@dataclass(frozen=True)
class Decision:
    global_batch: int       # the batch from now on (== the current one when not changed)
    changed: bool
    saving: float           # predicted fraction of steps (growing) or examples (shrinking) saved
    reason: str             # why, in a few words (for logs)


@dataclass(frozen=True)
class BatchRule:
    """When to change the global batch.

    min_global: the smallest batch (the recipe's global batch); max_global: the largest;
    granularity: the step the batch moves in (per-worker micro-batch x workers, since the
    batch grows through gradient accumulation); threshold: the predicted fraction of steps
    saved that a change must exceed; min_samples: noise-scale estimates needed before the
    first decision; shrink: may the batch fall back (down to min_global) when B_noise falls,
    when that saves more than `threshold` of the examples.
    """
    min_global: int
    max_global: int
    granularity: int
    threshold: float = 0.1
    min_samples: int = 10
    shrink: bool = False

    def __post_init__(self):
        if self.granularity < 1:
            raise ConfigError(f"batch.adaptive: granularity must be >= 1, got {self.granularity}")
        if self.min_global > self.max_global:
            raise ConfigError(f"batch.adaptive.max_global ({self.max_global}) is below the "
                              f"global batch it starts from ({self.min_global})")
        for name, value in (("max_global", self.max_global), ("global batch", self.min_global)):
            if value % self.granularity:
                raise ConfigError(f"batch.adaptive.max_global: {name} {value} is not a multiple "
                                  f"of per_worker x workers = {self.granularity}")
        if not 0.0 <= self.threshold < 1.0:
            raise ConfigError(f"batch.adaptive.threshold must be in [0, 1), got {self.threshold}")

    def target(self, b_noise: float) -> int:
        """B_noise rounded to the nearest multiple of the granularity, within [min, max]."""
        g = self.granularity
        rounded = g * int(math.floor(b_noise / g + 0.5))
        return max(self.min_global, min(self.max_global, rounded))

    def decide(self, current: int, b_noise: Optional[float], samples: int) -> Decision:
        """The batch to use from now on, given the smoothed B_noise and its sample count."""
        keep = lambda reason: Decision(current, False, 0.0, reason)
        if samples < self.min_samples:
            return keep(f"{samples} of {self.min_samples} noise samples")
        if b_noise is None or not math.isfinite(b_noise) or b_noise <= 0:
            return keep("no positive B_noise estimate yet")
        target = self.target(b_noise)
        if not self.shrink:
            target = max(target, current)
        if target == current:
            return keep("at the target")
        if target > current:
            saving = 1.0 - steps_ratio(b_noise, current, target)
            what = "steps"
        else:
            saving = 1.0 - examples_ratio(b_noise, current, target)
            what = "examples"
        if saving <= self.threshold:
            return Decision(current, False, saving,
                            f"{saving:.1%} fewer {what} is not above {self.threshold:.0%}")
        return Decision(target, True, saving, f"{saving:.1%} fewer {what} predicted")


def replay(rule: BatchRule, start: int, readings: Iterable[Tuple[int, Optional[float], int]],
           every_steps: int) -> List[Tuple[int, int]]:
    """Run the rule over a stream of (step, B_noise, samples) readings, deciding on the steps
    that are multiples of every_steps; returns the (step, new global batch) changes."""
    current, changes = start, []
    for step, b_noise, samples in readings:
        if step % every_steps:
            continue
        decision = rule.decide(current, b_noise, samples)
        if decision.changed:
            current = decision.global_batch
            changes.append((step, current))
    return changes
