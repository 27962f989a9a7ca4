"""Build the horovodrun / mpirun / srun command line for a job layout.

`build_command(layout, env)` is a pure function: it reads nothing but its two arguments, so
tests check the exact argv for any layout and environment without starting anything. The
`hvdscale launch` sub-command (hvdscale/commands/launch.py) fills a `Layout` from its options
and this machine, then prints (--dry-run) or execs the result.

Rules the builder applies, because each one costs a queue wait when forgotten:
- every worker gets OMP_NUM_THREADS = cores per node // workers per node (at least 1),
  passed explicitly on the command line so that remote nodes see it too;
- mpirun: `-bind-to none -map-by slot` (bound workers would share one core), the environment
  that matters is forwarded with `-x` (PATH, LD_LIBRARY_PATH, PYTHONPATH and every NCCL_* /
  HOROVOD_* variable that is set), `-mca pml ob1 -mca btl ^openib` unless overridden, and
  `--allow-run-as-root` only when running as root;
- srun: `--ntasks`, `--ntasks-per-node`, `--cpus-per-task`, `--mpi=pmix|pmi2`, and
  `--kill-on-bad-exit=1` so one failed rank ends the step instead of hanging the others.
"""
import math
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Mapping, Optional, Sequence, Tuple

from hvdscale import registry
from hvdscale.errors import ConfigError
from hvdscale.rendezvous import ALL_INTERFACES

# The launchers are entries of hvdscale.registry.LAUNCHERS (name, description, planner and
# command builder); this tuple is the built-in names, for option choices.
LAUNCHERS = registry.LAUNCHERS.names()
CONTROLLERS = ("gloo", "mpi")
SRUN_MPI_PLUGINS = ("pmix", "pmi2")
# Forwarded to mpirun workers when set; NCCL_* and HOROVOD_* are added by prefix.
FORWARDED_VARIABLES = ("PATH", "LD_LIBRARY_PATH", "PYTHONPATH")
FORWARDED_PREFIXES = ("NCCL_", "HOROVOD_")
# TCP-friendly OpenMPI defaults (the same ones horovodrun uses for OpenMPI): the ob1 point-to-
# point layer, and no openib transport, which only warns or fails on modern clusters.
DEFAULT_MCA = (("pml", "ob1"), ("btl", "^openib"))
ROOT_ENV = (("OMPI_ALLOW_RUN_AS_ROOT", "1"), ("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1"))
DISCOVERY_SCRIPT = Path(__file__).resolve().parents[1] / "launchers" / "hosts" / "discover_hosts.sh"

_HOST_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


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
    # horovodrun + Gloo: the address/port the rendezvous server listens on (hvdscale.rendezvous;
    # no address: network_interface's, else every interface)
    rendezvous_addr: Optional[str] = None
    rendezvous_port: Optional[int] = None
    python: str = sys.executable            # runs hvdscale.rendezvous in front of horovodrun


@dataclass(frozen=True)
class Plan:
    """The numbers a layout resolves to; shown by tests and error messages."""
    np: int
    hosts: Tuple[Tuple[str, int], ...]
    workers_per_node: int
    nodes: int
    threads: int
    cpus_per_task: int


# ---------------------------------------------------------------------------------------
# hosts


def horovodrun_controller(mpi_built: bool, gloo_built: bool) -> Optional[str]:
    """The controller plain `horovodrun` (and `hvdscale launch` without --controller) runs:
    MPI when Horovod was built with it, else Gloo (horovod/runner/launch.py, run_controller);
    None when Horovod has neither."""
    if mpi_built:
        return "mpi"
    return "gloo" if gloo_built else None


def parse_hosts(text):
    """`h1:2,h2:2` or `h1,h2` -> ((name, slots or None), ...)."""
    hosts = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            raise ConfigError(f"--hosts {text!r}: empty host name")
        name, sep, slots = item.partition(":")
        hosts.append((_check_host(name, f"--hosts {text!r}"),
                      _check_slots(slots, f"--hosts {text!r}") if sep else None))
    return _no_duplicates(tuple(hosts), f"--hosts {text!r}")


