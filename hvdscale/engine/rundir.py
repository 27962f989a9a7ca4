"""A run directory has one owner.

`hvdscale train --out OUT` claims OUT before anything is written there:

- OUT must be usable: a directory (or creatable), writable, with writable `checkpoints/`,
  `tensorboard/` and `metrics.jsonl` where they exist already. Checked with plain file-system
  calls, before torch or TensorFlow is imported.
- One job at a time: rank 0 holds an exclusive `flock` on OUT/.hvdscale.lock for the life of
  the process. The kernel drops it when the process ends, however it ends, so a killed job
  never leaves a stale lock. The file records who holds it (host, pid, start time) for the
  refusal message of a second job.
- A new run (no --resume) into a directory that holds another run's checkpoints or metrics
  is refused; `--overwrite` moves that run into OUT/previous-<n>/ and never deletes it.

Only rank 0 touches OUT; hvdscale/commands/train.py hands its verdict to the other ranks.
"""
import fcntl
import json
import os
import re
import socket
import time
from pathlib import Path
from typing import List, Optional

from hvdscale.errors import ConfigError

LOCK_NAME = ".hvdscale.lock"
PREVIOUS = re.compile(r"^previous-(\d+)$")
SETTING = "out"          # hvdscale.commands.train maps it to the flag --out


def _refuse(message: str) -> ConfigError:
    return ConfigError(message, setting=SETTING)


def _writable(path: Path) -> bool:
    # access() also answers False on a read-only mount (EROFS), for root too
    return os.access(path, os.W_OK | os.X_OK)


def check_usable(out: Path, tensorboard: bool = True) -> None:
    """Raise a one-line ConfigError when OUT cannot hold a run. Writes nothing."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise _refuse(f"{out} is a file, not a directory")
    probe = out.absolute()
    while not probe.exists():           # the directory that mkdir would create OUT in
        probe = probe.parent
    if not probe.is_dir():
        raise _refuse(f"{out}: {probe} is a file, not a directory")
    if not _writable(probe):
        raise _refuse(f"{out}: {probe} is not writable")
    parts = ["checkpoints"] + (["tensorboard"] if tensorboard else [])
    for name in parts:
        sub = out / name
        if sub.exists() and not (sub.is_dir() and _writable(sub)):
            what = "not a directory" if not sub.is_dir() else "not writable"
            raise _refuse(f"{sub} is {what}")
    metrics = out / "metrics.jsonl"
    if metrics.exists() and not (metrics.is_file() and os.access(metrics, os.W_OK)):
        raise _refuse(f"{metrics} is not a writable file")


class RunDirLock:
    """The exclusive flock on OUT/.hvdscale.lock (released by the kernel when the process
    ends; `release()` for an orderly hand-back)."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.path = self.out / LOCK_NAME
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise _refuse(f"cannot create {self.path}: {err.strerror or err}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise _refuse(f"{self.out} is in use by another job ({holder}); wait for it to "
                          f"end or choose another --out") from None
        except OSError as err:       # a file system without flock (some Lustre mounts)
            os.close(fd)
            raise _refuse(f"cannot lock {self.path}: {err.strerror or err} (the file "
                          f"system must support flock)") from None
        self._fd = fd
        who = {"host": socket.gethostname(), "pid": os.getpid(),
               "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        try:      # only for the message of a refused job: a failure here costs nothing
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(who) + "\n").encode(), 0)
        except OSError:
            pass

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)        # closing the last descriptor drops the flock
            self._fd = None


def _holder(fd: int) -> str:
    try:
        who = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"host {who['host']}, pid {who['pid']}, since {who['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


def previous_run(out: Path) -> List[str]:
    """What of an earlier run OUT holds (empty: nothing)."""
    out = Path(out)
    found = []
    ckpt = out / "checkpoints"
    if ckpt.is_dir():
        steps = sorted(int(m.group(1)) for p in ckpt.iterdir()
                       if (m := re.match(r"^step-(\d{8})\.json$", p.name)))
        if steps:
            found.append(f"checkpoints up to step {steps[-1]}")
    metrics = out / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append("metrics.jsonl")
    board = out / "tensorboard"
    if board.is_dir() and any(board.iterdir()):
        found.append("tensorboard events")
    return found


def move_aside(out: Path) -> Path:
    """Move everything of the earlier run (not the lock, not older previous-<n>/) into
    OUT/previous-<n>/, n one above the highest there; returns that directory."""
    out = Path(out)
    taken = [int(m.group(1)) for p in out.iterdir() if (m := PREVIOUS.match(p.name))]
    dest = out / f"previous-{max(taken, default=0) + 1}"
    dest.mkdir()
    for entry in sorted(out.iterdir()):
        if entry.name == LOCK_NAME or PREVIOUS.match(entry.name):
            continue
        os.rename(entry, dest / entry.name)
    return dest


def claim(out: Path, *, resume: bool, overwrite: bool, tensorboard: bool = True,
          echo=print) -> RunDirLock:
    """Rank 0: check OUT, lock it and settle an earlier run in it. Returns the held lock;
    raises a one-line ConfigError (the lock released) when the run cannot start there."""
    if resume and overwrite:
        raise ConfigError("--overwrite starts a new run and --resume continues one: "
                          "give one of them", setting=SETTING)
    out = Path(out)
    check_usable(out, tensorboard)
    lock = RunDirLock(out)
    lock.acquire()
    try:
        found = [] if resume else previous_run(out)
        if found and not overwrite:
            raise _refuse(f"{out} holds another run ({', '.join(found)}): continue it with "
                          f"--resume, choose a new --out, or add --overwrite to move it "
                          f"into {out}/previous-<n>/")
        if found:
            try:
                dest = move_aside(out)
            except OSError as err:
                raise _refuse(f"cannot move the earlier run in {out} aside: "
                              f"{err.strerror or err}") from None
            echo(f"--overwrite: moved the earlier run in {out} ({', '.join(found)}) "
                 f"to {dest}/")
    except BaseException:
        lock.release()
        raise
    return lock
