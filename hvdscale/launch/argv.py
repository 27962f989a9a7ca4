"""Plan -> argv: the horovodrun / mpirun / srun command line for a job layout.

`build_command(layout, env)` is a pure function: it reads nothing but its two arguments, so
tests check the exact argv for any layout and environment without starting anything. The
`hvdscale launch` sub-command (hvdscale/commands/launch.py) fills a `Layout` from its options
and this machine, then prints (--dry-run) or execs the result.

Rules the builders apply, because each one costs a queue wait when forgotten:
- every worker gets OMP_NUM_THREADS (hvdscale.launch.plan), passed explicitly on the command
  line so that remote nodes see it too;
- mpirun: `-bind-to none -map-by slot` (bound workers would share one core), the environment
  that matters is forwarded with `-x` (PATH, LD_LIBRARY_PATH, PYTHONPATH and every NCCL_* /
  HOROVOD_* variable that is set), `-mca pml ob1 -mca btl ^openib` unless overridden, and
  `--allow-run-as-root` only when running as root;
- horovodrun: run through `python -m hvdscale.launch.horovodrun` when its Gloo rendezvous is
  to be bound (hvdscale.launch.rendezvous);
- srun: `--ntasks`, `--ntasks-per-node`, `--cpus-per-task`, `--mpi=pmix|pmi2`, and
  `--kill-on-bad-exit=1` so one failed rank ends the step instead of hanging the others.
"""
import shlex
from typing import List, Mapping, Sequence

from hvdscale import registry
from hvdscale.launch.hosts import DISCOVERY_SCRIPT, format_hosts
from hvdscale.launch.layout import Layout, Plan
from hvdscale.launch.plan import plan_layout
from hvdscale.launch.rendezvous import uses_gloo_rendezvous

# Forwarded to mpirun workers when set; NCCL_* and HOROVOD_* are added by prefix.
FORWARDED_VARIABLES = ("PATH", "LD_LIBRARY_PATH", "PYTHONPATH")
FORWARDED_PREFIXES = ("NCCL_", "HOROVOD_")
ROOT_ENV = (("OMPI_ALLOW_RUN_AS_ROOT", "1"), ("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1"))
# The module horovodrun runs through when its Gloo rendezvous is bound.
BOUND_HOROVODRUN = "hvdscale.launch.horovodrun"


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


def _horovodrun_exe(layout):
    """horovodrun, or hvdscale.launch.horovodrun running it with the Gloo rendezvous bound to
    --rendezvous-addr, else to the address of --network-interface (looked up when it runs)."""
    if not uses_gloo_rendezvous(layout):
        return [_exe(layout)]
    if layout.rendezvous_addr:
        where = ["--bind", layout.rendezvous_addr]
    elif layout.network_interface:
        where = ["--bind-interface", layout.network_interface]
    else:
        return [_exe(layout)]
    exe = [layout.python, "-m", BOUND_HOROVODRUN, *where]
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
