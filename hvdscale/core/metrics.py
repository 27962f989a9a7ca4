"""Measurements of scale, in plain Python: scaling efficiency, time-to-accuracy tracking, and the
critical batch size read off a batch-size sweep.

The B_crit rule (stated once, used by the sweep report):
    perfect scaling from the smallest batch B0 predicts S_perfect(B) = S(B0) * B0 / B steps to
    the target. B_crit is the batch size at which the measured steps S(B) first reach
    2 * S_perfect(B), i.e. where a run needs twice the training examples of the smallest batch.
    Between two measured batch sizes the crossing is interpolated on log-log axes.
This is the paper's definition (McCandlish et al. 2018: at B_crit a run takes twice the minimal
steps and twice the minimal examples) when B0 is well below B_crit.
"""
import math
from dataclasses import dataclass, field

from hvdscale.errors import ConfigError

B_CRIT_RULE = ("B_crit is where the measured steps-to-target first exceed perfect scaling from "
               "the smallest batch, S(B0)*B0/B, by 2x (log-log interpolation between measured "
               "batch sizes)")


def scaling_efficiency(throughput, reference_throughput, workers):
    """E_K = tau_K / (K * tau_ref): 1.0 is perfect weak scaling.

    throughput: total images/s with `workers` workers; reference_throughput: images/s of one
    worker (the same per-worker batch) measured alone.
    """
    if workers < 1:
        raise ConfigError(f"scaling efficiency needs workers >= 1, got {workers}")
    if not reference_throughput > 0:
        raise ConfigError(f"scaling efficiency needs a positive reference throughput, "
                          f"got {reference_throughput!r}")
    return float(throughput) / (workers * float(reference_throughput))


def strong_scaling_efficiency(time_reference, time_k, workers):
    """Time-to-accuracy speed-up per worker: T_1 / (K * T_K)."""
    if workers < 1 or not time_k > 0:
        raise ConfigError(f"strong scaling needs workers >= 1 and a positive time, "
                          f"got workers={workers}, time={time_k!r}")
    return float(time_reference) / (workers * float(time_k))


class TargetTracker:
    """Remembers the first evaluation at which the accuracy reached the target."""

    def __init__(self, target):
        if target is not None and not 0.0 < target <= 1.0:
            raise ConfigError(f"target accuracy must be in (0, 1], got {target!r}")
        self.target = target
        self.best = None
        self.steps_to_target = None
        self.time_to_target = None
        self.epochs_to_target = None

    def observe(self, step, accuracy, elapsed_s, epoch=None):
        """Returns True on the evaluation that first reaches the target."""
        if self.best is None or accuracy > self.best:
            self.best = accuracy
        if self.target is None or self.reached or accuracy < self.target:
            return False
        self.steps_to_target, self.time_to_target, self.epochs_to_target = step, elapsed_s, epoch
        return True

    @property
    def reached(self):
        return self.steps_to_target is not None

    def state_dict(self):
        """What a checkpoint or an elastic commit carries (the sidecar's `tracker` keys)."""
        return {"best": self.best, "steps_to_target": self.steps_to_target,
                "time_to_target_s": self.time_to_target, "epochs_to_target": self.epochs_to_target}

    def load_state_dict(self, state):
        self.best = state.get("best")
        self.steps_to_target = state.get("steps_to_target")
        self.time_to_target = state.get("time_to_target_s")
        self.epochs_to_target = state.get("epochs_to_target")


def interpolated_crossing(prev, cur, target):
    """Step where the accuracy crosses `target` between two evaluations (step, accuracy), by
    linear interpolation; the later step when the earlier one is already at the target or the
    accuracy did not rise."""
    (s0, a0), (s1, a1) = prev, cur
    if a0 >= target or a1 <= a0:
        return float(s1)
    return s0 + (target - a0) / (a1 - a0) * (s1 - s0)


@dataclass
class SweepPoint:
    """One run of a sweep: steps to target, or None with the step budget it ran out of."""
    batch_size: int
    steps_to_target: float = None
    steps_run: float = None          # steps actually run (the budget when the target was missed)

    @property
    def reached(self):
        return self.steps_to_target is not None


