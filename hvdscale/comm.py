"""The one Horovod layer both trainers use: who am I, and collectives on NumPy values.

`init_comm(framework)` initialises the Horovod module the backend registered for it
(horovod.torch, horovod.tensorflow) and reduces NumPy values through the backend's
`collectives` module; without Horovod (or with `horovod=False`) a single-process Comm with the same methods stands in,
so the engine has no `if distributed` branches.
"""
import os
from typing import Dict, Mapping, Optional

import numpy as np

from hvdscale.errors import ConfigError

OPS = ("average", "sum", "max", "min")


class Comm:
    """rank/size/local_rank/local_size plus allreduce, broadcast and agreement on NumPy data."""

    def __init__(self, framework, hvd=None, collectives=None):
        """collectives: the backend's module with host_allreduce / host_allreduce_async
        (hvdscale.registry.BackendInfo); needed when hvd is given."""
        self.framework = framework
        self.hvd = hvd
        if hvd is not None and collectives is None:
            import importlib
            from hvdscale.registry import BACKENDS
            collectives = importlib.import_module(BACKENDS.get(framework).collectives)
        self._ops = collectives
        if hvd is None:
            self.rank, self.size, self.local_rank, self.local_size = 0, 1, 0, 1
        else:
            self.rank, self.size = hvd.rank(), hvd.size()
            self.local_rank, self.local_size = hvd.local_rank(), hvd.local_size()
        self._calls = 0

    def refresh(self):
        """Re-read rank and size after Horovod was re-initialised (an elastic reset) and
        restart the collective names: the ranks of the new world, newcomers included, then
        name their collectives alike."""
        if self.hvd is not None:
            self.rank, self.size = self.hvd.rank(), self.hvd.size()
            self.local_rank, self.local_size = self.hvd.local_rank(), self.hvd.local_size()
        self._calls = 0

    @property
    def distributed(self):
        return self.hvd is not None and self.size > 1

    @property
    def is_root(self):
        return self.rank == 0

    @property
    def controller(self):
        if self.hvd is None:
            return "none"
        return "mpi" if self.hvd.mpi_enabled() else "gloo" if self.hvd.gloo_enabled() else "?"

    def _name(self, tag):
        # Horovod matches collectives across ranks by name; a counter keeps names unique.
        self._calls += 1
        return f"hvdscale.{tag}.{self._calls}"

    def allreduce(self, value, op="average"):
        """Reduce a NumPy scalar or array over all ranks; returns the same shape (float64 for
        floats, int64 for integers, so sums of counts stay exact)."""
        if op not in OPS:
            raise ConfigError(f"allreduce op {op!r} is not one of {', '.join(OPS)}")
        arr = np.asarray(value)
        scalar = arr.ndim == 0
        arr = arr.astype(np.int64 if np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool
                         else np.float64)
        if op == "average" and arr.dtype == np.int64:
            arr = arr.astype(np.float64)
        if self.distributed:
            hop = {"average": self.hvd.Average, "sum": self.hvd.Sum,
                   "max": self.hvd.Max, "min": self.hvd.Min}[op]
            arr = self._reduce(arr.reshape(-1) if scalar else arr, hop)
        return arr.reshape(()).item() if scalar else arr

    def allreduce_many(self, arrays, op="average"):
        """Reduce several arrays in one collective (concatenated as float64), same shapes back."""
        arrays = [np.asarray(a) for a in arrays]
        if not arrays or not self.distributed:
            return [a.astype(np.float64) for a in arrays]
        flat = np.concatenate([a.astype(np.float64).reshape(-1) for a in arrays])
        flat = self.allreduce(flat, op=op)
        out, start = [], 0
        for a in arrays:
            out.append(flat[start:start + a.size].reshape(a.shape))
            start += a.size
        return out

    def _reduce(self, arr, hop):
        return self._ops.host_allreduce(self.hvd, arr, hop, self._name("allreduce"))

    def allreduce_async(self, value, op="max"):
        """Start reducing a small NumPy value and return a handle whose `wait()` gives the
        result (same rules as allreduce). Where the backend has a host-side async allreduce
        (torch) the caller does not wait; elsewhere (TensorFlow) the collective runs, blocking,
        at `wait()` in the calling thread. Every rank must start the same calls in the same
        order, as for allreduce."""
        if not self.distributed:
            return _Done(self.allreduce(value, op=op))
        arr = np.asarray(value)
        dtype = np.int64 if np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool \
            else np.float64
        hop = {"average": self.hvd.Average, "sum": self.hvd.Sum,
               "max": self.hvd.Max, "min": self.hvd.Min}[op]
        fetch = self._ops.host_allreduce_async(self.hvd, arr.astype(dtype).reshape(-1), hop,
                                               self._name("async"))
        if fetch is None:
            return _Pending(lambda: self.allreduce(value, op=op), arr.shape)
        return _Pending(fetch, arr.shape)

    def broadcast_object(self, obj, root=0):
        """A picklable object from `root` to every rank."""
        if not self.distributed:
            return obj
        return self.hvd.broadcast_object(obj, root_rank=root, name=self._name("bcast"))

    def all_true(self, flag):
        """True on every rank iff `flag` is true on every rank (agreement before acting)."""
        return bool(self.allreduce(np.int64(bool(flag)), op="min"))

    def any_true(self, flag):
        return bool(self.allreduce(np.int64(bool(flag)), op="max"))

    def barrier(self):
        if self.distributed:
            self.allreduce(np.int64(0), op="sum")

    def shutdown(self):
        """End Horovod on this rank (Horovod agrees the shutdown with the other ranks)."""
        if self.hvd is not None:
            self.hvd.shutdown()


