"""Facts about the machine `hvdscale launch` runs on, and checks of its environment made
before anything starts (so a mistake is one line, not a traceback from Horovod or MPI)."""
import shutil
import socket
import sys
from pathlib import Path
from typing import Dict, List, Mapping, Optional

from hvdscale.errors import ConfigError

# What a launcher sets in each worker's environment. Found in the environment of
# `hvdscale launch` itself they are left over from another job (a launch from inside a
# worker, an exported script variable) and would reach the new workers: mpirun's local
# workers inherit them, and hvdscale and Horovod read HOROVOD_RANK/SIZE before MPI's.
RANK_VARIABLES = ("HOROVOD_RANK", "HOROVOD_SIZE", "HOROVOD_LOCAL_RANK", "HOROVOD_LOCAL_SIZE",
                  "HOROVOD_CROSS_RANK", "HOROVOD_CROSS_SIZE", "OMPI_COMM_WORLD_RANK",
                  "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "PMI_RANK", "PMI_SIZE",
                  "PMIX_RANK")


def interface_addresses() -> Dict[str, List[str]]:
    """{interface: [IPv4 address, ...]} of this machine."""
    import psutil
    return {name: [a.address for a in addrs if a.family == socket.AF_INET]
            for name, addrs in psutil.net_if_addrs().items()}


def check_environment(env: Mapping[str, str], network_interface: Optional[str],
                      interfaces: Optional[Mapping[str, List[str]]] = None) -> None:
    """One-line ConfigErrors for what would make the launch fail inside Horovod/MPI: rank
    variables of another job, a --network-interface this machine does not have."""
    stale = [f"{name}={env[name]}" for name in RANK_VARIABLES if name in env]
    if stale:
        raise ConfigError(f"the environment holds another job's rank variables "
                          f"({', '.join(stale)}): unset them (env -u NAME ...) before "
                          f"hvdscale launch")
    if network_interface:
        if interfaces is None:
            interfaces = interface_addresses()
        if network_interface not in interfaces:
            raise ConfigError(f"--network-interface {network_interface}: no such interface "
                              f"on this machine (it has {', '.join(sorted(interfaces))})")


def next_to_interpreter(name: str, env: Mapping[str, str]) -> Optional[str]:
    """A bare program name that is not on PATH but is installed next to this Python (the
    .venv's hvdscale or horovodrun) becomes that absolute path, so workers run this install."""
    if not name or "/" in name or shutil.which(name, path=env.get("PATH")):
        return None
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else None
