"""The online gradient noise scale inside a training loop, framework-neutral.

The trainer supplies, on a step where the estimate is due, the squared norms of this worker's
micro-batch gradients (before any allreduce) and of the final averaged gradient (after it).
This module averages the local norms across workers with one scalar allreduce, feeds the pair
to hvdscale.core.noise_scale and returns the fields to log in metrics.jsonl.

Which gradients count as "small": every micro-batch gradient on every worker, each a mean over
`per_micro_batch` examples. The "big" gradient averages workers * micro_batches of them. With one
worker and no accumulation there is only one micro-batch, so the trainer splits the batch in two
on due steps (see `split_for_estimate`); the update is unchanged, as the halves' mean gradient
is the full batch's.
"""
from hvdscale.core.noise_scale import NoiseScaleEstimator, data_parallel_batches, is_due
from hvdscale.errors import ConfigError


def split_for_estimate(workers, accumulation):
    """How many pieces a due step must cut each micro-batch into so there are >= 2 small
    gradients per step: 2 for a single worker without accumulation, else 1."""
    return 2 if workers * accumulation < 2 else 1


class OnlineNoiseScale:
    """Holds the EMA state and knows the batch sizes of the small and the big gradient.

    average_across_workers: float -> float, the mean of a scalar over all workers (one
    allreduce; identity on a single process). Every worker must call `record` on the same steps.
    """

    def __init__(self, every, ema, per_micro_batch, micro_batches, workers,
                 average_across_workers=None):
        if every < 0:
            raise ConfigError(f"noise_scale.every must be >= 0 (0 = off), got {every}")
        if per_micro_batch < 1:
            raise ConfigError(f"noise scale needs a micro-batch of at least 1 example, "
                              f"got {per_micro_batch}")
        self.every = int(every)
        self.estimator = NoiseScaleEstimator(ema)
        self.b_small, self.b_big = data_parallel_batches(per_micro_batch, workers, micro_batches)
        self.micro_batches = micro_batches
        self._average = average_across_workers or (lambda value: value)
        self.last = None
        self.steps = 0          # optimizer steps seen (the trainer's own count)
        self.due_now = False

    @classmethod
    def for_step(cls, every, ema, per_worker, accumulation, workers,
                 average_across_workers=None):
        """From the recipe's batch settings, splitting the batch when there is only one piece."""
        split = split_for_estimate(workers, accumulation)
        if per_worker % split:
            raise ConfigError(f"noise scale on one worker splits the batch in {split}; "
                              f"batch.per_worker={per_worker} is not divisible")
        return cls(every, ema, per_worker // split, accumulation * split, workers,
                   average_across_workers)

    def set_accumulation(self, per_worker, accumulation, workers):
        """The batch changed (adaptive batch, elastic world): the small and big gradients'
        sizes follow; the averages carry on (|G|^2 and tr(Sigma) do not depend on them)."""
        split = split_for_estimate(workers, accumulation)
        if per_worker % split:
            raise ConfigError(f"noise scale on one worker splits the batch in {split}; "
                              f"batch.per_worker={per_worker} is not divisible")
        self.b_small, self.b_big = data_parallel_batches(per_worker // split, workers,
                                                         accumulation * split)
        self.micro_batches = accumulation * split

    def due(self, step):
        return is_due(step, self.every)

    def begin_step(self, accumulation):
        """Call once per optimizer step: how many micro-batches this step must use (the
        recipe's accumulation, times the split on due steps of a single worker)."""
        self.due_now = self.due(self.steps)
        self.steps += 1
        if not self.due_now:
            return accumulation
        return self.micro_batches

    def record(self, local_micro_sq_norms, global_sq_norm):
        """Fold in one step; returns {'b_simple', 'gns_g2', 'gns_trace', 'gns_samples'}."""
        norms = list(local_micro_sq_norms)
        if len(norms) != self.micro_batches:
            raise ValueError(f"noise scale expected {self.micro_batches} micro-batch gradient "
                             f"norms on this worker, got {len(norms)}")
        local_mean = sum(norms) / len(norms)
        small_sq = float(self._average(local_mean))      # the one extra scalar allreduce
        reading = self.estimator.update(small_sq, self.b_small, float(global_sq_norm), self.b_big)
        self.last = reading.as_log()
        return self.last

    def state_dict(self):
        return {"estimator": self.estimator.state_dict(), "steps": self.steps,
                "last": self.last}

    def load_state_dict(self, state):
        self.estimator.load_state_dict(state["estimator"])
        self.steps = int(state["steps"])
        self.last = state.get("last")


def from_config(noise_cfg, batch_cfg, comm):
    """The trainer's OnlineNoiseScale for a recipe, or None when noise_scale.every is 0.
    comm: hvdscale.comm.Comm (its scalar allreduce is the one extra collective)."""
    if not noise_cfg.every:
        return None
    return OnlineNoiseScale.for_step(
        noise_cfg.every, noise_cfg.ema, batch_cfg.per_worker, batch_cfg.accumulation, comm.size,
        average_across_workers=lambda value: comm.allreduce(float(value), op="average"))
