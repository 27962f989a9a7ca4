"""The training loop every backend shares.

    for each step: lr = schedule(step) -> backend.train_step(device batch) -> callbacks
                   -> every log.every_steps: read the step statistics (one host read)
                   -> evaluate / checkpoint when due -> stop at max steps or at the target

Statistics are read at the log interval and before every evaluation and checkpoint
(stats.py), so no checkpoint is written without the steps before it having been checked.
Features are callbacks (callbacks.py) or parts of their own: checkpoints (checkpointing.py),
preemption (preemption.py), the watchdog (faults.py), the elastic mode (elastic.py). Every
decision that changes control flow (stop, abort) is taken from values equal on all ranks
(allreduced), so ranks never disagree and hang in a collective.
"""
import time
from dataclasses import dataclass, field
from pathlib import Path

from hvdscale.engine.advice import SlowSettingsCallback
from hvdscale.engine.callbacks import CallbackList
from hvdscale.engine.checkpointing import Checkpointing
from hvdscale.engine.curves import StepCurvesCallback
from hvdscale.engine.elastic import ElasticRun
from hvdscale.engine.evaluation import Evaluation
from hvdscale.engine.faults import WatchdogCallback
from hvdscale.engine.lr import plan_lr
from hvdscale.engine.preemption import Preemption
from hvdscale.engine.reporting import (MetricsFailureCallback, MetricsLog, NullLog,
                                       ProgressCallback, ReportCallback, run_header,
                                       run_summary, summary_table)
from hvdscale.engine.stats import RunClock, StepStats
from hvdscale.engine.tensorboard import TensorBoardCallback
from hvdscale.errors import ConfigError


@dataclass
class RunResult:
    summary: dict                    # None when the session stopped early (stop_after)
    records: list = field(default_factory=list)
    finished: bool = True
    preempted: dict = None           # {"step", "signal", "checkpoint"} after SIGTERM/SIGUSR1
    exit_code: int = 0               # what every rank should exit with


def _interval(every_steps, every_epochs, steps_per_epoch):
    """An event period in steps from a steps or an epochs setting (steps win); None = never."""
    if every_steps is not None or every_epochs is None:
        return every_steps
    return max(1, int(round(every_epochs * steps_per_epoch)))


