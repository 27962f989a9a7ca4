"""What the steps cost and what they left on the device, for the Engine loop.

RunClock: training time over all sessions (`train_time`, checkpointed) and this session's timed
share, the session's first step left out (graph tracing, allocation), for throughput.
Evaluation and checkpoints are not timed; the statistics reads are (on a GPU the read is where
the host waits for the queued steps).

StepStats: the statistics read (docs/architecture.md, "Step"): a step leaves its loss sum,
example count and non-finite flag on the device; every `log.every_steps` steps, and before
every evaluation, checkpoint and elastic commit, they are read once (backend.read_stats) and
agreed across the ranks in one small allreduce (a second only when some rank saw a non-finite
step), and `faults.nonfinite` is applied: abort raises NonFiniteLossError naming the first bad
step, skip counts (the backend has dropped those updates on every rank already).
"""
import time
from typing import Any

import numpy as np

from hvdscale.engine.faults import NonFiniteGuard


class RunClock:
    def __init__(self):
        self.train_time = 0.0        # seconds inside training steps, all sessions
        self.timed_time = 0.0        # this session, first step excluded (throughput)
        self.timed_steps = 0
        self.session_steps = 0       # optimizer steps of this session

    def add(self, elapsed: float, step: bool = False) -> None:
        """Time spent in a training step (step=True) or in a statistics read."""
        self.train_time += elapsed
        if self.session_steps > 0:      # the session's first step is warm-up: not timed
            self.timed_time += elapsed
            self.timed_steps += step
        self.session_steps += step

    def images_per_sec(self, global_batch: int) -> float:
        if self.timed_steps > 0 and self.timed_time > 0:
            return self.timed_steps * global_batch / self.timed_time
        if self.train_time > 0:
            return self.session_steps * global_batch / self.train_time
        return 0.0

    def time_per_step(self) -> float:
        return (self.timed_time / self.timed_steps if self.timed_steps
                else self.train_time / max(1, self.session_steps))


class StepStats:
    def __init__(self, cfg: Any, comm: Any, echo):
        # skip is decided by the backend from the averaged gradients (equal on every rank);
        # the guard counts it and applies abort when the statistics are read
        self.nonfinite = NonFiniteGuard(cfg.faults.nonfinite, comm, echo)
        self.comm, self.every = comm, cfg.log.every_steps
        self.unread = 0              # steps whose statistics are still on the device
        self._loss_sum, self._loss_n = 0.0, 0     # over every rank, since the last evaluation

    def stepped(self, engine) -> None:
        """After each optimizer step: read at the log interval."""
        self.unread += 1
        if engine.step % self.every == 0:
            self.collect(engine)

    def collect(self, engine) -> None:
        """Read the statistics of the steps since the last read and agree on them; callbacks
        get the rank's stats plus `loss_sum_all` / `examples_all` over every rank."""
        if self.unread == 0:
            return
        t0 = time.perf_counter()
        stats = engine.backend.read_stats()
        engine.clock.add(time.perf_counter() - t0)
        first_step = engine.step - self.unread
        self.unread = 0
        loss_all, examples_all, any_bad = self.comm.allreduce(np.array(
            [stats["loss_sum"], stats["examples"], stats["nonfinite_steps"]], np.float64),
            op="sum")
        if any_bad:       # the same on every rank, so all of them take this collective
            first = stats["first_nonfinite_step"]
            # max of (count, -first step): agreed count, earliest bad step over the ranks
            count, neg_first = self.comm.allreduce(
                np.array([stats["nonfinite_steps"], -(first if first is not None else 2 ** 40)],
                         dtype=np.int64), op="max")
            self.nonfinite.account(first_step + int(-neg_first), int(count))
        if examples_all:
            self._loss_sum += float(loss_all)
            self._loss_n += int(examples_all)
        engine.callbacks.stats(engine, dict(stats, loss_sum_all=float(loss_all),
                                            examples_all=int(examples_all)))

    def train_loss(self) -> float:
        """Mean training loss over every rank since the previous call (NaN when none)."""
        loss = self._loss_sum / self._loss_n if self._loss_n else float("nan")
        self._loss_sum, self._loss_n = 0.0, 0
        return loss

    def forget(self, backend) -> None:
        """Drop the statistics of steps an elastic reset rolled back."""
        self.unread = 0
        backend.read_stats()
