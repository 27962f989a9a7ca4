"""Layout -> Plan: check a layout, then derive worker counts, hosts and threads with the
launcher's planner (`LauncherInfo.plan`): `plan_hosts` for launchers that start workers over
ssh on listed hosts (horovodrun, mpirun), `plan_srun` inside a SLURM allocation.

Every worker gets OMP_NUM_THREADS = cores per node // workers per node (at least 1) unless
--threads or the user's OMP_NUM_THREADS says otherwise."""
import math
from typing import Mapping

from hvdscale import registry
from hvdscale.errors import ConfigError
from hvdscale.launch.hosts import format_hosts
from hvdscale.launch.layout import CONTROLLERS, SRUN_MPI_PLUGINS, Layout, Plan
from hvdscale.launch.rendezvous import uses_gloo_rendezvous


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
