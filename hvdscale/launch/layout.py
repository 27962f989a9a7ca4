"""What a job looks like: the `Layout` the CLI fills from its options and this machine, and
the `Plan` (worker counts, hosts, threads) it resolves to (hvdscale.launch.plan)."""
import sys
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

from hvdscale.errors import ConfigError

CONTROLLERS = ("gloo", "mpi")
SRUN_MPI_PLUGINS = ("pmix", "pmi2")
# TCP-friendly OpenMPI defaults (the same ones horovodrun uses for OpenMPI): the ob1 point-to-
# point layer, and no openib transport, which only warns or fails on modern clusters.
DEFAULT_MCA = (("pml", "ob1"), ("btl", "^openib"))


@dataclass(frozen=True)
class Layout:
    """Where and how many workers run, and what they run. None means "derive it"."""
    launcher: str
    command: Tuple[str, ...]
    np: Optional[int] = None
    hosts: Tuple[Tuple[str, Optional[int]], ...] = ()     # (name, slots or None)
    gpus_per_node: int = 0
    workers_per_node: Optional[int] = None
    cores_per_node: Optional[int] = None    # None: SLURM_CPUS_ON_NODE for srun, else 1
    threads: Optional[int] = None
    controller: Optional[str] = None        # horovodrun: gloo | mpi | None (its own choice)
    network_interface: Optional[str] = None
    ssh_port: Optional[int] = None
    srun_mpi: str = "pmix"
    mca: Tuple[Tuple[str, str], ...] = DEFAULT_MCA
    elastic: bool = False
    min_np: Optional[int] = None
    max_np: Optional[int] = None
    hostfile: Optional[str] = None          # elastic: re-read by the discovery script
    is_root: bool = False
    launcher_args: Tuple[str, ...] = ()     # passed to the launcher verbatim, before the command
    launcher_path: Optional[str] = None     # the launcher executable if not the bare name
    # horovodrun + Gloo: the address/port the rendezvous server listens on
    # (hvdscale.launch.rendezvous; no address: network_interface's, else every interface)
    rendezvous_addr: Optional[str] = None
    rendezvous_port: Optional[int] = None
    python: str = sys.executable            # runs hvdscale.launch.horovodrun before horovodrun


@dataclass(frozen=True)
class Plan:
    """The numbers a layout resolves to; shown by tests and error messages."""
    np: int
    hosts: Tuple[Tuple[str, int], ...]
    workers_per_node: int
    nodes: int
    threads: int
    cpus_per_task: int


def horovodrun_controller(mpi_built: bool, gloo_built: bool) -> Optional[str]:
    """The controller plain `horovodrun` (and `hvdscale launch` without --controller) runs:
    MPI when Horovod was built with it, else Gloo (horovod/runner/launch.py, run_controller);
    None when Horovod has neither."""
    if mpi_built:
        return "mpi"
    return "gloo" if gloo_built else None


def parse_mca(items: Sequence[str], defaults: bool = True) -> Tuple[Tuple[str, str], ...]:
    """`--mca key=value` options over the defaults: a key given replaces the default's value."""
    mca = dict(DEFAULT_MCA) if defaults else {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key or not value:
            raise ConfigError(f"--mca {item!r}: write KEY=VALUE, e.g. --mca btl_tcp_if_include=eth0")
        mca[key] = value
    return tuple(mca.items())