def parse_hostfile_text(text, source="hostfile"):
    """Lines `host`, `host:N` or OpenMPI's `host slots=N [max_slots=M]`; `#` starts a comment.

    The same formats as launchers/hosts/discover_hosts.sh, which reads the file for elastic jobs.
    """
    hosts = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{source}:{number}"
        words = line.split()
        name, sep, slots = words[0].partition(":")
        name = _check_host(name, where)
        count = _check_slots(slots, where) if sep else None
        for word in words[1:]:
            key, eq, value = word.partition("=")
            if key == "slots" and eq and count is None:
                count = _check_slots(value, where)
            elif key == "max_slots" and eq:
                _check_slots(value, where)
            else:
                raise ConfigError(f"{where}: cannot read {raw.strip()!r} "
                                  "(expected 'host', 'host:N' or 'host slots=N')")
        hosts.append((name, count))
    if not hosts:
        raise ConfigError(f"{source}: no hosts listed")
    return _no_duplicates(tuple(hosts), source)


def read_hostfile(path):
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ConfigError(f"--hostfile {path}: cannot read it ({err.strerror or err})") from None
    return parse_hostfile_text(text, source=str(path))


def format_hosts(hosts):
    return ",".join(f"{name}:{slots}" for name, slots in hosts)


def _check_host(name, where):
    if not _HOST_RE.match(name):
        raise ConfigError(f"{where}: {name!r} is not a host name")
    return name


def _check_slots(text, where):
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"{where}: slots must be a positive integer, got {text!r}")
    return int(text)


def _no_duplicates(hosts, where):
    seen = set()
    for name, _ in hosts:
        if name in seen:
            raise ConfigError(f"{where}: host {name} is listed twice; give it one slot count")
        seen.add(name)
    return hosts


# ---------------------------------------------------------------------------------------
# layout -> plan


