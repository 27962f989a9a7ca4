"""`hvdscale launch`: build the horovodrun / mpirun / srun command for a layout, then print it
(--dry-run) or run it.

    hvdscale launch --launcher mpirun --np 8 --hosts node1:4,node2:4 --gpus-per-node 4 \\
        -- hvdscale train pipelines/imagenet_resnet50_goyal.yaml

This module only gathers facts (options, environment, cores, uid) into a Layout; the command
itself comes from the pure builder in the hvdscale.launch package.
"""
import argparse
import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path

from hvdscale import launch, registry
from hvdscale.errors import ConfigError
from hvdscale.launch import machine, rendezvous


def add_arguments(parser):
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = ("The worker command goes after '--'. OMP_NUM_THREADS is cores per node // "
                     "workers per node unless --threads or OMP_NUM_THREADS says otherwise.")
    launchers = "; ".join(f"{info.name}: {info.description}" for info in registry.LAUNCHERS)
    parser.add_argument("--launcher", choices=registry.LAUNCHERS.names(), default="horovodrun",
                        help=f"what starts the workers (default: horovodrun). {launchers}")
    parser.add_argument("--np", type=int, help="number of workers (default: all slots; srun: SLURM_NTASKS)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--hosts", help="host:slots list, e.g. node1:4,node2:4 (default: localhost:NP)")
    where.add_argument("--hostfile", help="file of 'host', 'host:N' or 'host slots=N' lines")
    parser.add_argument("--gpus-per-node", type=int, default=0,
                        help="GPUs per node: one worker per GPU (default 0: CPU workers)")
    parser.add_argument("--workers-per-node", type=int,
                        help="workers per node when that is not the GPU count (CPU jobs)")
    parser.add_argument("--cores-per-node", type=int,
                        help="CPU cores per node (default: this machine's; srun: SLURM_CPUS_ON_NODE)")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for each worker")
    parser.add_argument("--controller", choices=launch.CONTROLLERS,
                        help="horovodrun: --gloo or --mpi (default: horovodrun's choice, MPI when "
                             "Horovod has it; `hvdscale doctor` shows it)")
    parser.add_argument("--network-interface", help="NIC for Horovod/NCCL/MPI traffic, e.g. ib0")
    parser.add_argument("--ssh-port", type=int, help="sshd port on the other hosts (containers)")
    parser.add_argument("--rendezvous-addr", metavar="ADDR",
                        help="horovodrun/Gloo: IPv4 address the rendezvous server listens on "
                             "(default: 127.0.0.1 for one machine, else the address of "
                             "--network-interface; 0.0.0.0 = every interface, warned about)")
    parser.add_argument("--rendezvous-port", type=int, metavar="PORT",
                        help="horovodrun/Gloo: the rendezvous server's port, for a firewall rule "
                             "(default: any free port)")
    parser.add_argument("--mpi", dest="srun_mpi", default="pmix", choices=launch.SRUN_MPI_PLUGINS,
                        help="srun's PMI plugin, the one SLURM and OpenMPI share (default pmix)")
    parser.add_argument("--mca", action="append", default=[], metavar="KEY=VALUE",
                        help="mpirun MCA parameter; replaces the default for the same key "
                             "(defaults: pml=ob1, btl=^openib)")
    parser.add_argument("--no-default-mca", action="store_true",
                        help="mpirun: leave out -mca pml ob1 -mca btl ^openib (UCX/InfiniBand)")
    parser.add_argument("--elastic", action="store_true",
                        help="horovodrun elastic job; with --hostfile the file is re-read while "
                             "running, so editing it adds or removes hosts")
    parser.add_argument("--min-np", type=int, help="elastic: fewest workers to keep going")
    parser.add_argument("--max-np", type=int, help="elastic: most workers to scale up to")
    parser.add_argument("--launcher-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for the launcher, passed as is (repeatable; "
                             "write --launcher-arg=--verbose for options)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the command as one shell line and exit")
    parser.add_argument("program", nargs=argparse.REMAINDER, help="-- the worker command")


def layout_from_args(args, env, cores, is_root, interfaces=None):
    """The Layout for parsed options; `env`, `cores`, `is_root` and `interfaces`
    ({name: [IPv4, ...]}, default: this machine's) describe this machine."""
    if interfaces is None:
        interfaces = machine.interface_addresses()
    program = list(args.program)
    if program and program[0] == "--":
        program = program[1:]
    hosts, hostfile = (), None
    if args.hosts:
        hosts = launch.parse_hosts(args.hosts)
    elif args.hostfile:
        hosts = launch.read_hostfile(args.hostfile)
        hostfile = str(Path(args.hostfile).resolve())
    cores_per_node = args.cores_per_node
    if cores_per_node is None and args.launcher != "srun":
        cores_per_node = cores   # the other nodes are assumed to be like this one
    return launch.Layout(
        launcher=args.launcher, command=tuple(program), np=args.np, hosts=hosts,
        gpus_per_node=args.gpus_per_node, workers_per_node=args.workers_per_node,
        cores_per_node=cores_per_node, threads=args.threads, controller=args.controller,
        network_interface=args.network_interface, ssh_port=args.ssh_port,
        srun_mpi=args.srun_mpi, mca=launch.parse_mca(args.mca, defaults=not args.no_default_mca),
        elastic=args.elastic, min_np=args.min_np, max_np=args.max_np,
        hostfile=hostfile if args.elastic else None, is_root=is_root,
        launcher_args=tuple(args.launcher_arg),
        rendezvous_addr=rendezvous.rendezvous_address(
            args.rendezvous_addr, launcher=args.launcher, controller=args.controller,
            elastic=args.elastic, hosts=hosts, interfaces=interfaces),
        rendezvous_port=rendezvous.check_port(args.rendezvous_port))


def run(args):
    env = dict(os.environ)
    if not args.dry_run:        # a dry run may print a command for another machine
        machine.check_environment(env, args.network_interface)
    layout = layout_from_args(args, env, cores=os.cpu_count() or 1, is_root=os.geteuid() == 0)
    if layout.command:
        resolved = machine.next_to_interpreter(layout.command[0], env)
        if resolved:
            layout = replace(layout, command=(resolved, *layout.command[1:]))
    launcher_path = machine.next_to_interpreter(layout.launcher, env)
    if launcher_path:
        layout = replace(layout, launcher_path=launcher_path)
    argv = launch.build_command(layout, env)
    warning = launch.rendezvous_warning(layout)
    if warning:
        print(f"hvdscale launch: warning: {warning}", file=sys.stderr)
    if args.dry_run:
        print(launch.format_command(argv))
        return 0
    exe = launcher_path or layout.launcher
    if shutil.which(exe, path=env.get("PATH")) is None:
        hint = registry.LAUNCHERS.get(layout.launcher).missing
        raise ConfigError(f"{exe} not found on PATH: {hint}, or pick another --launcher")
    sys.stdout.flush()
    os.execvpe(argv[0], argv, env)
