"""Launching workers: `hvdscale launch` turns a job layout into one horovodrun / mpirun / srun
command line (hvdscale/commands/launch.py is the thin CLI over this package).

    layout.py      Layout (what the options and this machine say) and Plan (what it resolves
                   to); horovodrun's default controller; --mca values
    hosts.py       --hosts / hostfile parsing, the elastic host-discovery script
    plan.py        Layout -> Plan: checks, hosts and slots, SLURM allocations, threads
    argv.py        Plan -> argv for each registered launcher (hvdscale.registry.LAUNCHERS)
    rendezvous.py  where horovodrun's Gloo rendezvous listens, and the warning when anywhere
    horovodrun.py  `python -m hvdscale.launch.horovodrun`: horovodrun with that rendezvous
                   bound (not imported here: it runs as __main__)
    machine.py     this machine's interfaces and environment checks made before launching

Building a command is pure (no process, no lookup of this machine), so tests check the exact
argv of any layout.
"""
from hvdscale import registry
from hvdscale.launch.argv import build_command, format_command, forwarded_variables
from hvdscale.launch.hosts import (DISCOVERY_SCRIPT, format_hosts, parse_hostfile_text,
                                   parse_hosts, read_hostfile)
from hvdscale.launch.layout import (CONTROLLERS, DEFAULT_MCA, SRUN_MPI_PLUGINS, Layout, Plan,
                                    horovodrun_controller, parse_mca)
from hvdscale.launch.plan import plan_hosts, plan_layout, plan_srun
from hvdscale.launch.rendezvous import rendezvous_warning, uses_gloo_rendezvous

# The launchers are entries of hvdscale.registry.LAUNCHERS (name, description, planner and
# command builder); this tuple is the built-in names, for option choices.
LAUNCHERS = registry.LAUNCHERS.names()

__all__ = ["CONTROLLERS", "DEFAULT_MCA", "DISCOVERY_SCRIPT", "LAUNCHERS", "SRUN_MPI_PLUGINS",
           "Layout", "Plan", "build_command", "format_command", "format_hosts",
           "forwarded_variables", "horovodrun_controller", "parse_hostfile_text", "parse_hosts",
           "parse_mca", "plan_hosts", "plan_layout", "plan_srun", "read_hostfile",
           "rendezvous_warning", "uses_gloo_rendezvous"]
