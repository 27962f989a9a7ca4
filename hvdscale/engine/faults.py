"""Fault handling the engine applies around each step, framework-neutral.

- NonFiniteGuard: a NaN/inf loss or gradient on any rank is agreed on by one allreduce of a
  flag, then handled by `faults.nonfinite`: `skip` drops that update on every rank (counted),
  `abort` stops every rank with the step number.
- poison_batch: the debug injection behind `faults.inject_nan_at_step` (tests use it).
- worker_lost / lost_worker_message: recognise Horovod's shutdown after a peer died, so the
  surviving ranks exit with one line instead of a traceback.
- Watchdog: ends a rank whose step has not finished for `faults.step_timeout_s` seconds, for
  the hangs that no collective ever times out (MPI waits for a stopped peer forever).
"""
import math
import os
import sys
import threading
import time

import numpy as np

from hvdscale.engine.callbacks import Callback
from hvdscale.errors import NonFiniteLossError

# Horovod raises these (as RuntimeError or HorovodInternalError) once a peer has gone.
_SHUTDOWN_MARKERS = ("Horovod has been shut down", "HorovodInternalError",
                     "Connection reset by peer", "Connection closed by peer")
WATCHDOG_EXIT_CODE = 5


class NonFiniteGuard:
    """Decides, identically on every rank, whether this step's update may be applied."""

    def __init__(self, policy, comm, echo=print):
        if policy not in ("abort", "skip", "off"):
            raise ValueError(f"unknown non-finite policy {policy!r}")
        self.policy, self.comm, self.echo = policy, comm, echo
        self.skipped = 0

    def check(self, step, loss, grads_finite=True):
        """True: apply the update. False: skip it (policy skip). Raises NonFiniteLossError
        (policy abort). Every rank calls this once per step: it is a collective."""
        bad_here = not (math.isfinite(loss) and grads_finite)
        if not self.comm.any_true(bad_here):
            return True
        if self.policy == "abort":
            raise NonFiniteLossError(f"non-finite loss or gradient at step {step} "
                                     f"(faults.nonfinite = abort)")
        self.skipped += 1
        self.echo(f"step {step}: non-finite loss or gradient, update skipped on every rank "
                  f"({self.skipped} skipped so far)")
        return False


    def account(self, first_step, count):
        """Apply the policy to `count` non-finite steps (the first at `first_step`) that the
        backend reported and the ranks agreed on: abort raises, skip counts and reports
        (the backend has already dropped those updates on every rank)."""
        if self.policy == "abort":
            raise NonFiniteLossError(f"non-finite loss or gradient at step {first_step} "
                                     f"(faults.nonfinite = abort)")
        if self.policy != "skip":
            return
        self.skipped += count
        where = f"step {first_step}" if count == 1 else \
            f"{count} steps from step {first_step}"
        self.echo(f"{where}: non-finite loss or gradient, update skipped on every rank "
                  f"({self.skipped} skipped so far)")


def poison_batch(x):
    """A batch of NaNs shaped like `x`: the loss and every gradient become non-finite."""
    return np.full(x.shape, np.nan, dtype=x.dtype if np.issubdtype(x.dtype, np.floating)
                   else np.float32)


def worker_lost(err):
    """Whether `err` is Horovod telling this rank that a peer has died or hung up."""
    text = f"{type(err).__name__}: {err}"
    return any(marker in text for marker in _SHUTDOWN_MARKERS)


def lost_worker_message(step, checkpoint_step):
    where = (f"the newest checkpoint is step {checkpoint_step}; continue with --resume"
             if checkpoint_step is not None else "no checkpoint was written yet")
    return (f"lost a worker at step {step}: Horovod shut down (the launcher's message names "
            f"the rank); {where}")


class Watchdog:
    """A daemon thread that ends this process when no step has finished for `timeout_s`.

    `beat()` after every step; the first beat arms it, so start-up (imports, data loading,
    Horovod init) is not timed. On expiry it prints one line and calls os._exit, which the
    launcher sees as a failed rank and so ends the others."""

    def __init__(self, timeout_s, rank, echo_err=None, clock=time.monotonic):
        self.timeout_s, self.rank, self.clock = timeout_s, rank, clock
        self.echo_err = echo_err or (lambda line: print(line, file=sys.stderr, flush=True))
        self._last = None
        self._step = None
        self._stop = threading.Event()
        self._thread = None

    def beat(self, step):
        self._last, self._step = self.clock(), step
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="hvdscale-watchdog",
                                            daemon=True)
            self._thread.start()

    def stop(self):
        self._stop.set()

    def expired(self):
        return self._last is not None and self.clock() - self._last > self.timeout_s

    def _watch(self):
        poll = min(1.0, self.timeout_s / 4)
        while not self._stop.wait(poll):
            if self.expired():
                self.echo_err(f"hvdscale train: error: rank {self.rank}: no training step "
                              f"finished for {self.timeout_s:g} s after step {self._step} "
                              f"(a peer hung or the network stalled; faults.step_timeout_s)")
                os._exit(WATCHDOG_EXIT_CODE)


class WatchdogCallback(Callback):
    """`faults.step_timeout_s` for a run: a beat after every step, evaluation and checkpoint
    (the first beat, after step 1, arms it: start-up is not timed), stopped when the run ends."""

    def __init__(self, timeout_s, rank):
        self.dog = Watchdog(timeout_s, rank)

    def on_step_end(self, engine):
        self.dog.beat(engine.step)

    def on_evaluate(self, engine, record):
        self.dog.beat(engine.step)

    def on_checkpoint(self, engine, step):
        self.dog.beat(step)

    def on_run_end(self, engine, ending, summary):
        self.dog.stop()
