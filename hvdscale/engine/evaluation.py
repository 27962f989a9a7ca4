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
"""
import itertools
import time
from typing import Any, Iterable, Optional, Tuple

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
