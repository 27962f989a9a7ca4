"""Preemption: end a run cleanly when the scheduler asks, with one checkpoint at that step.

SLURM (`scancel --signal`, `--signal=USR1@N`, the end of a time limit) and most schedulers
send SIGTERM or SIGUSR1 before they kill a job. Every rank installs a handler for both that
only records the signal; the ranks then agree, at a step boundary, to stop:

    boundary i:    wait for the flag allreduce started at boundary i-1 (max over ranks)
                   start the next one with this rank's flag
    agreed at i:   every rank stops at the same step, the engine writes one checkpoint, and
                   every rank exits with the same code

The allreduce is started at one step and read at the next, so it costs no wait: the ranks act
one step after the first of them saw the signal, never inside a collective. A second signal
while the checkpoint is being written is only counted (the handler stays installed), so it
cannot interrupt the save; a SIGKILL cannot be caught, but checkpoints are written atomically
(hvdscale/engine/checkpoint.py), so the previous one stays the newest complete one.

What the launchers do with a signal sent to them rather than to the ranks (measured with
Horovod 0.28.1 and Open MPI 4.1.4; docs/reliability.md):
- horovodrun (Gloo, also elastic): SIGTERM/SIGINT are forwarded as SIGTERM to every rank,
  then SIGKILL after 5 s (horovod.runner.common.util.safe_shell_exec); SIGUSR1 kills
  horovodrun itself and the ranks get the same SIGTERM + 5 s. horovodrun exits 0 when every
  rank did.
- mpirun: SIGUSR1/SIGUSR2 are forwarded at once and mpirun exits with the ranks' code; on
  SIGTERM it sends SIGCONT, then SIGTERM after `odls_base_sigkill_timeout` (1 s by default),
  then SIGKILL after as long again, and exits 1 whatever the ranks did.
- horovodrun --mpi execs `/bin/sh -c mpirun ...`: the signal reaches the shell, not mpirun.
"""
import signal
import time

import numpy as np

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionWatch:
    """Records SIGTERM/SIGUSR1 and turns them into a stop that every rank agrees on."""

    def __init__(self, comm, signals=PREEMPT_SIGNALS, clock=time.monotonic):
        self.comm, self.signals, self.clock = comm, tuple(signals), clock
        self.signal_name = None      # the first signal this rank received
        self.received_at = None
        self.repeats = 0             # signals after the first (e.g. during the save)
        self.agreed = False
        self._pending = None         # the flag allreduce started at the last boundary
        self._previous = {}

    # ------------------------------------------------------------------ handlers
    def install(self):
        """Catch the signals (main thread only; elsewhere Python refuses, and the run keeps
        the default behaviour)."""
        for sig in self.signals:
            try:
                self._previous[sig] = signal.signal(sig, self._on_signal)
            except ValueError:       # not the main thread
                pass
        return self

    def uninstall(self):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def _on_signal(self, signum, frame):
        # only flags: a handler runs between two Python bytecodes of the main thread, and
        # must not touch Horovod or the file being written
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            self.received_at = self.clock()
        else:
            self.repeats += 1

    @property
    def received(self):
        return self.signal_name is not None

    # ------------------------------------------------------------------ agreement
    def should_stop(self):
        """Call once per step boundary on every rank: True on every rank at the same step
        once any rank has received a signal (one step after the boundary where the first
        rank saw it, when distributed)."""
        if self.agreed:
            return True
        if not self.comm.distributed:
            self.agreed = self.received
            return self.agreed
        if self._pending is not None:
            self.agreed = bool(self._pending.wait())
        self._pending = self.comm.allreduce_async(np.int64(self.received), op="max")
        return self.agreed

    def settle(self):
        """Wait for the flag allreduce still in flight (every rank started it), so no rank
        leaves a collective half-done before its exit."""
        if self._pending is not None:
            self._pending.wait()
            self._pending = None

    def forget_pending(self):
        """After Horovod was re-initialised (elastic reset) the old handle is void."""
        self._pending = None

    def describe(self):
        where = f"received {self.signal_name}" if self.received else \
            "a peer received a preemption signal"
        return where + (f" ({self.repeats} more during the save, ignored)"
                        if self.repeats else "")