class _Done:
    """A result that is already there (single process)."""

    def __init__(self, value):
        self.value = value

    def wait(self):
        return self.value


class _Pending:
    def __init__(self, fetch, shape):
        self._fetch, self._shape, self._value = fetch, shape, None

    def wait(self):
        if self._fetch is not None:
            arr = np.asarray(self._fetch()).reshape(self._shape)
            self._value = arr.item() if arr.ndim == 0 else arr
            self._fetch = None
        return self._value


# Variables by which horovodrun, mpirun, PMI(x) and Slurm tell a process how many ranks the
# job has. `hvdscale train` checks the same ones but SLURM_NTASKS (commands/train.py), which
# a batch script's own shell has too; here counting too many only keeps Horovod's default.
WORLD_SIZE_VARS = ("HOROVOD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE",
                   "SLURM_NTASKS")
# With one worker nothing goes through Horovod (its optimizers register no hooks and Comm skips
# every collective), yet its background thread wakes every HOROVOD_CYCLE_TIME: at Horovod's
# 1 ms that is ~1000 wake-ups/s of a thread that shares the cores with the compute threads.
# With more workers Horovod's own 1 ms stays: on the 2-core node 5/10/20 ms cycles were slower
# (benchmarks/RESULTS.md, "Horovod settings"; docs/training.md).
SINGLE_WORKER_CYCLE_TIME_MS = "50"


def gradient_groups(setting: Optional[int], gpu: bool) -> int:
    """Horovod's `groups` for the gradient allreduce (0 = one allreduce per tensor):
    `horovod.groups`, or by device. On a CPU the ranks share the cores with the compute
    threads, and one grouped allreduce after backward (one wake-up of Horovod's thread, one
    negotiation) beat per-tensor allreduces by ~10 % per step at K=2 on the 2-core node
    (benchmarks/RESULTS.md, "Issue 12"); on a GPU, per-tensor allreduces overlap with the
    rest of backward, which is what large models need."""
    if setting is None:
        return 0 if gpu else 1
    return setting


def launched_world_size(environ: Optional[Mapping[str, str]] = None) -> int:
    """How many ranks the launcher started (1 when no launcher says otherwise)."""
    environ = os.environ if environ is None else environ
    for var in WORLD_SIZE_VARS:
        if environ.get(var, "").isdigit():
            return int(environ[var])
    return 1


# ... and how many of them share this node
LOCAL_SIZE_VARS = ("HOROVOD_LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS",
                   "PMI_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE")


def launched_local_size(world_size: int, environ: Optional[Mapping[str, str]] = None) -> int:
    """How many ranks the launcher put on this node; `world_size` (all on one node) when no
    launcher says."""
    environ = os.environ if environ is None else environ
    for var in LOCAL_SIZE_VARS:
        if environ.get(var, "").isdigit() and int(environ[var]) > 0:
            return min(int(environ[var]), max(1, world_size))
    return max(1, world_size)


def horovod_env_defaults(environ: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """The Horovod settings hvdscale sets before hvd.init() in this process: only those the
    environment does not set already (the user's value always wins)."""
    environ = os.environ if environ is None else environ
    wanted = {}
    if launched_world_size(environ) == 1 and environ.get("HOROVOD_ELASTIC") != "1":
        wanted["HOROVOD_CYCLE_TIME"] = SINGLE_WORKER_CYCLE_TIME_MS
    return {k: v for k, v in wanted.items() if k not in environ}


def apply_horovod_defaults(environ=None) -> Dict[str, str]:
    """Set horovod_env_defaults() in `environ` (os.environ); returns what was set."""
    environ = os.environ if environ is None else environ
    chosen = horovod_env_defaults(environ)
    environ.update(chosen)
    return chosen


def init_comm(framework, horovod=True):
    """Initialise Horovod for `framework` (a registered backend) and return a Comm.

    horovod=False, Horovod not installed, or a backend without Horovod gives the
    single-process Comm; callers that were launched with several processes should pass
    horovod=True and check `size`.
    """
    import importlib
    from hvdscale.registry import BACKENDS, resolve
    info = BACKENDS.get(framework)         # ConfigError naming the registered ones
    if info.load is not None:             # the framework's first import, its own way
        resolve(info.load)()
    if not horovod or info.horovod is None:
        return Comm(framework)
    try:
        hvd = importlib.import_module(info.horovod)
    except ImportError:
        return Comm(framework)
    apply_horovod_defaults()      # read by Horovod's background thread when it starts
    hvd.init()
    return Comm(framework, hvd)