@dataclass
class BCritResult:
    b_crit: float                    # None when the sweep cannot say
    status: str                      # measured | upper_bound | above_range | undefined
    bracket: tuple = ()              # (last batch below 2x, first batch at or above 2x)
    excess: dict = field(default_factory=dict)   # batch -> S(B) / S_perfect(B) (lower bound if missed)
    reason: str = ""

    def describe(self):
        if self.status == "measured":
            return f"B_crit ~ {self.b_crit:.0f} (between {self.bracket[0]} and {self.bracket[1]})"
        if self.status == "upper_bound":
            return (f"B_crit <= {self.b_crit:.0f} (between {self.bracket[0]} and "
                    f"{self.bracket[1]}; the larger batch missed the target within its budget)")
        if self.status == "above_range":
            return f"B_crit > {self.bracket[0]} (never reached 2x perfect scaling in the sweep)"
        return f"B_crit undefined: {self.reason}"


def b_crit_from_sweep(points, factor=2.0):
    """Apply the B_crit rule (see the module docstring) to one curve of a sweep.

    points: SweepPoint per batch size (any order; repeats of a batch size are averaged by the
    caller). A run that missed the target counts as needing more than the steps it ran.
    """
    points = sorted(points, key=lambda p: p.batch_size)
    if len(points) < 2:
        return BCritResult(None, "undefined", reason="need at least two batch sizes")
    base = points[0]
    if not base.reached:
        return BCritResult(None, "undefined",
                           reason=f"the smallest batch ({base.batch_size}) missed the target")
    excess = {}
    for p in points:
        steps = p.steps_to_target if p.reached else p.steps_run
        if steps is None:
            raise ConfigError(f"sweep point at batch {p.batch_size} has neither steps to target "
                              f"nor steps run")
        excess[p.batch_size] = steps * p.batch_size / (base.steps_to_target * base.batch_size)
    for below, above in zip(points, points[1:]):
        r_above = excess[above.batch_size]
        if r_above < factor:   # for a missed target this is a lower bound: undecided, go on
            continue
        r_below = excess[below.batch_size]
        # log-log interpolation of the examples ratio between the two batch sizes
        lo, hi = math.log(below.batch_size), math.log(above.batch_size)
        lr_lo, lr_hi = math.log(max(r_below, 1e-12)), math.log(r_above)
        if lr_hi > lr_lo:
            frac = (math.log(factor) - lr_lo) / (lr_hi - lr_lo)
            frac = min(max(frac, 0.0), 1.0)
        else:
            frac = 1.0
        b_crit = math.exp(lo + frac * (hi - lo))
        status = "measured" if above.reached else "upper_bound"
        return BCritResult(b_crit, status, (below.batch_size, above.batch_size), excess)
    # no batch reached the factor; a missed target below the factor says nothing either way
    return BCritResult(None, "above_range", (points[-1].batch_size,), excess,
                       reason=f"steps stayed within {factor:g}x of perfect scaling")


def fit_steps_model(points):
    """Least-squares fit of the paper's S(B) = S_min * (1 + B_crit / B) to the runs that reached
    the target, with relative residuals. Returns (S_min, B_crit) or None when the fit is
    meaningless (fewer than 2 points or a non-positive S_min)."""
    reached = [p for p in points if p.reached]
    if len({p.batch_size for p in reached}) < 2:
        return None
    # S = a + c / B is linear in (a, c); dividing each row by S weights the errors relatively
    rows = [(1.0 / p.steps_to_target, 1.0 / (p.batch_size * p.steps_to_target)) for p in reached]
    saa = sum(r[0] * r[0] for r in rows)
    sac = sum(r[0] * r[1] for r in rows)
    scc = sum(r[1] * r[1] for r in rows)
    sa1 = sum(r[0] for r in rows)
    sc1 = sum(r[1] for r in rows)
    det = saa * scc - sac * sac
    if det == 0:
        return None
    a = (sa1 * scc - sc1 * sac) / det
    c = (saa * sc1 - sac * sa1) / det
    if a <= 0 or c <= 0:
        return None
    return a, c / a


# --------------------------------------------------------------------------------------------
# McCandlish et al.'s steps/examples trade-off, fitted with censoring
#
#     (S / S_min - 1) (E / E_min - 1) = 1,   E = B S
# is the same curve as S(B) = S_min + E_min / B, and B_crit = E_min / S_min. The fit minimises
# squared log-residuals over every run at every batch size; a run that missed the target within
# its budget S_run only says S(B) > S_run, so it adds max(0, log S_run - log S_model)^2 (an
# inequality: no cost while the model agrees with it). Repeats of a batch size (seeds) are
# separate points.


