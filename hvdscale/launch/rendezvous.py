"""Where horovodrun's Gloo rendezvous listens.

horovodrun (Horovod 0.28) starts the Gloo rendezvous, an HTTP key-value store that checks no
key, on every interface at a random port. `hvdscale launch` binds it instead: to loopback when
every worker is on this machine, else to --rendezvous-addr or the address of
--network-interface, by running horovodrun through `python -m hvdscale.launch.horovodrun`
(hvdscale/launch/horovodrun.py); it warns when nothing narrows it. MPI starts no rendezvous
server, so none of this applies to --controller mpi, mpirun or srun.
"""
import ipaddress
import socket
from typing import Iterable, Mapping, Optional, Sequence

from hvdscale.errors import ConfigError

ALL_INTERFACES = "0.0.0.0"
LOOPBACK = "127.0.0.1"


def check_address(addr: str, where: str = "--rendezvous-addr") -> str:
    """An IPv4 address (what Horovod's workers are given) or a ConfigError naming `where`."""
    try:
        return str(ipaddress.IPv4Address(addr))
    except ValueError:
        raise ConfigError(f"{where} {addr!r} is not an IPv4 address") from None


def check_port(port: Optional[int], where: str = "--rendezvous-port") -> Optional[int]:
    if port is not None and not 1 <= port <= 65535:
        raise ConfigError(f"{where} must be between 1 and 65535, got {port}")
    return port


def uses_gloo_rendezvous(layout) -> bool:
    """horovodrun starts a Gloo rendezvous server unless told to use MPI."""
    return layout.launcher == "horovodrun" and layout.controller != "mpi"


def rendezvous_address(requested: Optional[str], *, launcher: str, controller: Optional[str],
                       elastic: bool, hosts: Iterable, interfaces: Mapping[str, Sequence[str]]
                       ) -> Optional[str]:
    """Where the rendezvous listens: the address `requested`, else loopback when every worker
    is on this machine; None leaves it to the command builder (the address of
    --network-interface, or every interface with a warning). `interfaces` maps this
    machine's interface names to their IPv4 addresses."""
    if requested:
        return check_address(requested)
    if launcher != "horovodrun" or controller == "mpi":
        return None
    # Elastic jobs may gain remote hosts later, so they never get loopback.
    if not elastic and all(is_local(name, interfaces) for name, _ in hosts):
        return LOOPBACK      # (no hosts = localhost)
    return None


def rendezvous_warning(layout) -> Optional[str]:
    """The warning for a Gloo rendezvous that would listen on every interface."""
    if uses_gloo_rendezvous(layout) and (layout.rendezvous_addr == ALL_INTERFACES or (
            layout.rendezvous_addr is None and not layout.network_interface)):
        return ("the Gloo rendezvous (horovodrun's key-value store; it checks no key) will listen "
                "on every interface (0.0.0.0): give --network-interface or --rendezvous-addr to "
                "bind it to the training network, or --controller mpi on a shared network "
                "(docs/cluster.md, 'Rendezvous')")
    return None


def local_addresses(interfaces: Mapping[str, Sequence[str]]) -> set:
    return {addr for addrs in interfaces.values() for addr in addrs}


def is_local(host: str, interfaces: Mapping[str, Sequence[str]]) -> bool:
    """`host` resolves to an address of this machine (or loopback)."""
    try:
        return socket.gethostbyname(host) in local_addresses(interfaces) | {LOOPBACK}
    except OSError:
        return False


def interface_address(nic: str) -> str:
    """This machine's first IPv4 address on `nic`."""
    import psutil
    for addr in psutil.net_if_addrs().get(nic, ()):
        if addr.family == socket.AF_INET:
            return addr.address
    raise ConfigError(f"--network-interface {nic}: this machine (the launcher) has no IPv4 "
                      "address on it, so the workers could not reach its rendezvous")
