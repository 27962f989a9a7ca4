"""Learning-rate scaling for large global batches.

The global batch counts every sample that contributes to one optimizer update:
workers x per-worker batch x gradient-accumulation steps. The rules rescale the learning rate
tuned at a reference batch B_ref to the global batch B (K = B / B_ref):

    linear  lr = base_lr * K          (Goyal et al. 2017)
    sqrt    lr = base_lr * sqrt(K)    (Krizhevsky 2014; keeps the update's noise level for Adam-type)
    none    lr = base_lr
"""
import math

from hvdscale.errors import ConfigError

SCALING_RULES = ("linear", "sqrt", "none")


def _positive_int(value, what):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}")
    return value


def global_batch(workers: int, per_worker: int, accumulation: int = 1) -> int:
    """Samples per optimizer update across all workers."""
    return (_positive_int(workers, "workers") * _positive_int(per_worker, "per-worker batch")
            * _positive_int(accumulation, "accumulation steps"))


def micro_batch_sizes(examples: int, pieces: int) -> list:
    """How a rank's batch of `examples` splits into `pieces` micro-batches for gradient
    accumulation (np.array_split's sizes: the first ones one larger). Every backend splits by
    this rule and weights each micro-batch's mean gradient by size / examples, so the step
    is the same full-batch mean whatever the accumulation."""
    base, extra = divmod(examples, pieces)
    return [base + 1] * extra + [base] * (pieces - extra)


def scale_lr(base_lr: float, reference_batch: int, global_batch: int,
             rule: str = "linear") -> float:
    """The learning rate for `global_batch` given `base_lr` tuned at `reference_batch`."""
    if not isinstance(base_lr, (int, float)) or isinstance(base_lr, bool) \
            or not math.isfinite(base_lr) or base_lr <= 0:
        raise ConfigError(f"base learning rate must be a positive finite number, got {base_lr!r}")
    _positive_int(reference_batch, "reference batch")
    _positive_int(global_batch, "global batch")
    k = global_batch / reference_batch
    if rule == "linear":
        return float(base_lr) * k
    if rule == "sqrt":
        return float(base_lr) * math.sqrt(k)
    if rule == "none":
        return float(base_lr)
    raise ConfigError(f"unknown learning-rate scaling rule {rule!r} (choose from {', '.join(SCALING_RULES)})")