@dataclass
class TradeoffFit:
    s_min: float
    e_min: float

    @property
    def b_crit(self):
        return self.e_min / self.s_min

    def steps(self, batch_size):
        return self.s_min + self.e_min / batch_size


def _tradeoff_loss(log_s, log_e, batch, log_steps, reached):
    """Loss for every (log S_min, log E_min) pair in the broadcast grids."""
    import numpy as np

    model = np.log(np.exp(log_s)[..., None] + np.exp(log_e)[..., None] / batch)
    resid = log_steps - model
    resid = np.where(reached, resid, np.maximum(resid, 0.0))
    return np.sum(resid ** 2, axis=-1)


def fit_tradeoff(points):
    """Fit S(B) = S_min + E_min / B to SweepPoints (missed targets as inequalities). Returns a
    TradeoffFit, or None with fewer than two batch sizes that reached the target."""
    import numpy as np

    usable = [p for p in points if p.reached or p.steps_run]
    reached = [p for p in usable if p.reached]
    if len({p.batch_size for p in reached}) < 2:
        return None
    batch = np.array([float(p.batch_size) for p in usable])
    log_steps = np.log([float(p.steps_to_target if p.reached else p.steps_run) for p in usable])
    hit = np.array([p.reached for p in usable])
    # S_min lies below the fewest steps seen, E_min below the fewest examples seen
    s_hi = math.log(min(math.exp(v) for v, h in zip(log_steps, hit) if h)) + 0.5
    e_hi = math.log(min(math.exp(v) * b for v, b, h in zip(log_steps, batch, hit) if h)) + 0.5
    lo_s, hi_s, lo_e, hi_e = s_hi - 9.0, s_hi, e_hi - 9.0, e_hi
    best = None
    for _ in range(4):          # coarse grid, then three zooms around the best cell
        gs = np.linspace(lo_s, hi_s, 61)
        ge = np.linspace(lo_e, hi_e, 61)
        loss = _tradeoff_loss(gs[:, None], ge[None, :], batch, log_steps, hit)
        i, j = np.unravel_index(np.argmin(loss), loss.shape)
        best = (gs[i], ge[j])
        ds, de = (hi_s - lo_s) / 10, (hi_e - lo_e) / 10
        lo_s, hi_s, lo_e, hi_e = gs[i] - ds, gs[i] + ds, ge[j] - de, ge[j] + de
    return TradeoffFit(math.exp(best[0]), math.exp(best[1]))


def bootstrap_tradeoff(points, replicates=300, level=0.95, seed=0):
    """Percentile interval of B_crit from refits on bootstrap resamples of the seeds: at every
    batch size its runs are drawn with replacement. Returns (fit, ci_low, ci_high, refits)
    with None bounds when fewer than two batch sizes reach the target."""
    import numpy as np

    fit = fit_tradeoff(points)
    if fit is None:
        return None, None, None, []
    rng = np.random.default_rng(seed)
    by_batch = {}
    for p in points:
        by_batch.setdefault(p.batch_size, []).append(p)
    values = []
    for _ in range(replicates):
        sample = []
        for group in by_batch.values():
            sample += [group[k] for k in rng.integers(0, len(group), size=len(group))]
        refit = fit_tradeoff(sample)
        if refit is not None:
            values.append(refit)
    if not values:
        return fit, None, None, values
    lo, hi = np.percentile([v.b_crit for v in values], [50 * (1 - level), 50 * (1 + level)])
    return fit, float(lo), float(hi), values


def b_crit_2x_offset_removed(points, factor=2.0):
    """The 2x-perfect-scaling rule as a cross-check: under S = S_min + E_min / B it lands at
    B_2x = B_crit + 2 B0 (B0 the smallest batch), so 2 B0 is subtracted. points: one SweepPoint
    per batch size (seeds already combined). Returns (value or None, BCritResult)."""
    raw = b_crit_from_sweep(points, factor)
    if raw.b_crit is None:
        return None, raw
    b0 = min(p.batch_size for p in points)
    return raw.b_crit - 2.0 * b0, raw
