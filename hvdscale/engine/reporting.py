"""What a run tells the user: metrics.jsonl, TensorBoard scalars, the progress bar and the final
summary table. Everything here is active on rank 0 only; other ranks get silent stand-ins."""
import errno
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, Union

from hvdscale.engine.callbacks import Callback


class MetricsLog:
    """OUT/metrics.jsonl: one JSON object per line. Each line goes to the file in one
    os.write on an O_APPEND descriptor, so a reader (or a crash) never sees half a line; a
    write cut short (full disk) is cut back to the last whole line.

    A write that fails does not raise: the first failure is kept in `error` (one line naming
    the file) and later records are still tried (the disk may have room again). The engine's
    MetricsFailureCallback turns it into the run's ending (checkpoint.on_error)."""

    def __init__(self, path: Union[str, Path], append: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (0 if append else os.O_TRUNC)
        self._fd: Optional[int] = os.open(self.path, flags, 0o644)
        self.error: Optional[str] = None
        self.lost = 0           # records that could not be written

    def write(self, record: Dict[str, Any]) -> bool:
        """Append one record; returns False when it could not be written."""
        line = (json.dumps(_jsonable(record)) + "\n").encode()
        if self._fd is None:
            return False
        start = None
        try:
            start = os.fstat(self._fd).st_size
            written = os.write(self._fd, line)
            if written != len(line):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return True
        except OSError as err:
            if start is not None:
                try:       # no partial line stays behind
                    os.ftruncate(self._fd, start)
                except OSError:
                    pass
            self.lost += 1
            if self.error is None:
                self.error = (f"cannot write {self.path}: {err.strerror or err} "
                              f"[errno {err.errno}]")
            return False

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _jsonable(record):
    """NaN/inf are not JSON: write them as null."""
    out = {}
    for key, value in record.items():
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        out[key] = value
    return out


class NullLog:
    error = None

    def write(self, record):
        return True

    def close(self):
        pass


class Progress:
    """A tqdm bar over the training steps, or nothing when disabled or tqdm is missing."""

    def __init__(self, total: int, initial: int, enabled: bool, stream=None):
        self._bar = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                             file=stream or sys.stderr, leave=False)

    def set_total(self, total: int) -> None:
        """The run's length changed (batch.adaptive takes fewer, larger steps)."""
        if self._bar is not None and self._bar.total != total:
            self._bar.total = total

    def update(self, loss: Optional[float], lr: float) -> None:
        if self._bar is not None:
            self._bar.update(1)
            # loss: the mean of the last statistics read (None before the first one)
            shown = {"loss": f"{loss:.4f}"} if loss is not None else {}
            self._bar.set_postfix(**shown, lr=f"{lr:.3g}", refresh=False)

    def note(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)

    def close(self):
        if self._bar is not None:
            self._bar.close()


