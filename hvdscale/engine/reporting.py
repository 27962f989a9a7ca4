"""What a run tells the user: metrics.jsonl, TensorBoard scalars, the progress bar and the final
summary table. Everything here is active on rank 0 only; other ranks get silent stand-ins."""
import json
import math
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Union

from hvdscale.engine.callbacks import Callback


class MetricsLog:
    """OUT/metrics.jsonl: one JSON object per line, flushed at once so a crash keeps the lines."""

    def __init__(self, path: Union[str, Path], append: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a" if append else "w")

    def write(self, record: Dict[str, Any]) -> None:
        self._fh.write(json.dumps(_jsonable(record)) + "\n")
        self._fh.flush()

    def close(self):
        self._fh.close()


def _jsonable(record):
    """NaN/inf are not JSON: write them as null."""
    out = {}
    for key, value in record.items():
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        out[key] = value
    return out


class NullLog:
    def write(self, record):
        pass

    def close(self):
        pass


class Progress:
    """A tqdm bar over the training steps, or nothing when disabled or tqdm is missing."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self._bar = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                             file=sys.stderr, leave=False)

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


class ProgressCallback(Callback):
    """The progress bar as a loop callback (rank 0, `log.progress`): one update per step, the
    mean loss of the last statistics read, a line per evaluation."""

    def __init__(self):
        self._bar, self._loss = None, None

    def on_run_begin(self, engine):
        self._bar = Progress(engine.total_steps, engine.step,
                             engine.comm.is_root and engine.cfg.log.progress)

    def on_stats(self, engine, stats):
        if stats["examples"]:
            self._loss = stats["loss_sum"] / stats["examples"]

    def on_step_end(self, engine):
        self._bar.set_total(engine.total_steps)
        self._bar.update(self._loss, engine.lr.schedule(engine.step - 1))

    def on_evaluate(self, engine, record):
        self._bar.note(f"step {engine.step}: test accuracy {record['test_accuracy']:.4f}, "
                       f"train loss {record['train_loss']:.4f}")

    def on_run_end(self, engine, ending, summary):
        if self._bar is not None:
            self._bar.close()
            self._bar = None


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
