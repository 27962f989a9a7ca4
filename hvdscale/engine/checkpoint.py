"""Checkpoints on disk: rank 0 writes, atomically, and keeps the newest `keep`.

One checkpoint is two files in OUT/checkpoints/: the framework's state (`step-00000120.pt`
for PyTorch, `.npz` for TensorFlow) and a JSON sidecar (`step-00000120.json`) with the loop
position and the state file's size. Each is written to a temporary file in the same
directory, fsynced and renamed, and the sidecar is written last, so a sidecar on disk always
names a complete state file (whose size it records). `latest()` ignores what has no sidecar:
a state file whose sidecar was never written, a leftover temporary file. A file damaged
after it was written is not skipped silently: loading it fails with one line naming it.

A write that fails (disk full, read-only directory, quota) raises CheckpointWriteError with
one line naming the directory; the partial files of that attempt are removed where the
file system still allows it, and older checkpoints are never touched before a new one is
complete (pruning runs after the sidecar is in place).
"""
import json
import os
import re
import tempfile
from pathlib import Path

from hvdscale.errors import ConfigError

SIDECAR = re.compile(r"^step-(\d{8})\.json$")


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the message is one line naming the directory."""


def atomic_write(path, data):
    """Write bytes so that `path` holds either the old content or all of `data`, never a part."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    # make the rename itself durable
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _remove(path):
    try:
        os.unlink(path)
    except OSError:        # gone already, or a read-only file system keeps it
        pass


class CheckpointStore:
    def __init__(self, directory, keep=2):
        self.dir = Path(directory)
        self.keep = keep

    def save(self, step, state_bytes, state_suffix, meta):
        """Write one checkpoint; returns the sidecar path. Called on rank 0 only.
        Raises CheckpointWriteError (the older checkpoints stay as they were)."""
        stem = f"step-{step:08d}"
        state = self.dir / f"{stem}{state_suffix}"
        sidecar = self.dir / f"{stem}.json"
        meta = dict(meta, step=step, state_file=state.name, state_size=len(state_bytes))
        replacing = sidecar.exists()     # the same step again (e.g. preempted at a periodic one)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_write(state, state_bytes)
            atomic_write(sidecar, (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode())
        except OSError as err:
            if not replacing:    # a state file without its sidecar would only take space
                _remove(state)
            reason = err.strerror or str(err)
            newest = self._newest_name()
            raise CheckpointWriteError(
                f"cannot write checkpoint step {step} to {self.dir}: {reason} "
                f"[errno {err.errno}]; newest complete checkpoint: {newest or 'none'}") from None
        self._prune()
        return sidecar

    def checkpoints(self):
        """Sidecars of complete checkpoints, oldest first."""
        if not self.dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := SIDECAR.match(p.name))]
        return [p for _, p in sorted(found)]

    def latest(self):
        """(meta, state_path) of the newest complete checkpoint, or None when there is none."""
        for sidecar in reversed(self.checkpoints()):
            try:
                meta = json.loads(sidecar.read_text())
            except (OSError, ValueError) as err:
                raise ConfigError(f"checkpoint {sidecar} is unreadable ({err})") from None
            state = self.dir / meta.get("state_file", "")
            if state.is_file():
                return meta, state
        return None

    def _newest_name(self):
        try:
            hit = self.latest()
        except (ConfigError, OSError):
            return None
        return hit[1].name if hit else None

    def _prune(self):
        for sidecar in self.checkpoints()[:-self.keep]:
            try:
                meta = json.loads(sidecar.read_text())
                sidecar.unlink()   # the sidecar first: a state file without one is ignored
                state = self.dir / meta.get("state_file", "")
                if state.is_file():
                    state.unlink()
            except (OSError, ValueError):
                pass
