"""Gradient noise scale, estimated online (McCandlish et al. 2018, "An empirical model of
large-batch training", Appendix A).

A gradient averaged over a batch of B examples, G_B, satisfies
    E[|G_B|^2] = |G|^2 + tr(Sigma) / B,
with G the true gradient and Sigma the per-example gradient covariance. Two batch sizes
b_small < b_big give two equations and so unbiased estimates of both unknowns:
    |G|^2     ~ (b_big |G_big|^2 - b_small |G_small|^2) / (b_big - b_small)
    tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1/b_small - 1/b_big)
and the simple noise scale B_simple = tr(Sigma) / |G|^2, which the paper finds close to the
critical batch size. Each single-step estimate is very noisy (|G|^2 can come out negative), so
numerator and denominator are smoothed separately with an exponential moving average and only
their ratio is reported.

Data parallelism gives both batch sizes for free: each worker's local gradient is a small batch
(b), the allreduced gradient is the big one (K*b); averaging the workers' |G_small|^2 costs one
extra scalar allreduce. On one process the trainer splits its batch into micro-batches instead.

Plain Python only: the torch/TF helpers (hvdscale/study/gns_torch.py, gns_tf.py) compute the
squared norms and hand floats to this module.
"""
import math
from dataclasses import dataclass
from typing import Tuple

from hvdscale.errors import ConfigError


def unbiased_estimates(small_sq: float, b_small: int, big_sq: float,
                       b_big: int) -> Tuple[float, float]:
    """(|G|^2, tr(Sigma)) estimated from one pair of squared gradient norms.

    small_sq: |G_small|^2 of a gradient averaged over b_small examples (or the mean of several
    such squared norms, which keeps the estimate unbiased and lowers its variance);
    big_sq: |G_big|^2 of a gradient averaged over b_big examples.
    """
    b_small, b_big = float(b_small), float(b_big)
    if not (b_small > 0 and b_big > b_small):
        raise ConfigError(f"noise scale needs 0 < b_small < b_big, got b_small={b_small:g}, "
                          f"b_big={b_big:g}")
    g2 = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
    trace = (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big)
    return float(g2), float(trace)


def is_due(step: int, every: int) -> bool:
    """True on the steps where the estimate is taken (every=0 switches it off)."""
    return every > 0 and step % every == 0


@dataclass
class NoiseScaleReading:
    """One smoothed reading, ready for metrics.jsonl."""
    g2: float            # EMA of the |G|^2 estimates
    trace: float         # EMA of the tr(Sigma) estimates
    b_simple: float      # trace / g2; None while g2 <= 0 (not enough signal yet)
    samples: int         # how many single-step estimates went into the averages

    def as_log(self, prefix="gns_"):
        return {f"{prefix}g2": self.g2, f"{prefix}trace": self.trace,
                "b_simple": self.b_simple, f"{prefix}samples": self.samples}


class NoiseScaleEstimator:
    """EMA of |G|^2 and tr(Sigma) estimates, separately; B_simple is the ratio of the two.

    The moving averages are bias-corrected (as in Adam) so the first readings are not pulled
    toward zero; the ratio is unaffected by the correction, the logged parts are.
    """

    def __init__(self, ema: float = 0.9):
        if not 0.0 <= ema < 1.0:
            raise ConfigError(f"noise_scale.ema must be in [0, 1), got {ema!r}")
        self.ema = float(ema)
        self._g2 = 0.0
        self._trace = 0.0
        self._weight = 0.0   # 1 - ema^n: the bias correction
        self.samples = 0
        self.skipped = 0     # steps with a non-finite gradient, left out

    def update(self, small_sq: float, b_small: int, big_sq: float,
               b_big: int) -> "NoiseScaleReading":
        """Fold in one step's squared norms; returns the new reading.

        A non-finite norm (an overflowing step, handled by the trainer's fault policy) is left
        out rather than poisoning the averages for the rest of the run.
        """
        small_sq, big_sq = float(small_sq), float(big_sq)
        if not (math.isfinite(small_sq) and math.isfinite(big_sq)):
            self.skipped += 1
            return self.reading()
        if small_sq < 0 or big_sq < 0:
            raise ValueError(f"noise scale: squared norms cannot be negative, got "
                             f"|G_small|^2={small_sq!r}, |G_big|^2={big_sq!r}")
        g2, trace = unbiased_estimates(small_sq, b_small, big_sq, b_big)
        keep = self.ema
        self._g2 = keep * self._g2 + (1 - keep) * g2
        self._trace = keep * self._trace + (1 - keep) * trace
        self._weight = keep * self._weight + (1 - keep)
        self.samples += 1
        return self.reading()

    def reading(self):
        if self.samples == 0:
            return NoiseScaleReading(g2=None, trace=None, b_simple=None, samples=0)
        g2 = self._g2 / self._weight
        trace = self._trace / self._weight
        # A non-positive |G|^2 estimate means the noise still swamps the signal: no ratio yet.
        b_simple = trace / g2 if g2 > 0 else None
        return NoiseScaleReading(g2=g2, trace=trace, b_simple=b_simple, samples=self.samples)

    @property
    def b_simple(self):
        return self.reading().b_simple

    def state_dict(self):
        """For checkpoints: resuming keeps the averages."""
        return {"ema": self.ema, "g2": self._g2, "trace": self._trace,
                "weight": self._weight, "samples": self.samples, "skipped": self.skipped}

    def load_state_dict(self, state):
        self.ema = float(state["ema"])
        self._g2 = float(state["g2"])
        self._trace = float(state["trace"])
        self._weight = float(state["weight"])
        self.samples = int(state["samples"])
        self.skipped = int(state.get("skipped", 0))


def data_parallel_batches(per_worker: int, workers: int,
                          accumulation: int = 1) -> Tuple[int, int]:
    """(b_small, b_big) for a data-parallel step: one micro-batch vs. the global batch.

    Each micro-batch gradient on each worker is a small-batch gradient; the allreduced,
    accumulated gradient averages workers*accumulation of them.
    """
    count = workers * accumulation
    if count < 2:
        raise ConfigError("noise scale needs at least two micro-batches per step "
                          "(several workers, accumulation > 1, or a split batch)")
    return per_worker, per_worker * count