def plan_layout(layout: Layout, env: Mapping[str, str]) -> Plan:
    """Check a layout and derive worker counts, hosts and thread counts."""
    if layout.launcher not in registry.LAUNCHERS:
        raise ConfigError(f"unknown launcher {layout.launcher!r}; choose one of "
                          f"{', '.join(registry.LAUNCHERS.names())}")
    if not layout.command:
        raise ConfigError("nothing to launch: put the worker command after '--', "
                          "e.g. -- hvdscale train RECIPE")
    for name in ("np", "workers_per_node", "cores_per_node", "threads", "min_np", "max_np"):
        value = getattr(layout, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if layout.gpus_per_node < 0:
        raise ConfigError(f"--gpus-per-node must be 0 or more, got {layout.gpus_per_node}")
    if layout.srun_mpi not in SRUN_MPI_PLUGINS:
        raise ConfigError(f"--mpi {layout.srun_mpi!r}: choose pmix or pmi2")
    if layout.controller is not None and layout.controller not in CONTROLLERS:
        raise ConfigError(f"--controller {layout.controller!r}: choose gloo or mpi")
    if layout.controller and layout.launcher != "horovodrun":
        raise ConfigError("--controller only applies to horovodrun "
                          f"({layout.launcher} always uses MPI)")
    if layout.elastic and layout.launcher != "horovodrun":
        raise ConfigError("elastic jobs need --launcher horovodrun (mpirun and srun cannot add hosts)")
    if not layout.elastic and (layout.min_np or layout.max_np):
        raise ConfigError("--min-np/--max-np only apply to --elastic jobs")
    if (layout.rendezvous_addr or layout.rendezvous_port) and not uses_gloo_rendezvous(layout):
        raise ConfigError("--rendezvous-addr/--rendezvous-port only apply to horovodrun's Gloo "
                          "controller (MPI starts no rendezvous server)")
    if layout.ssh_port is not None and layout.launcher == "srun":
        raise ConfigError("--ssh-port does not apply to srun (SLURM starts the workers itself)")
    return registry.resolve(registry.LAUNCHERS.get(layout.launcher).plan)(layout, env)


def _workers_for_gpus(layout, workers):
    if layout.gpus_per_node and workers > layout.gpus_per_node:
        raise ConfigError(f"{workers} workers on one node but --gpus-per-node is "
                          f"{layout.gpus_per_node}: two workers would share a GPU")


def _threads(layout, env, cores, workers_per_node):
    if layout.threads is not None:
        return layout.threads
    if env.get("OMP_NUM_THREADS", "").isdigit() and int(env["OMP_NUM_THREADS"]) >= 1:
        return int(env["OMP_NUM_THREADS"])   # the user's explicit choice wins
    return max(1, cores // workers_per_node)


def plan_hosts(layout: Layout, env: Mapping[str, str]) -> Plan:
    """Hosts and slots for launchers that start workers over ssh (horovodrun, mpirun)."""
    default_slots = layout.workers_per_node or layout.gpus_per_node or None
    hosts = layout.hosts
    if layout.elastic and not (layout.hostfile or hosts):
        raise ConfigError("--elastic needs --hostfile (re-read while the job runs) or --hosts")
    if not hosts:
        if layout.np is None:
            raise ConfigError("give --np (workers on this machine) or --hosts/--hostfile")
        hosts = (("localhost", layout.np),)
    filled = []
    for name, slots in hosts:
        if slots is None:
            if default_slots is None:
                raise ConfigError(f"host {name} has no slot count: write {name}:N or give "
                                  "--gpus-per-node / --workers-per-node")
            slots = default_slots
        filled.append((name, slots))
    hosts = tuple(filled)
    capacity = sum(slots for _, slots in hosts)
    np_ = layout.np if layout.np is not None else capacity
    if np_ > capacity and not layout.elastic:
        raise ConfigError(f"--np {np_} needs {np_} slots but the hosts offer {capacity} "
                          f"({format_hosts(hosts)})")
    if layout.elastic:
        if layout.min_np is not None and layout.min_np > np_:
            raise ConfigError(f"--min-np {layout.min_np} is larger than --np {np_}")
        if layout.max_np is not None and layout.max_np < np_:
            raise ConfigError(f"--max-np {layout.max_np} is smaller than --np {np_}")
    # -map-by slot fills hosts in order, so the busiest node is the first ones filled.
    left, per_node = np_, []
    for _, slots in hosts:
        take = min(slots, left)
        if take:
            per_node.append(take)
        left -= take
    workers_per_node = max(per_node)
    for (name, slots) in hosts:
        if layout.gpus_per_node and slots > layout.gpus_per_node:
            raise ConfigError(f"host {name} has {slots} slots but --gpus-per-node is "
                              f"{layout.gpus_per_node}: two workers would share a GPU")
    _workers_for_gpus(layout, workers_per_node)
    cores = layout.cores_per_node or 1
    threads = _threads(layout, env, cores, workers_per_node)
    return Plan(np=np_, hosts=hosts, workers_per_node=workers_per_node,
                nodes=len(per_node), threads=threads,
                cpus_per_task=max(1, cores // workers_per_node))


def _env_int(env, name):
    value = env.get(name, "")
    return int(value) if value.isdigit() and int(value) >= 1 else None


def plan_srun(layout: Layout, env: Mapping[str, str]) -> Plan:
    """Nodes and tasks inside a SLURM allocation."""
    if layout.hosts or layout.hostfile:
        raise ConfigError("srun takes its nodes from the SLURM allocation; drop --hosts/--hostfile")
    np_ = layout.np or _env_int(env, "SLURM_NTASKS")
    if np_ is None:
        raise ConfigError("give --np: SLURM_NTASKS is not set (not inside an allocation?)")
    nodes_allocated = _env_int(env, "SLURM_JOB_NUM_NODES") or _env_int(env, "SLURM_NNODES")
    workers_per_node = layout.workers_per_node or layout.gpus_per_node or None
    if workers_per_node is None:
        workers_per_node = math.ceil(np_ / nodes_allocated) if nodes_allocated else np_
    workers_per_node = min(workers_per_node, np_)
    _workers_for_gpus(layout, workers_per_node)
    nodes = math.ceil(np_ / workers_per_node)
    if nodes_allocated is not None and nodes > nodes_allocated:
        raise ConfigError(f"--np {np_} at {workers_per_node} per node needs {nodes} nodes "
                          f"but the allocation has {nodes_allocated}")
    cores = layout.cores_per_node or _env_int(env, "SLURM_CPUS_ON_NODE")
    if cores is None:
        raise ConfigError("give --cores-per-node: SLURM_CPUS_ON_NODE is not set")
    if cores < workers_per_node:
        raise ConfigError(f"{workers_per_node} workers per node but only {cores} cores per node")
    threads = _threads(layout, env, cores, workers_per_node)
    return Plan(np=np_, hosts=(), workers_per_node=workers_per_node, nodes=nodes,
                threads=threads, cpus_per_task=cores // workers_per_node)


# ---------------------------------------------------------------------------------------
# plan -> argv


def forwarded_variables(env):
    """Names mpirun must pass on with -x: the fixed list plus NCCL_*/HOROVOD_* that are set.
    Unset names are left out (OpenMPI warns about each one)."""
    names = [n for n in FORWARDED_VARIABLES if n in env]
    names += sorted(n for n in env if n.startswith(FORWARDED_PREFIXES))
    return tuple(names)


def build_command(layout: Layout, env: Mapping[str, str]) -> List[str]:
    """The complete argv for `layout`, given the launching shell's environment `env`."""
    plan = plan_layout(layout, env)
    env = dict(env)
    builder = registry.resolve(registry.LAUNCHERS.get(layout.launcher).command)
    return builder(layout, plan, env)


def _exe(layout):
    return layout.launcher_path or layout.launcher


def mpirun_command(layout: Layout, plan: Plan, env: Mapping[str, str]) -> List[str]:
    argv = []
    if layout.is_root:
        # mpirun refuses root without the flag; the variables also cover MPI started inside.
        argv += ["env", *(f"{k}={v}" for k, v in ROOT_ENV)]
    argv += [_exe(layout), "-np", str(plan.np), "-H", format_hosts(plan.hosts),
             "-bind-to", "none", "-map-by", "slot"]
    if layout.is_root:
        argv.append("--allow-run-as-root")
    for key, value in layout.mca:
        argv += ["-mca", key, value]
    if layout.network_interface:
        argv += ["-mca", "btl_tcp_if_include", layout.network_interface]
    if layout.ssh_port is not None:
        argv += ["-mca", "plm_rsh_args", f"-p {layout.ssh_port}"]
    argv += ["-x", f"OMP_NUM_THREADS={plan.threads}"]
    names = [n for n in forwarded_variables(env) if n != "OMP_NUM_THREADS"]
    if layout.network_interface and "NCCL_SOCKET_IFNAME" not in env:
        argv += ["-x", f"NCCL_SOCKET_IFNAME={layout.network_interface}"]
    if layout.gpus_per_node and "NCCL_DEBUG" not in env:
        argv += ["-x", "NCCL_DEBUG=WARN"]   # NCCL explains its failures only when asked
    for name in names:
        argv += ["-x", name]
    return argv + list(layout.launcher_args) + list(layout.command)


def uses_gloo_rendezvous(layout: Layout) -> bool:
    """horovodrun starts a Gloo rendezvous server unless told to use MPI."""
    return layout.launcher == "horovodrun" and layout.controller != "mpi"


def rendezvous_warning(layout: Layout) -> Optional[str]:
    """The warning for a Gloo rendezvous that would listen on every interface."""
    if uses_gloo_rendezvous(layout) and (layout.rendezvous_addr == ALL_INTERFACES or (
            layout.rendezvous_addr is None and not layout.network_interface)):
        return ("the Gloo rendezvous (horovodrun's key-value store; it checks no key) will listen "
                "on every interface (0.0.0.0): give --network-interface or --rendezvous-addr to "
                "bind it to the training network, or --controller mpi on a shared network "
                "(docs/cluster.md, 'Rendezvous')")
    return None


def _horovodrun_exe(layout):
    """horovodrun, or hvdscale.rendezvous running horovodrun with the Gloo rendezvous bound to
    --rendezvous-addr, else to the address of --network-interface (looked up when it runs)."""
    if not uses_gloo_rendezvous(layout):
        return [_exe(layout)]
    if layout.rendezvous_addr:
        where = ["--bind", layout.rendezvous_addr]
    elif layout.network_interface:
        where = ["--bind-interface", layout.network_interface]
    else:
        return [_exe(layout)]
    exe = [layout.python, "-m", "hvdscale.rendezvous", *where]
    if layout.rendezvous_port:
        exe += ["--port", str(layout.rendezvous_port)]
    return exe + ["--"]


def horovodrun_command(layout: Layout, plan: Plan, env: Mapping[str, str]) -> List[str]:
    # horovodrun passes its whole environment on to every worker, local or remote.
    extra_env = [f"OMP_NUM_THREADS={plan.threads}"]
    if layout.is_root:
        extra_env += [f"{k}={v}" for k, v in ROOT_ENV]
    if layout.gpus_per_node and "NCCL_DEBUG" not in env:
        extra_env.append("NCCL_DEBUG=WARN")
    if layout.elastic and layout.hostfile:
        extra_env.append(f"HVDSCALE_HOSTS_FILE={layout.hostfile}")
        default_slots = layout.workers_per_node or layout.gpus_per_node
        if default_slots:   # for hosts added to the file later without a count
            extra_env.append(f"HVDSCALE_SLOTS={default_slots}")
    argv = ["env", *extra_env, *_horovodrun_exe(layout), "-np", str(plan.np)]
    if layout.elastic:
        if layout.min_np is not None:
            argv += ["--min-np", str(layout.min_np)]
        if layout.max_np is not None:
            argv += ["--max-np", str(layout.max_np)]
        if layout.hostfile:
            argv += ["--host-discovery-script", str(DISCOVERY_SCRIPT)]
        else:
            argv += ["-H", format_hosts(plan.hosts)]
    else:
        argv += ["-H", format_hosts(plan.hosts)]
    if layout.controller:
        argv.append(f"--{layout.controller}")
    if layout.network_interface:
        argv += ["--network-interface", layout.network_interface]
    if layout.ssh_port is not None:
        argv += ["--ssh-port", str(layout.ssh_port)]
    return argv + list(layout.launcher_args) + list(layout.command)


def srun_command(layout: Layout, plan: Plan, env: Mapping[str, str]) -> List[str]:
    exports = [f"OMP_NUM_THREADS={plan.threads}"]
    if layout.network_interface and "NCCL_SOCKET_IFNAME" not in env:
        exports.append(f"NCCL_SOCKET_IFNAME={layout.network_interface}")
    if layout.gpus_per_node and "NCCL_DEBUG" not in env:
        exports.append("NCCL_DEBUG=WARN")
    argv = [_exe(layout), "--nodes", str(plan.nodes), "--ntasks", str(plan.np),
            "--ntasks-per-node", str(plan.workers_per_node),
            "--cpus-per-task", str(plan.cpus_per_task),
            f"--mpi={layout.srun_mpi}", "--kill-on-bad-exit=1",
            "--export=" + ",".join(["ALL", *exports])]
    return argv + list(layout.launcher_args) + list(layout.command)


def format_command(argv: Sequence[str]) -> str:
    """One shell line that runs exactly `argv` (what --dry-run prints)."""
    return shlex.join(argv)


def parse_mca(items: Sequence[str], defaults=True):
    """`--mca key=value` options over the defaults: a key given replaces the default's value."""
    mca = dict(DEFAULT_MCA) if defaults else {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key or not value:
            raise ConfigError(f"--mca {item!r}: write KEY=VALUE, e.g. --mca btl_tcp_if_include=eth0")
        mca[key] = value
    return tuple(mca.items())