def _clock(seconds: float) -> str:
    """H:MM:SS (or M:SS under an hour) for elapsed time and ETA."""
    seconds = int(round(max(0.0, seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class ProgressLines:
    """Progress for a log file: one plain line whenever `every_s` seconds or `every_percent`
    of the run have passed since the last one. Under horovodrun, mpirun or srun every write
    to a rank's stderr becomes a line of the job's log, so a redrawn bar would add hundreds."""

    def __init__(self, stream, total: int, initial: int, every_s: float, every_percent: float,
                 clock=time.monotonic):
        self.stream, self.total, self.clock = stream, total, clock
        self.every_s, self.every_steps = every_s, max(1, int(total * every_percent / 100))
        self._start_step, self._start_time = initial, clock()
        self._last_step, self._last_time = initial, self._start_time
        self._last_timed = (0, 0.0)     # (timed steps, timed seconds) at the last line

    def due(self, step: int) -> bool:
        return (step - self._last_step >= self.every_steps or
                self.clock() - self._last_time >= self.every_s)

    def line(self, step: int, epoch: float, loss: Optional[float], lr: float,
             images_per_sec: Optional[float]) -> str:
        now = self.clock()
        elapsed = now - self._start_time
        done = step - self._start_step
        eta = (self.total - step) * elapsed / done if done > 0 else None
        parts = [f"step {step}/{self.total} ({100 * step / self.total:.0f}%)",
                 f"epoch {epoch:.2f}"]
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        parts.append(f"lr {lr:.3g}")
        if images_per_sec is not None:
            parts.append(f"{images_per_sec:,.0f} img/s")
        parts.append(f"elapsed {_clock(elapsed)}")
        parts.append(f"ETA {_clock(eta)}" if eta is not None else "ETA -")
        self._last_step, self._last_time = step, now
        return "  ".join(parts)

    def write(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def window_rate(self, timed_steps: int, timed_time: float, global_batch: int):
        """Training images/s since the last line (evaluation and checkpoints excluded)."""
        steps = timed_steps - self._last_timed[0]
        seconds = timed_time - self._last_timed[1]
        self._last_timed = (timed_steps, timed_time)
        return steps * global_batch / seconds if steps > 0 and seconds > 0 else None


class ProgressCallback(Callback):
    """Progress of the run on rank 0 (`log.progress`): an animated bar where stderr is a
    terminal, plain lines every `log.progress_every_s` seconds or `log.progress_every_percent`
    of the run elsewhere; the loss shown is rank 0's mean over the last statistics read, and
    each evaluation gets a line."""

    def __init__(self, stream=None):
        self._stream = stream            # None: sys.stderr, looked up when the run begins
        self._bar, self._lines, self._loss = None, None, None

    def on_run_begin(self, engine):
        if not (engine.comm.is_root and engine.cfg.log.progress):
            self._bar = Progress(engine.total_steps, engine.step, False)
            return
        stream = self._stream or sys.stderr
        if _is_terminal(stream):
            self._bar = Progress(engine.total_steps, engine.step, True, stream)
        else:
            log = engine.cfg.log
            self._lines = ProgressLines(stream, engine.total_steps, engine.step,
                                        log.progress_every_s, log.progress_every_percent)

    def on_stats(self, engine, stats):
        if stats["examples"]:
            self._loss = stats["loss_sum"] / stats["examples"]

    def on_step_end(self, engine):
        lr = engine.lr.schedule(engine.step - 1)
        if self._lines is not None:
            self._lines.total = engine.total_steps     # batch.adaptive may shorten the run
            if self._lines.due(engine.step) and engine.step < engine.total_steps:
                clock = engine.clock
                rate = self._lines.window_rate(clock.timed_steps, clock.timed_time,
                                               engine.global_batch)
                self._lines.write(self._lines.line(engine.step,
                                                   engine.step / engine.steps_per_epoch,
                                                   self._loss, lr, rate))
        elif self._bar is not None:
            self._bar.set_total(engine.total_steps)
            self._bar.update(self._loss, lr)

    def on_evaluate(self, engine, record):
        text = (f"step {engine.step}: test accuracy {record['test_accuracy']:.4f}, "
                f"train loss {record['train_loss']:.4f}")
        if self._lines is not None:
            self._lines.write(text)
        elif self._bar is not None:
            self._bar.note(text)

    def on_run_end(self, engine, ending, summary):
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._lines = None


class ReportCallback(Callback):
    """`log.report: true`: rank 0 writes OUT/report (hvdscale report on this run) when the run
    has finished; a report that cannot be written is a warning, not a failed run."""

    def on_run_end(self, engine, ending, summary):
        if summary is None or not engine.comm.is_root or not engine.cfg.log.report:
            return
        from hvdscale.errors import UsageError
        from hvdscale.report import write_report
        try:
            page = write_report([engine.out], engine.out / "report")
        except (UsageError, OSError) as err:
            engine.echo(f"warning: report not written: {err}")
            return
        engine.echo(f"report: {page}")


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):     # no isatty, or a closed file
        return False


class MetricsFailureCallback(Callback):
    """A metrics.jsonl line that could not be written (full disk, quota) ends the run the way
    a failed checkpoint does (`checkpoint.on_error`): with `stop` every rank stops together
    with one line naming the file and exit code 6, after a checkpoint of the current step
    where the disk still takes one (the earlier checkpoints are never touched); with `warn`
    one warning and training goes on. Rank 0's verdict reaches every rank in one broadcast
    per evaluation (and one at the end), so no rank waits for another that has stopped."""

    def __init__(self):
        self._warned = False

    def _failure(self, engine):
        error = engine._log.error if engine.comm.is_root else None
        return engine.comm.broadcast_object(error)

    def _act(self, engine, failure, checkpoint):
        from hvdscale.engine.checkpointing import CheckpointError
        if engine.cfg.checkpoint.on_error == "warn":
            if not self._warned:
                engine.echo(f"warning: {failure}; training goes on without those lines "
                            f"(checkpoint.on_error = warn)")
                self._warned = True
            return
        checkpoints = engine.checkpoints
        saved = checkpoints.last_step == engine.step
        if checkpoint and not saved:
            try:
                saved = checkpoints.save(engine)
            except CheckpointError as err:
                raise CheckpointError(f"{failure}; {err}") from None
        where = (f"checkpoint step-{engine.step:08d} is written" if saved else
                 f"newest checkpoint: step {checkpoints.last_step}"
                 if checkpoints.last_step is not None else "no checkpoint written")
        raise CheckpointError(f"{failure}; {where}; continue with --resume once there is "
                              f"room (checkpoint.on_error = stop)")

    def on_evaluate(self, engine, record):
        failure = self._failure(engine)
        if failure:
            self._act(engine, failure, checkpoint=True)

    def on_run_end(self, engine, ending, summary):
        if summary is None:      # stopped early: the ranks may not all be here
            return
        failure = self._failure(engine)
        if failure:
            self._act(engine, failure, checkpoint=False)


def run_header(engine) -> str:
    """The lines a run starts with: world, model, data, batch, LR plan, optimizer, length."""
    from hvdscale.registry import OPTIMIZERS
    c, k, lr = engine.cfg, engine.comm.size, engine.lr
    optimizer = OPTIMIZERS.get(c.optimizer.name).summary(c.optimizer.options())
    flags = [f for f, on in (("fp16 compression", c.horovod.fp16_compression),
                             ("adasum", c.horovod.adasum)) if on]
    return "\n".join([
        f"hvdscale train {c.name}: {c.framework}, {k} worker{'s' * (k > 1)} "
        f"({engine.comm.controller}), model {c.model.name}, data {c.data.kind} "
        f"({engine.batches.num_examples} train / {engine.eval_source.num_examples} test)",
        f"  global batch {engine.global_batch} = {k} workers x {c.batch.per_worker} x "
        f"{c.batch.accumulation} accumulation (reference batch {c.batch.reference})",
        f"  lr: base {lr.base_lr:g} -> scaled {lr.peak_lr:.6g}; {lr.description}",
        f"  optimizer {optimizer}" + (f"; horovod: {', '.join(flags)}" if flags else ""),
        f"  steps {engine.total_steps} ({engine.steps_per_epoch}/epoch), eval every "
        f"{engine.eval_every or 'end'} steps, target accuracy {c.train.target_accuracy}",
    ])


def run_summary(engine, wall: float, tau_ref: Optional[float], hardware: str) -> Dict[str, Any]:
    """metrics.jsonl's last record. tau_ref: one worker's images/s at the same per-worker
    batch, for the scaling efficiency."""
    from hvdscale.core.metrics import scaling_efficiency
    k, cfg, clock, lr = engine.comm.size, engine.cfg, engine.clock, engine.lr
    tracker = engine.evaluation.tracker
    ips = clock.images_per_sec(engine.global_batch)
    return {
        "event": "summary", "recipe": cfg.name, "framework": engine.backend.framework,
        "hardware": hardware, "model": cfg.model.name,
        "optimizer": engine.backend.optimizer_name, "workers": k,
        "global_batch": engine.global_batch, "per_worker_batch": cfg.batch.per_worker,
        "accumulation": engine.per_step // cfg.batch.per_worker, "steps": engine.step,
        "epochs": round(engine.examples / engine.epoch_examples, 4),
        "base_lr": lr.base_lr, "peak_lr": lr.peak_lr, "warmup_steps": lr.warmup_steps,
        "final_test_accuracy": engine.evaluation.last_accuracy,
        "best_test_accuracy": tracker.best, "target_accuracy": tracker.target,
        "steps_to_target": tracker.steps_to_target,
        "time_to_target_s": tracker.time_to_target,
        "epochs_to_target": tracker.epochs_to_target,
        "images_per_sec": ips, "images_per_sec_per_worker": ips / k,
        "time_per_step_s": clock.time_per_step(), "train_time_s": clock.train_time,
        "wall_s": wall, "tau_ref": tau_ref,
        "scaling_efficiency": scaling_efficiency(ips, tau_ref, k) if tau_ref else None,
        "skipped_steps": engine.stats.nonfinite.skipped,
    }


def _fmt_time(seconds):
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min"


SUMMARY_COLUMNS = ("hardware", "framework", "workers", "batch size", "optimizer", "steps",
                   "time/step", "time", "accuracy")


def summary_table(summary: Dict[str, Any]) -> str:
    """The seed's table (hardware, framework, workers, batch size, optimizer, steps, time/step,
    time, accuracy) as Markdown, then throughput, scaling efficiency and time to target."""
    acc = summary.get("final_test_accuracy")
    batch = f"{summary['global_batch']}"
    if summary["workers"] > 1 or summary["accumulation"] > 1:
        batch += f" ({summary['workers']}x{summary['per_worker_batch']}"
        batch += f"x{summary['accumulation']})" if summary["accumulation"] > 1 else ")"
    cells = (summary["hardware"], summary["framework"], str(summary["workers"]), batch,
             summary["optimizer"], str(summary["steps"]), _fmt_time(summary["time_per_step_s"]),
             _fmt_time(summary["train_time_s"]), "-" if acc is None else f"{acc:.4f}")
    widths = [max(len(h), len(c)) for h, c in zip(SUMMARY_COLUMNS, cells)]
    row = lambda items: "| " + " | ".join(f"{x:<{w}}" for x, w in zip(items, widths)) + " |"
    lines = [row(SUMMARY_COLUMNS), "|" + "|".join("-" * (w + 2) for w in widths) + "|", row(cells)]
    extra = [f"images/s {summary['images_per_sec']:.1f} total, "
             f"{summary['images_per_sec_per_worker']:.1f} per worker"]
    if summary.get("scaling_efficiency") is not None:
        extra.append(f"scaling efficiency {summary['scaling_efficiency']:.3f} "
                     f"(tau_ref {summary['tau_ref']:.1f} img/s)")
    if acc is not None:
        extra.append(f"best accuracy {summary['best_test_accuracy']:.4f}")
    target = summary.get("target_accuracy")
    if target is not None:
        if summary.get("steps_to_target") is None:
            extra.append(f"target {target:g} not reached")
        else:
            extra.append(f"target {target:g} reached at step {summary['steps_to_target']} "
                         f"after {_fmt_time(summary['time_to_target_s'])}")
    lines.append("; ".join(extra) + f"; wall time {_fmt_time(summary['wall_s'])}")
    return "\n".join(lines)
