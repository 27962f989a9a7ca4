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
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hvdscale.core.metrics import TargetTracker, scaling_efficiency
from hvdscale.engine.checkpoint import CheckpointStore
from hvdscale.engine.faults import NonFiniteGuard, Watchdog
from hvdscale.engine.lr import plan_lr
from hvdscale.engine.tensorboard import open_writer
from hvdscale.engine.reporting import MetricsLog, NullLog, Progress, summary_table
from hvdscale.errors import ConfigError
from hvdscale.registry import OPTIMIZERS


@dataclass
class RunResult:
    summary: dict                    # None when the session stopped early (stop_after)
    records: list = field(default_factory=list)
    finished: bool = True


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
                 tau_ref=None, hardware="cpu", stop_after=None, echo=print):
        self.cfg, self.comm, self.backend = cfg, comm, backend
        self.batches, self.eval_source = train_source, eval_source
        self.out = Path(out_dir)
        self.resume = resume
        self.stop_after = stop_after     # end this session after so many steps (preemption)
        self.tau_ref = tau_ref if tau_ref is not None else cfg.train.tau_ref
        self.hardware = hardware
        self.echo = echo if comm.is_root else (lambda *a, **k: None)

        b = cfg.batch
        self.per_step = b.per_worker * b.accumulation            # examples per rank per step
        self.global_batch = comm.size * self.per_step
        self.steps_per_epoch = self.batches.steps_per_epoch
        total = int(round(cfg.train.epochs * self.steps_per_epoch))
        if cfg.train.max_steps is not None:
            total = min(total, cfg.train.max_steps)
        self.total_steps = max(1, total)
        self.lr = plan_lr(cfg, self.global_batch, self.steps_per_epoch, self.total_steps)
        if self.lr.warmup_steps >= self.total_steps:
            raise ConfigError(f"warm-up ({self.lr.warmup_steps} steps) is not shorter than "
                              f"training ({self.total_steps} steps of global batch "
                              f"{self.global_batch})")
        self.eval_every = _interval(cfg.train.eval_every_steps, cfg.train.eval_every_epochs,
                                    self.steps_per_epoch)
        self.ckpt_every = _interval(cfg.checkpoint.every_steps, cfg.checkpoint.every_epochs,
                                    self.steps_per_epoch)
        self.store = CheckpointStore(self.out / "checkpoints", keep=cfg.checkpoint.keep)
        self.tracker = TargetTracker(cfg.train.target_accuracy)
        self.records = []
        # loop position and clocks (restored on resume)
        self.step = 0
        self.train_time = 0.0        # seconds inside training steps, all sessions
        self.timed_time = 0.0        # this session, first step excluded (throughput)
        self.timed_steps = 0
        self.last_accuracy = None
        self._loss_sum, self._loss_n = 0.0, 0     # since the last evaluation (host values)
        self._unread = 0             # steps whose statistics are still on the device
        self._shown_loss = None      # mean loss of the last read (progress bar)
        self.log_every = cfg.log.every_steps
        self._session_steps = 0
        self.last_checkpoint_step = None
        # non-finite loss/gradient policy: the backend decides `skip` itself from the averaged
        # gradients (equal on every rank); the engine counts it and applies `abort` when it
        # reads the statistics
        self.nonfinite = NonFiniteGuard(cfg.faults.nonfinite, comm, self.echo)
        self.watchdog = (Watchdog(cfg.faults.step_timeout_s, comm.rank)
                         if cfg.faults.step_timeout_s else None)

    # ------------------------------------------------------------------ set-up
    def _restore(self):
        """Load the newest checkpoint (rank 0 reads, every rank gets the same bytes)."""
        found = None
        if self.comm.is_root:
            # an unreadable checkpoint is sent to every rank as its message, so that all
            # ranks refuse it together instead of the others waiting in the broadcast
            try:
                hit = self.store.latest()
                if hit is not None:
                    meta, path = hit
                    found = (meta, path.read_bytes())
            except (ConfigError, OSError) as err:
                found = ("error", str(err))
        found = self.comm.broadcast_object(found)
        if found is not None and found[0] == "error":
            raise ConfigError(found[1])
        if found is None:
            self.echo(f"--resume: no checkpoint in {self.store.dir}, starting from step 0")
            return False
        meta, data = found
        if meta.get("framework") != self.backend.framework:
            raise ConfigError(f"--resume: checkpoint step {meta['step']} was written by "
                              f"{meta.get('framework')}, this run is {self.backend.framework}")
        if meta.get("global_batch") != self.global_batch or \
                meta.get("steps_per_epoch") != self.steps_per_epoch:
            raise ConfigError(f"--resume: checkpoint has global batch {meta.get('global_batch')} "
                              f"and {meta.get('steps_per_epoch')} steps/epoch, this run "
                              f"{self.global_batch} and {self.steps_per_epoch}")
        try:
            self.backend.load_state_bytes(data)
        except ConfigError as err:
            raise ConfigError(f"{self.store.dir / meta['state_file']}: {err}") from None
        self.step = int(meta["step"])
        self.train_time = float(meta.get("train_time_s", 0.0))
        t = meta.get("tracker", {})
        self.tracker.best = t.get("best")
        self.tracker.steps_to_target = t.get("steps_to_target")
        self.tracker.time_to_target = t.get("time_to_target_s")
        self.tracker.epochs_to_target = t.get("epochs_to_target")
        self.last_accuracy = meta.get("last_accuracy")
        self.nonfinite.skipped = int(meta.get("skipped_steps", 0))
        self.last_checkpoint_step = self.step
        self.echo(f"resumed from {self.store.dir / meta['state_file']} at step {self.step}")
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
        self.backend.build()
        resumed = self._restore() if self.resume else False
        self.echo(self.describe())
        root = self.comm.is_root
        log = MetricsLog(self.out / "metrics.jsonl", append=resumed) if root else NullLog()
        writer = open_writer(self.out / "tensorboard") \
            if root and self.cfg.log.tensorboard else None
        bar = Progress(self.total_steps, self.step, root and self.cfg.log.progress)
        wall0 = time.perf_counter()
        try:
            ending = self._steps(log, writer, bar, wall0)
        finally:
            if self.watchdog is not None:
                self.watchdog.stop()
            bar.close()
            if writer is not None:
                writer.close()
        if ending == "paused":
            log.close()
            self.echo(f"stopped after {self._session_steps} steps at step {self.step} of "
                      f"{self.total_steps}; continue with --resume")
            return RunResult(None, self.records, finished=False)
        summary = self._summary(time.perf_counter() - wall0)
        log.write(summary)
        log.close()
        self.echo(summary_table(summary))
        return RunResult(summary, self.records)

    def _steps(self, log, writer, bar, wall0):
        """Train until the end, the target (stop_at_target) or the session limit; returns
        "done" | "target" | "paused"."""
        while self.step < self.total_steps:
            epoch, start = divmod(self.step, self.steps_per_epoch)
            for batch in self.backend.device_batches(self.batches.epoch(epoch, start)):
                loss = self._train_one(batch)
                bar.update(loss, self.lr.schedule(self.step - 1))
                ending = None
                if self.step >= self.total_steps:
                    ending = "done"
                if (self.eval_every and self.step % self.eval_every == 0) or ending:
                    record = self._evaluate(time.perf_counter() - wall0)
                    log.write(record)
                    if writer is not None:
                        for tag in ("train_loss", "test_accuracy", "test_loss", "lr",
                                    "images_per_sec"):
                            if record.get(tag) is not None:
                                writer.scalar(tag, record[tag], self.step)
                    bar.note(f"step {self.step}: test accuracy {record['test_accuracy']:.4f}, "
                             f"train loss {record['train_loss']:.4f}")
                    if self.cfg.train.stop_at_target and self.tracker.reached:
                        ending = ending or "target"
                if ending is None and self.stop_after is not None \
                        and self._session_steps >= self.stop_after:
                    ending = "paused"
                if ending or (self.ckpt_every and self.step % self.ckpt_every == 0):
                    self._checkpoint()
                if self.watchdog is not None:    # step, evaluation and checkpoint all done
                    self.watchdog.beat(self.step)
                if ending:
                    return ending
        return "done"

    def _train_one(self, batch):
        """One step; returns the mean loss of the last statistics read (None before one)."""
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
        return self._shown_loss

    def _clock(self, elapsed, step=False):
        self.train_time += elapsed
        if self._session_steps > 0:      # the session's first step is warm-up: not timed
            self.timed_time += elapsed
            self.timed_steps += step

    def _collect_stats(self):
        """Read the statistics of the steps since the last read (the one host read), agree
        on non-finite steps across ranks (one small allreduce) and apply the policy: abort
        raises NonFiniteLossError naming the first bad step, skip counts and reports."""
        if self._unread == 0:
            return
        t0 = time.perf_counter()
        stats = self.backend.read_stats()
        self._clock(time.perf_counter() - t0)
        first_step = self.step - self._unread
        self._unread = 0
        if stats["examples"]:
            self._loss_sum += stats["loss_sum"]
            self._loss_n += stats["examples"]
            self._shown_loss = stats["loss_sum"] / stats["examples"]
        first = stats["first_nonfinite_step"]
        # max of (count, -first step): agreed count, earliest bad step over the ranks
        count, neg_first = self.comm.allreduce(
            np.array([stats["nonfinite_steps"], -(first if first is not None else 2 ** 40)],
                     dtype=np.int64), op="max")
        if count:
            self.nonfinite.account(first_step + int(-neg_first), int(count))

    def _evaluate(self, wall):
        self._collect_stats()
        self.backend.sync_statistics()
        correct, count, loss_sum = self.backend.evaluate(self.eval_source.batches())
        totals = self.comm.allreduce(np.array([correct, count], dtype=np.int64), op="sum")
        loss_total = self.comm.allreduce(float(loss_sum), op="sum")
        sums = self.comm.allreduce(np.array([self._loss_sum, self._loss_n], dtype=np.float64),
                                   op="sum")
        train_loss = float(sums[0] / sums[1]) if sums[1] else float("nan")
        self._loss_sum, self._loss_n = 0.0, 0
        accuracy = float(totals[0]) / max(1, int(totals[1]))
        self.last_accuracy = accuracy
        epoch = self.step / self.steps_per_epoch
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
        self._collect_stats()      # never save a step whose non-finite flag is unread
        self.backend.sync_statistics()
        data = self.backend.state_bytes()
        self.last_checkpoint_step = self.step
        if not self.comm.is_root:
            return
        meta = {
            "framework": self.backend.framework, "workers": self.comm.size,
            "global_batch": self.global_batch, "steps_per_epoch": self.steps_per_epoch,
            "epoch": self.step // self.steps_per_epoch,
            "step_in_epoch": self.step % self.steps_per_epoch,
            "train_time_s": self.train_time, "last_accuracy": self.last_accuracy,
            "seed": self.cfg.train.seed, "recipe": self.cfg.name,
            "skipped_steps": self.nonfinite.skipped,
            "tracker": {"best": self.tracker.best, "steps_to_target": self.tracker.steps_to_target,
                        "time_to_target_s": self.tracker.time_to_target,
                        "epochs_to_target": self.tracker.epochs_to_target},
        }
        self.store.save(self.step, data, self.backend.checkpoint_suffix, meta)

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
            "accumulation": self.cfg.batch.accumulation, "steps": self.step,
            "epochs": round(self.step / self.steps_per_epoch, 4),
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
