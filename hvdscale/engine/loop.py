"""The training loop both frameworks share.

    for each step: lr = schedule(step) -> backend.train_step(device batch)
                   -> every log.every_steps: read the step statistics (one host read)
                   -> evaluate / checkpoint when due -> stop at max steps or at the target

A step leaves its loss and non-finite flag on the device; the engine reads them at the log
interval and before every evaluation and checkpoint, so no checkpoint is written without the
steps before it having been checked. Timing covers the training steps and the statistics
reads (on a GPU the read is where the host waits for the queued steps); evaluation and
checkpoints are excluded, and the first step of a session is left out of throughput because
it carries graph tracing and allocation.
Every decision that changes control flow (stop, abort) is taken from values that are equal on
all ranks (allreduced), so ranks never disagree and hang in a collective.
"""
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hvdscale.core.metrics import TargetTracker, scaling_efficiency
from hvdscale.engine.elastic import batch_plan
from hvdscale.engine.checkpoint import CheckpointStore, CheckpointWriteError, atomic_write
from hvdscale.engine.faults import NonFiniteGuard, Watchdog
from hvdscale.engine.lr import plan_lr
from hvdscale.engine.evaluation import evaluate_interruptibly
from hvdscale.engine.preemption import PreemptionWatch
from hvdscale.engine.resume import CONFIG_KEY, check_resume
from hvdscale.engine.callbacks import CallbackList
from hvdscale.engine.tensorboard import TensorBoardCallback
from hvdscale.engine.advice import SlowSettingsCallback
from hvdscale.engine.curves import StepCurvesCallback
from hvdscale.engine.reporting import (MetricsFailureCallback, MetricsLog, NullLog,
                                       ProgressCallback, ReportCallback, summary_table)
from hvdscale.errors import ConfigError
from hvdscale.registry import OPTIMIZERS


PREEMPTED_MARKER = "preempted.json"    # OUT/preempted.json after a preemption stop


@dataclass
class RunResult:
    summary: dict                    # None when the session stopped early (stop_after)
    records: list = field(default_factory=list)
    finished: bool = True
    preempted: dict = None           # {"step", "signal", "checkpoint"} after SIGTERM/SIGUSR1
    exit_code: int = 0               # what every rank should exit with


class CheckpointError(RuntimeError):
    """A checkpoint could not be written and `checkpoint.on_error` is stop (every rank
    raises it together, after rank 0 told them)."""


def _interval(every_steps, every_epochs, steps_per_epoch):
    """An event period in steps from a steps or an epochs setting (steps win); None = never."""
    if every_steps is not None:
        return every_steps
    if every_epochs is not None:
        return max(1, int(round(every_epochs * steps_per_epoch)))
    return None