class Engine:
    """Drives one training run for any Backend (see hvdscale/engine/backend.py)."""

    def __init__(self, cfg, comm, backend, train_source, eval_source, out_dir, *, resume=False,
                 tau_ref=None, hardware="cpu", stop_after=None, requeue_exit_code=None,
                 elastic=False, sources=None, echo=print, callbacks=()):
        """elastic: run as a mode of Horovod's elastic API (hvdscale/engine/elastic.py);
        sources(cfg, rank, size) -> (train, eval) then rebuilds the data for each new world.
        stop_after: end this session after so many steps. requeue_exit_code: every rank's exit
        code after a preemption checkpoint (default checkpoint.requeue_exit_code).
        callbacks: more hvdscale.engine.callbacks.Callback objects, called after the built-in
        ones (slow-setting warnings, progress, TensorBoard, training curves, report)."""
        self.cfg, self.comm, self.backend, self.out = cfg, comm, backend, Path(out_dir)
        self.batches, self.eval_source, self.sources = train_source, eval_source, sources
        self.stop_after, self._print = stop_after, echo
        # for the summary: one worker's images/s (scaling efficiency), the hardware's name
        self.tau_ref = tau_ref if tau_ref is not None else cfg.train.tau_ref
        self.hardware = hardware
        self.per_step = cfg.batch.per_worker * cfg.batch.accumulation   # per rank and step
        self.global_batch = comm.size * self.per_step            # a callback may change both
        self._plan(self.global_batch, self.batches.steps_per_epoch)
        self.step, self.examples = 0, 0       # examples: consumed (global), the data position
        self.clock, self.stats = RunClock(), StepStats(cfg, comm, self.echo)
        self.evaluation = Evaluation(cfg)      # the records, the target tracker
        self.elastic = ElasticRun(self) if elastic else None
        self.checkpoints = Checkpointing(self, resume)
        self.preemption = Preemption(cfg, comm, requeue_exit_code)
        builtin = [SlowSettingsCallback(), ProgressCallback(), TensorBoardCallback(),
                   StepCurvesCallback(), MetricsFailureCallback(), ReportCallback()]
        if cfg.faults.step_timeout_s:
            builtin.insert(0, WatchdogCallback(cfg.faults.step_timeout_s, comm.rank))
        if cfg.batch.adaptive.enabled:       # grows the batch: hvdscale/engine/adaptive.py
            from hvdscale.engine.adaptive import AdaptiveBatch
            builtin.append(AdaptiveBatch(cfg, comm.size))
        self.callbacks = CallbackList([*builtin, *callbacks, self.preemption])
        self.stop_requested = False  # set by a callback (request_stop): end after this step
        self._log = NullLog()

    def request_stop(self):
        """A callback ends the run after the current step (ending "stopped"); it must decide
        from values equal on every rank (an evaluation, a collective), or the ranks hang."""
        self.stop_requested = True

    def echo(self, *args, **kwargs):
        """Print on rank 0 only (looked up each time: elastic runs can renumber ranks)."""
        if self.comm.is_root:
            self._print(*args, **kwargs)

    def _plan(self, global_batch, steps_per_epoch):
        """Length of the run, LR plan and event periods for this global batch (elastic: the
        reference world's)."""
        cfg = self.cfg
        self.steps_per_epoch = steps_per_epoch
        total = int(round(cfg.train.epochs * steps_per_epoch))
        if cfg.train.max_steps is not None:
            total = min(total, cfg.train.max_steps)
        self.total_steps = max(1, total)
        self.epoch_examples = global_batch * steps_per_epoch
        self.lr = plan_lr(cfg, global_batch, steps_per_epoch, self.total_steps)
        if self.lr.warmup_steps >= self.total_steps:
            raise ConfigError(f"warm-up ({self.lr.warmup_steps} steps) is not shorter than "
                              f"training ({self.total_steps} steps of global batch "
                              f"{global_batch})")
        self.eval_every = _interval(cfg.train.eval_every_steps, cfg.train.eval_every_epochs,
                                    steps_per_epoch)
        self.ckpt_every = _interval(cfg.checkpoint.every_steps, cfg.checkpoint.every_epochs,
                                    steps_per_epoch)

    def state_dict(self):
        """The loop position and what the run measured: a checkpoint's sidecar keys, and what
        an elastic commit keeps."""
        return {"step": self.step, "examples": self.examples,
                "train_time_s": self.clock.train_time,
                "skipped_steps": self.stats.nonfinite.skipped,
                "reference_workers": (self.elastic.reference_workers if self.elastic
                                      else self.comm.size),
                **self.evaluation.state_dict()}

    def load_state_dict(self, state):
        self.step = int(state["step"])
        self.examples = int(state.get("examples", self.step * self.global_batch))
        self.clock.train_time = float(state.get("train_time_s", 0.0))
        self.stats.nonfinite.skipped = int(state.get("skipped_steps", 0))
        self.evaluation.load_state_dict(state)
        if self.elastic:
            self.elastic.reference_workers = int(state.get("reference_workers",
                                                           state.get("workers")))

    # ------------------------------------------------------------------ the loop
    def run(self):
        self.preemption.watch.install()
        result = None
        try:
            result = self._run()
            return result
        finally:
            # after a preemption stop the handlers stay: a late second signal must not turn
            # the exit that follows into a death by signal
            if result is None or result.preempted is None:
                self.preemption.watch.uninstall()

    def _run(self):
        self.backend.build()
        resumed = self.checkpoints.restore(self)
        self.echo(run_header(self))
        if self.comm.is_root:
            self._log = MetricsLog(self.out / "metrics.jsonl", append=resumed)
        wall0 = time.perf_counter()
        ending, summary = "error", None
        self.callbacks.run_begin(self)
        try:
            steps = lambda: self._steps(wall0)     # noqa: E731
            ending = self.elastic.run(self, steps) if self.elastic else steps()
            if ending not in ("preempted", "paused"):
                summary = run_summary(self, time.perf_counter() - wall0, self.tau_ref,
                                      self.hardware)
                if self.elastic:
                    summary.update(self.elastic.summary(self.cfg))
                self._log.write(summary)
        finally:
            try:     # elastic: a survivor that became rank 0 opened its own log
                self.callbacks.run_end(self, ending, summary)
            finally:
                self._log.close()
        records = self.evaluation.records
        if ending == "preempted":
            return RunResult(None, records, finished=False, preempted=self.preemption.info,
                             exit_code=self.preemption.exit_code)
        if ending == "paused":
            self.echo(f"stopped after {self.clock.session_steps} steps at step {self.step} "
                      f"of {self.total_steps}; continue with --resume")
            return RunResult(None, records, finished=False)
        self.echo(summary_table(summary))
        return RunResult(summary, records)

    def _steps(self, wall0):
        """Train until the end, the target (stop_at_target) or the session limit; returns
        "done" | "target" | "stopped" | "paused" | "preempted"."""
        if self.step >= self.total_steps and self.clock.session_steps == 0:
            # resumed at the end: a preemption abandoned the final evaluation
            return self._evaluate_and_log(wall0, "done")
        watch = self.preemption.watch
        while self.step < self.total_steps:
            span = self.batches.steps_per_epoch * self.global_batch
            epoch, within = divmod(self.examples, span)   # the batch may change (elastic)
            source = self.batches        # a callback may swap it (batch.adaptive)
            for batch in self.backend.device_batches(
                    source.epoch(epoch, within // self.global_batch)):
                self._train_one(batch)
                self.callbacks.step_end(self)
                ending = None
                if self.step >= self.total_steps:
                    ending = "done"
                elif watch.should_stop():     # agreed: the same step everywhere
                    ending = "preempted"
                if (self.eval_every and self.step % self.eval_every == 0 and
                        ending != "preempted") or ending == "done":
                    ending = self._evaluate_and_log(wall0, ending)
                if ending is None and self.stop_requested:
                    ending = "stopped"
                if ending is None and self.stop_after is not None \
                        and self.clock.session_steps >= self.stop_after:
                    ending = "paused"
                if self.checkpoints.due(self, ending):
                    self.checkpoints.save(self)
                    if ending is None and watch.agree_now()[0]:
                        ending = "preempted"   # a signal came during the save: it is the one
                if ending:
                    return ending
                if self.elastic:
                    self.elastic.after_step(self)   # may raise HostsUpdatedInterrupt
                if self.batches is not source:
                    break                # new per-rank batch: restart at the same example
        return "done"

    def _train_one(self, batch):
        """One optimizer step (statistics read every log.every_steps)."""
        lr = self.lr.schedule(self.step)
        f = self.cfg.faults
        if self.step == f.inject_nan_at_step and self.comm.rank == f.inject_nan_rank:
            batch = self.backend.poisoned(batch)
        t0 = time.perf_counter()
        self.backend.train_step(batch, lr)
        self.clock.add(time.perf_counter() - t0, step=True)
        self.step += 1
        self.stats.stepped(self)
        self.examples += self.global_batch

    def _evaluate_and_log(self, wall0, ending):
        """Evaluate, log and report; returns the step's ending: "preempted" when a signal
        abandoned the evaluation (on every rank, no record), "target" when it was reached."""
        record = self.evaluation.run(self, time.perf_counter() - wall0)
        if record is None:
            return "preempted"
        self._log.write(record)
        self.callbacks.evaluate(self, record)
        if self.cfg.train.stop_at_target and self.evaluation.tracker.reached:
            return ending or "target"
        return ending
