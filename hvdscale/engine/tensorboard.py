"""TensorBoard event files without TensorFlow.

torch.utils.tensorboard and tensorboard's own EventFileWriter import TensorFlow when it is
installed (30 s and hundreds of MB per worker here), so scalars are written directly: the
Event protos come from tensorboard's compiled protos, framed as TFRecords (length, masked
CRC-32C of the length, data, masked CRC-32C of the data).
"""
import os
import socket
import struct
import time
from pathlib import Path


def _crc32c_table():
    poly, table = 0x82F63B78, []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ poly if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _crc32c_table()


def crc32c(data):
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked(crc):
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data):
    length = struct.pack("<Q", len(data))
    return (length + struct.pack("<I", _masked(crc32c(length))) + data
            + struct.pack("<I", _masked(crc32c(data))))


class EventWriter:
    """Scalars to LOGDIR/events.out.tfevents.<time>.<host>.<pid>; flushed after each write."""

    def __init__(self, logdir):
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary
        self._Event, self._Summary = Event, Summary
        logdir = Path(logdir)
        logdir.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self.path = logdir / name
        self._fh = open(self.path, "wb")
        self._write(Event(wall_time=time.time(), file_version="brain.Event:2"))

    def _write(self, event):
        self._fh.write(tfrecord(event.SerializeToString()))
        self._fh.flush()

    def scalar(self, tag, value, step):
        summary = self._Summary(value=[self._Summary.Value(tag=tag, simple_value=float(value))])
        self._write(self._Event(wall_time=time.time(), step=int(step), summary=summary))

    def close(self):
        self._fh.close()


def open_writer(logdir):
    """An EventWriter, or None when the tensorboard package is not installed."""
    try:
        return EventWriter(logdir)
    except ImportError:
        return None
