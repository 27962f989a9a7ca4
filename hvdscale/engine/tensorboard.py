"""TensorBoard scalars through tensorboardX, which writes the event files without TensorFlow.

torch.utils.tensorboard and tensorboard's own EventFileWriter import TensorFlow when it is
installed (30 s and hundreds of MB per worker here); tensorboardX needs only protobuf. Rank 0
writes OUT/tensorboard/events.out.tfevents.<time>.<host>.<pid>. tensorboardX's synchronous
EventsWriter is used rather than SummaryWriter, whose background thread and queue would keep
the last scalars from the file when a job is killed: here each scalar is on disk when
`scalar()` returns.
"""
import os
import sys
import time
from pathlib import Path
from typing import Optional, Union

from hvdscale.engine.callbacks import Callback


# Modules tensorboardX's package __init__ imports when installed, only to accept their tensors
# in add_* calls not used here. Loading one for the import alone costs a worker seconds and
# hundreds of MB (torch in a TensorFlow worker), so those not loaded already are hidden.
NOT_NEEDED = ("torch",)


def _import_tensorboardx():
    """tensorboardX's writer classes, imported with NOT_NEEDED hidden from it."""
    hidden = [name for name in NOT_NEEDED if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None          # `import torch` raises ImportError meanwhile
    try:
        from tensorboardX import summary
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event
    finally:
        for name in hidden:
            del sys.modules[name]
    return summary, EventsWriter, Event


class EventWriter:
    """Scalars (tag, value, step) into one event file under `logdir`."""

    def __init__(self, logdir: Union[str, Path]):
        summary, EventsWriter, Event = _import_tensorboardx()
        self._summary, self._Event = summary, Event
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        self._writer = EventsWriter(str(self.logdir / "events"), filename_suffix=f".{os.getpid()}")
        self.path = Path(self._writer._file_name)

    def scalar(self, tag: str, value: float, step: int) -> None:
        event = self._Event(wall_time=time.time(), step=int(step),
                            summary=self._summary.scalar(tag, float(value)))
        self._writer.write_event(event)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def open_writer(logdir: Union[str, Path]) -> Optional[EventWriter]:
    """An EventWriter, or None when tensorboardX is not installed."""
    try:
        return EventWriter(logdir)
    except ImportError:
        return None


class TensorBoardCallback(Callback):
    """Rank 0 writes each evaluation's scalars to OUT/tensorboard (`log.tensorboard`)."""

    TAGS = ("train_loss", "test_accuracy", "test_loss", "lr", "images_per_sec")

    def __init__(self):
        self._writer = None

    def on_run_begin(self, engine):
        if engine.comm.is_root and engine.cfg.log.tensorboard:
            self._writer = open_writer(engine.out / "tensorboard")

    def on_evaluate(self, engine, record):
        if self._writer is not None:
            for tag in self.TAGS:
                if record.get(tag) is not None:
                    self._writer.scalar(tag, record[tag], engine.step)

    def scalar(self, tag, value, step):
        """One more scalar, for other callbacks (e.g. batch.adaptive's decisions); rank 0."""
        if self._writer is not None:
            self._writer.scalar(tag, value, step)

    def on_run_end(self, engine, ending, summary):
        if self._writer is not None:
            self._writer.close()
            self._writer = None
