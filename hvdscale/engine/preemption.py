"""Preemption: end a run cleanly when the scheduler asks, with one checkpoint at that step.

SLURM (`scancel --signal`, `--signal=USR1@N`, the end of a time limit) and most schedulers
send SIGTERM or SIGUSR1 before they kill a job; Ctrl-C sends SIGINT. Every rank installs a
handler for the three that only records the signal; the ranks then agree, at a step boundary,
to stop:

    check k:       wait for the flag allreduce started at check k-1 (max over ranks of
                   [flag, mean step seconds]) and start the next one with this rank's values
    agreed at k:   every rank stops at the same step, the engine writes one checkpoint, and
                   every rank exits with the same code

A check is a collective, and a collective per step is not free: at K=2 on a 2-core node one
small allreduce per step cost the torch step ~15 % and, blocking in TensorFlow, more
(benchmarks/RESULTS.md, "Issue 12"). So the ranks check about every `check_seconds`
(faults.preemption_check_s, 0.5 s): the next interval in steps comes from the slowest rank's
mean step time in the last result, which every rank holds alike, so the checks stay at the
same steps everywhere. The allreduce is started at one check and read at the next, so it costs
no wait: the ranks act within about two intervals of the first signal, never inside a
collective.

The first check of a session waits for its answer, so a signal during start-up or the first
step (the longest: tracing, allocation) stops the run right after step 1. Outside the step loop
the ranks agree with `agree_now`, one blocking allreduce: between chunks of an evaluation
(hvdscale/engine/evaluation.py: a long evaluation is abandoned, not finished) and after each
checkpoint (a signal that came during the save makes that checkpoint the preemption one, instead
of a second save a step later). Measured times: benchmarks/RESULTS.md, "Preemption timing and
bad data".

A second signal while the checkpoint is being written is only counted (the handler stays
installed), so it cannot interrupt the save; a SIGKILL cannot be caught, but checkpoints are
written atomically (hvdscale/engine/checkpoint.py), so the previous one stays the newest
complete one.

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
import json
import signal
import time

import numpy as np

from hvdscale.engine.callbacks import Callback
from hvdscale.engine.checkpoint import atomic_write

PREEMPTED_MARKER = "preempted.json"    # OUT/preempted.json after a preemption stop

# SIGINT too: Ctrl-C on a plain `hvdscale train` ends the run as a preemption would (checkpoint,
# preempted.json) instead of a KeyboardInterrupt traceback and lost steps
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class PreemptionWatch:
    """Records SIGTERM/SIGUSR1/SIGINT and turns them into a stop that every rank agrees on."""

    # at most this many steps between two checks (very short steps)
    MAX_INTERVAL = 1000

    def __init__(self, comm, signals=PREEMPT_SIGNALS, clock=time.monotonic,
                 check_seconds=0.5):
        self.comm, self.signals, self.clock = comm, tuple(signals), clock
        self.check_seconds = check_seconds
        self.signal_name = None      # the first signal this rank received
        self.received_at = None
        self.repeats = 0             # signals after the first (e.g. during the save)
        self.agreed = False
        self._previous = {}
        self.checks = 0              # collectives started (what a check costs, counted)
        self.forget_pending()

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
        once any rank has received a signal (within about two check intervals of the first
        signal, when distributed; at once in a single process)."""
        if self.agreed:
            return True
        if not self.comm.distributed:
            self.agreed = self.received
            return self.agreed
        self._countdown -= 1
        self._steps += 1
        if self._countdown > 0:
            return False
        now = self.clock()
        if self._since is None:
            # the first check waits for its answer: a signal that came during start-up or the
            # first step (graph tracing, allocation: the longest step) is acted on at once
            flag, _ = self.comm.allreduce_async(
                np.array([float(self.received), 0.0]), op="max").wait()
            self.checks += 1
            self.agreed = bool(flag > 0)
            self._since, self._steps, self._countdown = now, 0, 1
            return self.agreed
        if self._pending is not None:
            flag, step_seconds = self._pending.wait()
            self.agreed = flag > 0
            self._countdown = self.interval(step_seconds)
        else:
            self._countdown = 1          # the first check: no step time agreed yet
        mean = (now - self._since) / self._steps
        self._since, self._steps = now, 0
        self._pending = self.comm.allreduce_async(
            np.array([float(self.received), mean]), op="max")
        self.checks += 1
        return self.agreed

    def agree_now(self, more=False):
        """One blocking agreement outside the step loop (between two chunks of an evaluation,
        hvdscale/engine/evaluation.py): returns (stop, any rank has more to do), equal on every
        rank; a stop also sets `agreed`, so the step loop stops at once after it."""
        if self.agreed:                  # agreed on every rank alike: no collective needed
            return True, more
        if not self.comm.distributed:
            self.agreed = self.received
            return self.agreed, more
        flag, left = self.comm.allreduce(np.array([float(self.received), float(more)]),
                                         op="max")
        self.checks += 1
        self.agreed = bool(flag > 0)
        return self.agreed, bool(left > 0)

    def interval(self, step_seconds):
        """Steps to the next check for the agreed (slowest) mean step time."""
        if step_seconds <= 0:
            return 1
        return int(min(self.MAX_INTERVAL, max(1, self.check_seconds // step_seconds)))

    def settle(self):
        """Wait for the flag allreduce still in flight (every rank started it), so no rank
        leaves a collective half-done before its exit."""
        if self._pending is not None:
            self._pending.wait()
            self._pending = None

    def forget_pending(self):
        """Start afresh (also after Horovod was re-initialised by an elastic reset: the old
        handle is void, and every rank of the new world restarts its checks alike)."""
        self._pending = None
        self._countdown = 1
        self._steps = 0
        self._since = None

    def describe(self):
        where = f"received {self.signal_name}" if self.received else \
            "a peer received a preemption signal"
        return where + (f" ({self.repeats} more during the save, ignored)"
                        if self.repeats else "")


class Preemption(Callback):
    """A run's preemption: the watch (signal handlers installed while Engine.run runs; the
    loop asks `watch.should_stop()` at each step boundary), the marker of an earlier preempted
    session removed when a run begins, and after the agreed stop and its checkpoint the
    `preempted` event in metrics.jsonl, OUT/preempted.json (what a requeueing batch script can
    test: horovodrun hides exit codes) and the exit code every rank leaves with: 0, or
    checkpoint.requeue_exit_code / HVDSCALE_REQUEUE_EXIT_CODE."""

    def __init__(self, cfg, comm, exit_code=None):
        """exit_code: None = checkpoint.requeue_exit_code (None there too: 0)."""
        self.watch = PreemptionWatch(comm, check_seconds=cfg.faults.preemption_check_s)
        if exit_code is None:
            exit_code = cfg.checkpoint.requeue_exit_code
        self.exit_code = exit_code or 0
        self.info = None            # the `preempted` event, once the run stopped for a signal

    def on_run_begin(self, engine):
        if engine.comm.is_root:     # a marker of an earlier preempted session is history now
            try:
                (engine.out / PREEMPTED_MARKER).unlink(missing_ok=True)
            except OSError:
                pass

    def on_run_end(self, engine, ending, summary):
        if ending != "preempted":
            return
        watch, step, code = self.watch, engine.step, self.exit_code
        watch.settle()
        saved = engine.checkpoints.last_step == step
        self.info = {"event": "preempted", "step": step, "signal": watch.signal_name or "peer",
                     "checkpoint": f"step-{step:08d}" if saved else None,
                     "exit_code": code, "workers": engine.comm.size}
        engine._log.write(self.info)
        marker = engine.out / PREEMPTED_MARKER
        if engine.comm.is_root:
            try:
                atomic_write(marker, (json.dumps(self.info, sort_keys=True) + "\n").encode())
            except OSError as err:
                engine.echo(f"warning: cannot write {marker}: {err}")
        took = (f" {watch.clock() - watch.received_at:.1f} s after the signal"
                if watch.received else "")
        what = f"checkpoint step-{step:08d} written{took}" if saved else \
            "no checkpoint could be written"
        engine.echo(f"preempted ({watch.describe()}) at step {step} of {engine.total_steps}: "
                    f"{what}; exit {code}; continue with --resume")