class Engine:
    """Drives one training run for any Backend (see hvdscale/engine/backend.py)."""

    def __init__(self, cfg, comm, backend, train_source, eval_source, out_dir, *, resume=False,
                 tau_ref=None, hardware="cpu", stop_after=None, requeue_exit_code=None,
                 elastic=False, sources=None, echo=print, callbacks=()):
        """elastic: run as a mode of Horovod's elastic API (hvdscale/engine/elastic.py);
        sources(cfg, rank, size) -> (train, eval) then rebuilds the data for each new world.
        callbacks: more hvdscale.engine.callbacks.Callback objects, called after the built-in
        ones (slow-setting warnings, progress, TensorBoard, training curves, report)."""
        self.cfg, self.comm, self.backend = cfg, comm, backend
        self.batches, self.eval_source = train_source, eval_source
        self.elastic, self.sources = elastic, sources
        if elastic and sources is None:
            raise ValueError("an elastic Engine needs sources(cfg, rank, size)")
        self.out = Path(out_dir)
        self.resume = resume
        self.stop_after = stop_after     # end this session after so many steps (preemption)
        # SIGTERM/SIGUSR1: agreed stop, one checkpoint, every rank exits with this code
        self.requeue_exit_code = requeue_exit_code if requeue_exit_code is not None \
            else cfg.checkpoint.requeue_exit_code
        self.preemption = PreemptionWatch(   # handlers installed while run() runs
            comm, check_seconds=cfg.faults.preemption_check_s)
        self.tau_ref = tau_ref if tau_ref is not None else cfg.train.tau_ref
        self.hardware = hardware
        self._print = echo

        b = cfg.batch
        self.per_step = b.per_worker * b.accumulation            # examples per rank per step
        self.global_batch = comm.size * self.per_step
        self.recipe_global_batch = self.global_batch   # a callback may change global_batch
        self._plan(self.global_batch, self.batches.steps_per_epoch)
        # elastic: the world the schedule is planned for, the LR factor of the current one
        self.reference_workers, self.lr_scale = comm.size, 1.0
        self.resets, self.last_commit, self._world, self._state = 0, None, None, None
        self.store = CheckpointStore(self.out / "checkpoints", keep=cfg.checkpoint.keep)
        self.tracker = TargetTracker(cfg.train.target_accuracy)
        self.records = []
        # loop position and clocks (restored on resume)
        self.step = 0
        self.examples = 0            # training examples consumed (global): the data position
        self.train_time = 0.0        # seconds inside training steps, all sessions
        self.timed_time = 0.0        # this session, first step excluded (throughput)
        self.timed_steps = 0
        self.last_accuracy = None
        # training loss over every rank since the last evaluation (agreed host values)
        self._loss_sum, self._loss_n = 0.0, 0
        self._unread = 0             # steps whose statistics are still on the device
        self.log_every = cfg.log.every_steps
        self._session_steps = 0
        self.last_checkpoint_step = None
        # non-finite loss/gradient policy: the backend decides `skip` itself from the averaged
        # gradients (equal on every rank); the engine counts it and applies `abort` when it
        # reads the statistics
        self.nonfinite = NonFiniteGuard(cfg.faults.nonfinite, comm, self.echo)
        self.watchdog = (Watchdog(cfg.faults.step_timeout_s, comm.rank)
                         if cfg.faults.step_timeout_s else None)
        builtin = [SlowSettingsCallback(), ProgressCallback(), TensorBoardCallback(),
                   StepCurvesCallback(), MetricsFailureCallback(), ReportCallback()]
        if cfg.batch.adaptive.enabled:       # grows the batch: hvdscale/engine/adaptive.py
            from hvdscale.engine.adaptive import AdaptiveBatch
            builtin.append(AdaptiveBatch(cfg, comm.size))
        self.callbacks = CallbackList([*builtin, *callbacks])
        self.stop_requested = False  # set by a callback (request_stop): end after this step

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

    # ------------------------------------------------------------------ set-up
    def _restore(self):
        """Load the newest checkpoint (rank 0 reads, every rank gets the same bytes; elastic:
        every rank reads it, as no collective may run before Horovod's elastic sync, which
        then gives every rank, newcomers included, rank 0's state anyway)."""
        found = None
        if self.comm.is_root or self.elastic:
            # an unreadable checkpoint is sent to every rank as its message, so that all
            # ranks refuse it together instead of the others waiting in the broadcast
            try:
                hit = self.store.latest()
                if hit is not None:
                    meta, path = hit
                    found = (meta, path.read_bytes())
            except (ConfigError, OSError) as err:
                found = ("error", str(err))
        if not self.elastic:
            found = self.comm.broadcast_object(found)
        if found is not None and found[0] == "error":
            raise ConfigError(found[1], setting="checkpoint")
        if found is None:
            self.echo(f"resume: no checkpoint in {self.store.dir}, starting from step 0")
            return False
        meta, data = found
        if meta.get("framework") != self.backend.framework:
            raise ConfigError(f"checkpoint step {meta['step']} was written by "
                              f"{meta.get('framework')}, this run is {self.backend.framework}",
                              setting="checkpoint")
        if self.elastic:         # the world may differ; the per-rank recipe batch may not
            per_step = meta.get("recipe_per_rank_batch")
            if per_step is not None and per_step != self.per_step:
                raise ConfigError(f"checkpoint step {meta['step']} has "
                                  f"{per_step} examples per rank and step in its recipe, "
                                  f"this run {self.per_step}", setting="checkpoint")
            self.reference_workers = int(meta.get("reference_workers", meta["workers"]))
        elif meta.get("recipe_global_batch", meta.get("global_batch")) != \
                self.recipe_global_batch or meta.get("steps_per_epoch") != self.steps_per_epoch:
            raise ConfigError(f"checkpoint has global batch "
                              f"{meta.get('recipe_global_batch', meta.get('global_batch'))} "
                              f"and {meta.get('steps_per_epoch')} steps/epoch, this run "
                              f"{self.recipe_global_batch} and {self.steps_per_epoch}",
                              setting="checkpoint")
        changed = check_resume(meta, self.cfg.to_dict())     # refuses what cannot change
        try:
            self.backend.load_state_bytes(data)
            self.backend.apply_optimizer_settings()   # the recipe's, not the state dict's
        except ConfigError as err:
            raise ConfigError(f"{self.store.dir / meta['state_file']}: {err}",
                              setting="checkpoint") from None
        self.step = int(meta["step"])
        self.examples = int(meta.get("examples", self.step * self.global_batch))
        self.train_time = float(meta.get("train_time_s", 0.0))
        self.tracker.load_state_dict(meta.get("tracker", {}))
        self.last_accuracy = meta.get("last_accuracy")
        self.nonfinite.skipped = int(meta.get("skipped_steps", 0))
        self.callbacks.load_state_dict(meta.get("callbacks", {}))
        self.last_checkpoint_step = self.step
        self.echo(f"resumed from {self.store.dir / meta['state_file']} at step {self.step}")
        if changed:
            self.echo(changed)
        return True

    def describe(self):
        c, k = self.cfg, self.comm.size
        opt = c.optimizer
        optimizer = OPTIMIZERS.get(opt.name).summary(opt.options())
        flags = [f for f, on in (("fp16 compression", c.horovod.fp16_compression),
                                 ("adasum", c.horovod.adasum)) if on]
        return "\n".join([
            f"hvdscale train {c.name}: {c.framework}, {k} worker{'s' * (k > 1)} "
            f"({self.comm.controller}), model {c.model.name}, data {c.data.kind} "
            f"({self.batches.num_examples} train / {self.eval_source.num_examples} test)",
            f"  global batch {self.global_batch} = {k} workers x {c.batch.per_worker} x "
            f"{c.batch.accumulation} accumulation (reference batch {c.batch.reference})",
            f"  lr: base {self.lr.base_lr:g} -> scaled {self.lr.peak_lr:.6g}; {self.lr.description}",
            f"  optimizer {optimizer}"
            + (f"; horovod: {', '.join(flags)}" if flags else ""),
            f"  steps {self.total_steps} ({self.steps_per_epoch}/epoch), eval every "
            f"{self.eval_every or 'end'} steps, target accuracy {c.train.target_accuracy}",
        ])

    # ------------------------------------------------------------------ the loop
    def run(self):
        self.preemption.install()
        result = None
        try:
            result = self._run()
            return result
        finally:
            # after a preemption stop the handlers stay: a late second signal must not turn
            # the exit that follows into a death by signal
            if result is None or result.preempted is None:
                self.preemption.uninstall()

    def _run(self):
        self.backend.elastic = self.elastic     # elastic: build() runs no collective
        self.backend.build()
        resumed = self._restore() if self.resume else False
        self.echo(self.describe())
        root = self.comm.is_root
        if root:     # a marker of an earlier preempted session is history now
            try:
                (self.out / PREEMPTED_MARKER).unlink(missing_ok=True)
            except OSError:
                pass
        self._log = MetricsLog(self.out / "metrics.jsonl", append=resumed) if root else NullLog()
        wall0 = time.perf_counter()
        ending, summary = "error", None
        self.callbacks.run_begin(self)
        try:
            if self.elastic:
                ending = self._elastic_steps(wall0)
            else:
                ending = self._steps(wall0)
        finally:
            if self.watchdog is not None:
                self.watchdog.stop()
            if ending in ("preempted", "paused", "error"):
                self.callbacks.run_end(self, ending, None)
        log = self._log      # elastic: a survivor that became rank 0 opened its own
        if ending == "preempted":
            result = self._preempted(log)
            log.close()
            return result
        if ending == "paused":
            log.close()
            self.echo(f"stopped after {self._session_steps} steps at step {self.step} of "
                      f"{self.total_steps}; continue with --resume")
            return RunResult(None, self.records, finished=False)
        summary = self._summary(time.perf_counter() - wall0)
        if self.elastic:
            summary.update(elastic=True, policy=self.cfg.elastic.policy, resets=self.resets,
                           reference_workers=self.reference_workers)
        log.write(summary)
        log.close()
        self.callbacks.run_end(self, ending, summary)
        self.echo(summary_table(summary))
        return RunResult(summary, self.records)

    def _steps(self, wall0):
        """Train until the end, the target (stop_at_target) or the session limit; returns
        "done" | "target" | "paused" | "preempted"."""
        if self.step >= self.total_steps and self._session_steps == 0:
            # resumed at the end: a preemption abandoned the final evaluation
            return self._evaluate_and_log(wall0, "done")
        while self.step < self.total_steps:
            epoch, start = self._position()
            source = self.batches        # a callback may swap it (batch.adaptive)
            for batch in self.backend.device_batches(self.batches.epoch(epoch, start)):
                self._train_one(batch)
                self.examples += self.global_batch
                self.callbacks.step_end(self)
                ending = None
                if self.step >= self.total_steps:
                    ending = "done"
                elif self.preemption.should_stop():     # agreed: the same step everywhere
                    ending = "preempted"
                if (self.eval_every and self.step % self.eval_every == 0 and
                        ending != "preempted") or ending == "done":
                    ending = self._evaluate_and_log(wall0, ending)
                if ending is None and self.stop_requested:
                    ending = "stopped"
                if ending is None and self.stop_after is not None \
                        and self._session_steps >= self.stop_after:
                    ending = "paused"
                if (ending or (self.ckpt_every and self.step % self.ckpt_every == 0)) \
                        and self.last_checkpoint_step != self.step:
                    self._checkpoint()
                    if ending is None and self.preemption.agree_now()[0]:
                        ending = "preempted"   # a signal came during the save: it is the one
                if self.watchdog is not None:    # step, evaluation and checkpoint all done
                    self.watchdog.beat(self.step)
                if ending:
                    return ending
                if self.elastic and self.step % self.cfg.elastic.commit_every == 0:
                    self._commit()       # may raise HostsUpdatedInterrupt (Horovod resets)
                if self.batches is not source:
                    break                # new per-rank batch: restart at the same example
        return "done"

    def _position(self):
        """(epoch, first batch) of the next step, from the examples consumed so far (in an
        elastic run the global batch, and so the batches per epoch, change with the world)."""
        span = self.batches.steps_per_epoch * self.global_batch
        epoch, within = divmod(self.examples, span)
        return epoch, within // self.global_batch

    def _train_one(self, batch):
        """One optimizer step (statistics read every log.every_steps)."""
        lr = self.lr.schedule(self.step)
        f = self.cfg.faults
        if self.step == f.inject_nan_at_step and self.comm.rank == f.inject_nan_rank:
            batch = self.backend.poisoned(batch)
        t0 = time.perf_counter()
        self.backend.train_step(batch, lr)
        self._clock(time.perf_counter() - t0, step=True)
        self._session_steps += 1
        self.step += 1
        self._unread += 1
        if self.step % self.log_every == 0:
            self._collect_stats()

    def _clock(self, elapsed, step=False):
        self.train_time += elapsed
        if self._session_steps > 0:      # the session's first step is warm-up: not timed
            self.timed_time += elapsed
            self.timed_steps += step

    def _collect_stats(self):
        """Read the statistics of the steps since the last read (the one host read), sum the
        loss over the ranks and agree on non-finite steps (one small allreduce; a second only
        when some rank saw one) and apply the policy: abort raises NonFiniteLossError naming
        the first bad step, skip counts and reports. Callbacks get the rank's stats plus
        `loss_sum_all` / `examples_all` over every rank."""
        if self._unread == 0:
            return
        t0 = time.perf_counter()
        stats = self.backend.read_stats()
        self._clock(time.perf_counter() - t0)
        first_step = self.step - self._unread
        self._unread = 0
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
        self.callbacks.stats(self, dict(stats, loss_sum_all=float(loss_all),
                                        examples_all=int(examples_all)))

    def _evaluate_and_log(self, wall0, ending):
        """Evaluate, log and report; returns the step's ending: "preempted" when a signal
        abandoned the evaluation (on every rank, no record), "target" when it was reached."""
        record = self._evaluate(time.perf_counter() - wall0)
        if record is None:
            return "preempted"
        self._log.write(record)
        self.callbacks.evaluate(self, record)
        if self.cfg.train.stop_at_target and self.tracker.reached:
            return ending or "target"
        return ending

    def _evaluate(self, wall):
        self._collect_stats()
        self.backend.sync_statistics()
        sums = evaluate_interruptibly(self.backend, self.eval_source.batches(), self.preemption)
        if sums is None:           # no record for a partial evaluation
            return None
        correct, count, loss_sum = sums
        totals = self.comm.allreduce(np.array([correct, count], dtype=np.int64), op="sum")
        loss_total = self.comm.allreduce(float(loss_sum), op="sum")
        train_loss = self._loss_sum / self._loss_n if self._loss_n else float("nan")
        self._loss_sum, self._loss_n = 0.0, 0
        accuracy = float(totals[0]) / max(1, int(totals[1]))
        self.last_accuracy = accuracy
        epoch = self.examples / self.epoch_examples     # the batch may have changed
        self.tracker.observe(self.step, accuracy, self.train_time, epoch=epoch)
        ips = self._images_per_sec()
        record = {
            "step": self.step, "epoch": round(epoch, 4), "framework": self.backend.framework,
            "workers": self.comm.size, "global_batch": self.global_batch,
            "lr": self.lr.schedule(self.step - 1), "train_loss": train_loss,
            "test_loss": loss_total / max(1, int(totals[1])), "test_accuracy": accuracy,
            "test_examples": int(totals[1]), "images_per_sec": ips,
            "elapsed_s": self.train_time, "wall_s": wall,
            "skipped_steps": self.nonfinite.skipped,
        }
        extra = getattr(self.backend, "extra_metrics", None)
        if extra is not None:      # e.g. the online noise scale (b_simple, gns_*)
            record.update(extra())
        self.records.append(record)
        return record

    def _images_per_sec(self):
        if self.timed_steps > 0 and self.timed_time > 0:
            return self.timed_steps * self.global_batch / self.timed_time
        if self.train_time > 0:
            return self._session_steps * self.global_batch / self.train_time
        return 0.0

    def _checkpoint(self):
        """Rank 0 writes the checkpoint and tells every rank how it went (one broadcast), so
        a write that fails (disk full, read-only) stops every rank together
        (`checkpoint.on_error: stop`) or none of them (`warn`). Returns True when written."""
        self._collect_stats()      # never save a step whose non-finite flag is unread
        self.backend.sync_statistics()
        failure = self._write_checkpoint() if self.comm.is_root else None
        failure = self.comm.broadcast_object(failure)
        if failure is None:
            self.last_checkpoint_step = self.step
            self.callbacks.checkpoint(self, self.step)
            return True
        if self.cfg.checkpoint.on_error == "stop":
            raise CheckpointError(f"{failure} (checkpoint.on_error = stop)")
        self.echo(f"warning: {failure}; training goes on (checkpoint.on_error = warn)")
        return False

    def _write_checkpoint(self):
        """Rank 0: write one checkpoint; returns None, or the one-line reason it failed."""
        data = self.backend.state_bytes()
        meta = {
            "framework": self.backend.framework, "workers": self.comm.size,
            "global_batch": self.global_batch, "steps_per_epoch": self.steps_per_epoch,
            "recipe_global_batch": self.recipe_global_batch,
            "epoch": self.step // self.steps_per_epoch,
            "step_in_epoch": self.step % self.steps_per_epoch,
            "train_time_s": self.train_time, "last_accuracy": self.last_accuracy,
            "seed": self.cfg.train.seed, "recipe": self.cfg.name, "examples": self.examples,
            "reference_workers": self.reference_workers,
            "recipe_per_rank_batch": self.cfg.batch.per_worker * self.cfg.batch.accumulation,
            "skipped_steps": self.nonfinite.skipped,
            "callbacks": self.callbacks.state_dict(), CONFIG_KEY: self.cfg.to_dict(),
            "tracker": self.tracker.state_dict(),
        }
        try:
            self.store.save(self.step, data, self.backend.checkpoint_suffix, meta)
        except CheckpointWriteError as err:
            return str(err)
        return None

    def _preempted(self, log):
        """After the agreed stop and its checkpoint: the marker file, the event and the exit
        code (0, or checkpoint.requeue_exit_code / HVDSCALE_REQUEUE_EXIT_CODE)."""
        watch = self.preemption
        watch.settle()
        saved = self.last_checkpoint_step == self.step
        code = self.requeue_exit_code or 0
        info = {"event": "preempted", "step": self.step, "signal": watch.signal_name or "peer",
                "checkpoint": f"step-{self.step:08d}" if saved else None,
                "exit_code": code, "workers": self.comm.size}
        log.write(info)
        if self.comm.is_root:
            try:     # what a requeueing batch script can test (horovodrun hides exit codes)
                atomic_write(self.out / PREEMPTED_MARKER,
                             (json.dumps(info, sort_keys=True) + "\n").encode())
            except OSError as err:
                self.echo(f"warning: cannot write {self.out / PREEMPTED_MARKER}: {err}")
        took = (f" {watch.clock() - watch.received_at:.1f} s after the signal"
                if watch.received else "")
        what = f"checkpoint step-{self.step:08d} written{took}" if saved else \
            "no checkpoint could be written"
        self.echo(f"preempted ({watch.describe()}) at step {self.step} of {self.total_steps}: "
                  f"{what}; exit {code}; continue with --resume")
        return RunResult(None, self.records, finished=False, preempted=info, exit_code=code)

    # ------------------------------------------------------------------ elastic mode
    def _elastic_steps(self, wall0):
        """The same loop under Horovod's elastic API: the backend's State carries model,
        optimizer and the loop position; after a lost worker it is restored to its last
        commit, after a host change it is synchronised from rank 0, and `_steps` goes on."""
        state = self.backend.elastic_state(loop=self._loop_fields())
        state.register_reset_callbacks([self._after_reset])
        self._state = state

        def session(state):
            self._enter_world(state.loop)
            return self._steps(wall0)
        return self.backend.elastic_run(session)(state)

    def _loop_fields(self):
        return {"step": self.step, "examples": self.examples, "train_time": self.train_time,
                "skipped": self.nonfinite.skipped, "reference_workers": self.reference_workers,
                "last_accuracy": self.last_accuracy,
                "tracker": self.tracker.state_dict(), "callbacks": self.callbacks.state_dict()}

    def _enter_world(self, loop):
        """(Re)start on the world Horovod has now: the loop position from the committed state
        (rank 0's), the batch policy for this size, this rank's data, and the LR plan of the
        reference world (scaled by the policy's factor)."""
        self.comm.refresh()
        self.step, self.examples = loop["step"], loop["examples"]
        self.train_time, self.nonfinite.skipped = loop["train_time"], loop["skipped"]
        self.reference_workers = loop["reference_workers"]
        self.last_accuracy = loop["last_accuracy"]
        self.tracker.load_state_dict(loop["tracker"])
        cfg, b, k = self.cfg, self.cfg.batch, self.comm.size
        accumulation, self.global_batch, self.lr_scale = batch_plan(
            cfg.elastic.policy, self.reference_workers, k, b.per_worker, b.accumulation,
            b.reference, cfg.lr.scaling)
        self.per_step = b.per_worker * accumulation
        self.backend.set_accumulation(accumulation)
        sized = dataclasses.replace(cfg, batch=dataclasses.replace(b, accumulation=accumulation))
        self.batches, self.eval_source = self.sources(sized, self.comm.rank, k)
        reference_global = self.reference_workers * b.per_worker * b.accumulation
        self._plan(reference_global, max(1, self.batches.num_examples // reference_global))
        if self.lr_scale != 1.0:
            base, scale = self.lr.schedule, self.lr_scale
            self.lr = dataclasses.replace(self.lr, schedule=lambda step: base(step) * scale)
        if self.comm.is_root and isinstance(self._log, NullLog):   # rank 0 was lost
            self._log = MetricsLog(self.out / "metrics.jsonl", append=True)
        self.callbacks.load_state_dict(loop.get("callbacks", {}))   # the committed state
        self.callbacks.world(self)       # e.g. batch.adaptive puts back its decided batch
        accumulation = self.per_step // b.per_worker
        if k != self._world:
            self._log.write({"event": "workers", "step": self.step, "workers": k,
                             "policy": cfg.elastic.policy, "global_batch": self.global_batch,
                             "per_rank_batch": self.per_step, "accumulation": accumulation,
                             "lr_scale": self.lr_scale, "resets": self.resets,
                             "last_commit": self.last_commit})
            self.echo(f"elastic: step {self.step}: {k} worker(s), {cfg.elastic.policy}: "
                      f"global batch {self.global_batch} = {k} x {b.per_worker} x "
                      f"{accumulation}, lr x{self.lr_scale:.4g}")
            self._world = k

    def _after_reset(self):
        """Horovod was re-initialised (a worker lost or hosts changed)."""
        self.resets += 1
        self.comm.refresh()
        self.preemption.forget_pending()
        self._unread = 0
        self.backend.read_stats()       # statistics of steps that were rolled back

    def _commit(self):
        """Elastic: keep model, optimizer and loop position in memory (the point a lost
        worker rolls back to); rank 0 writes the step to OUT/last_commit for operators; then
        Horovod raises HostsUpdatedInterrupt here if hosts were added or removed."""
        self._collect_stats()      # never commit a step whose non-finite flag is unread
        self._state.loop = self._loop_fields()
        self._state.save()
        self.last_commit = self.step
        if self.comm.is_root:
            try:
                atomic_write(self.out / "last_commit", f"{self.step}\n".encode())
            except OSError:
                pass
        self._state.check_host_updates()

    def _summary(self, wall):
        k = self.comm.size
        ips = self._images_per_sec()
        # tau_ref is one worker's images/s at the same per-worker batch
        eff = scaling_efficiency(ips, self.tau_ref, k) if self.tau_ref else None
        time_per_step = (self.timed_time / self.timed_steps if self.timed_steps
                         else self.train_time / max(1, self._session_steps))
        return {
            "event": "summary", "recipe": self.cfg.name, "framework": self.backend.framework,
            "hardware": self.hardware, "model": self.cfg.model.name,
            "optimizer": self.backend.optimizer_name, "workers": k,
            "global_batch": self.global_batch, "per_worker_batch": self.cfg.batch.per_worker,
            "accumulation": self.per_step // self.cfg.batch.per_worker, "steps": self.step,
            "epochs": round(self.examples / self.epoch_examples, 4),
            "base_lr": self.lr.base_lr, "peak_lr": self.lr.peak_lr,
            "warmup_steps": self.lr.warmup_steps,
            "final_test_accuracy": self.last_accuracy, "best_test_accuracy": self.tracker.best,
            "target_accuracy": self.tracker.target,
            "steps_to_target": self.tracker.steps_to_target,
            "time_to_target_s": self.tracker.time_to_target,
            "epochs_to_target": self.tracker.epochs_to_target,
            "images_per_sec": ips, "images_per_sec_per_worker": ips / k,
            "time_per_step_s": time_per_step, "train_time_s": self.train_time, "wall_s": wall,
            "tau_ref": self.tau_ref, "scaling_efficiency": eff,
            "skipped_steps": self.nonfinite.skipped,
        }
