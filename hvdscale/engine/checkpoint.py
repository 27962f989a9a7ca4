"""Checkpoints on disk: rank 0 writes, atomically, and keeps the newest `keep`.

One checkpoint is two files in OUT/checkpoints/: the framework's state (`step-00000120.pt`
for PyTorch, `.npz` for TensorFlow) and a JSON sidecar (`step-00000120.json`) with the loop
position. Each is written to a temporary file in the same directory, fsynced and renamed, and
the sidecar is written last, so a sidecar on disk always names a complete state file.
"""
import json
import os
import re
import tempfile
from pathlib import Path

from hvdscale.errors import ConfigError

SIDECAR = re.compile(r"^step-(\d{8})\.json$")


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
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    # make the rename itself durable
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class CheckpointStore:
    def __init__(self, directory, keep=2):
        self.dir = Path(directory)
        self.keep = keep

    def save(self, step, state_bytes, state_suffix, meta):
        """Write one checkpoint; returns the sidecar path. Called on rank 0 only."""
        self.dir.mkdir(parents=True, exist_ok=True)
        stem = f"step-{step:08d}"
        atomic_write(self.dir / f"{stem}{state_suffix}", state_bytes)
        meta = dict(meta, step=step, state_file=f"{stem}{state_suffix}")
        sidecar = self.dir / f"{stem}.json"
        atomic_write(sidecar, (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode())
        self._prune()
        return sidecar

    def checkpoints(self):
        """Sidecars of complete checkpoints, oldest first."""
        if not self.dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := SIDECAR.match(p.name))]
        return [p for _, p in sorted(found)]

    def latest(self):
        """(meta, state_path) of the newest checkpoint, or None when there is none."""
        for sidecar in reversed(self.checkpoints()):
            try:
                meta = json.loads(sidecar.read_text())
            except (OSError, ValueError) as err:
                raise ConfigError(f"checkpoint {sidecar} is unreadable ({err})") from None
            state = self.dir / meta.get("state_file", "")
            if state.is_file():
                return meta, state
        return None

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
