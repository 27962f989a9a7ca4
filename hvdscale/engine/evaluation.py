"""An evaluation that a preemption signal can interrupt, with every rank agreeing.

An evaluation of a large test set with a slow model can take longer than a launcher's grace
time (horovodrun SIGKILLs the ranks 5 s after it forwards SIGTERM). The engine therefore hands
the backend the evaluation in chunks of batches, each about `watch.check_seconds` long
(at least one batch), and between chunks the ranks agree, in one small blocking allreduce,
whether to go on:

    round r:  allreduce max over ranks of [this rank received a signal, this rank has batches left]
              -> a signal anywhere: every rank abandons the evaluation (no record is written)
              -> no rank has batches left: every rank has finished
              -> otherwise each rank with batches left evaluates one more chunk

Ranks may hold different numbers of batches (the test set splits unevenly) and may run their
chunks at different speeds: collectives are matched by order, not by batch, so a rank that has
finished keeps answering rounds until the others have finished too, and every rank leaves at
the same round. The collectives run in the main thread (never inside a backend's batch
iterator, which TensorFlow may run in a tf.data thread), and each chunk ends in one host read
(the backend's `evaluate` reads its sums once), so on a device the cost is one sync and one
allreduce per `check_seconds` of evaluation.

Evaluation turns one such evaluation into the run's record (metrics.jsonl) and keeps what the
evaluations found: the target tracker and the last accuracy, checkpointed through state_dict.
"""
import itertools
import time
from typing import Any, Dict, Iterable, Optional, Tuple

import numpy as np

from hvdscale.core.metrics import TargetTracker
from hvdscale.engine.backend import MetricsSupport

# the most batches in one chunk (very fast batches)
MAX_CHUNK = 10_000


class _Tracked:
    """An iterator that remembers whether it has run out."""

    def __init__(self, batches: Iterable):
        self._it = iter(batches)
        self.exhausted = False
        self.taken = 0

    def __iter__(self):
        return self

    def __next__(self):
        try:
            batch = next(self._it)
        except StopIteration:
            self.exhausted = True
            raise
        self.taken += 1
        return batch


def evaluate_interruptibly(backend: Any, batches: Iterable, watch: Any,
                           clock=time.perf_counter) -> Optional[Tuple[int, int, float]]:
    """(correct, count, loss_sum) of this rank's batches, as backend.evaluate returns them, or
    None when a preemption signal (on any rank) stopped the evaluation; then `watch.agreed` is
    set, on every rank alike."""
    source = _Tracked(batches)
    correct, count, loss_sum = 0, 0, 0.0
    chunk = 1                       # the first chunk measures how long a batch takes
    while True:
        stop, anyone_left = watch.agree_now(more=not source.exhausted)
        if stop:
            return None
        if not anyone_left:
            return correct, count, loss_sum
        if source.exhausted:        # finished here: answer the next round at once
            continue
        before, t0 = source.taken, clock()
        c, n, loss = backend.evaluate(itertools.islice(source, chunk))
        correct, count, loss_sum = correct + int(c), count + int(n), loss_sum + float(loss)
        ran = source.taken - before
        if ran:
            per_batch = max(clock() - t0, 1e-9) / ran
            chunk = int(min(MAX_CHUNK, max(1, watch.check_seconds // per_batch)))


class Evaluation:
    """The evaluations of a run: the record of each, the target tracker, the last accuracy."""

    def __init__(self, cfg: Any):
        self.tracker = TargetTracker(cfg.train.target_accuracy)
        self.last_accuracy: Optional[float] = None
        self.records: list = []

    def run(self, engine, wall: float) -> Optional[Dict[str, Any]]:
        """Evaluate on every rank; the metrics.jsonl record, or None when a preemption signal
        abandoned the evaluation (on every rank alike: no record for a partial one)."""
        engine.stats.collect(engine)
        engine.backend.sync_statistics()
        sums = evaluate_interruptibly(engine.backend, engine.eval_source.batches(),
                                      engine.preemption.watch)
        if sums is None:
            return None
        correct, count, loss_sum = sums
        comm = engine.comm
        totals = comm.allreduce(np.array([correct, count], dtype=np.int64), op="sum")
        loss_total = comm.allreduce(float(loss_sum), op="sum")
        accuracy = float(totals[0]) / max(1, int(totals[1]))
        self.last_accuracy = accuracy
        epoch = engine.examples / engine.epoch_examples     # the batch may have changed
        self.tracker.observe(engine.step, accuracy, engine.clock.train_time, epoch=epoch)
        record = {
            "step": engine.step, "epoch": round(epoch, 4), "framework": engine.backend.framework,
            "workers": comm.size, "global_batch": engine.global_batch,
            "lr": engine.lr.schedule(engine.step - 1), "train_loss": engine.stats.train_loss(),
            "test_loss": loss_total / max(1, int(totals[1])), "test_accuracy": accuracy,
            "test_examples": int(totals[1]),
            "images_per_sec": engine.clock.images_per_sec(engine.global_batch),
            "elapsed_s": engine.clock.train_time, "wall_s": wall,
            "skipped_steps": engine.stats.nonfinite.skipped,
        }
        if isinstance(engine.backend, MetricsSupport):     # e.g. the online noise scale
            record.update(engine.backend.extra_metrics())
        self.records.append(record)
        return record

    def state_dict(self) -> Dict[str, Any]:
        return {"last_accuracy": self.last_accuracy, "tracker": self.tracker.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.last_accuracy = state.get("last_accuracy")
        self.tracker.load_state_dict(state.get("tracker", {}))
