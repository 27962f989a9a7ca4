"""Run horovodrun with its Gloo rendezvous server bound to one address.

horovodrun (Horovod 0.28) starts the Gloo rendezvous, an HTTP key-value store that checks no
key, on every interface (`('', port)`) at a random port, and has no option to change either.
This wrapper runs horovodrun's own command line in this process with the rendezvous server
bound to (ADDR, PORT), and tells the workers that same address (HOROVOD_GLOO_RENDEZVOUS_ADDR
is what Horovod calls the driver address). `hvdscale launch` puts it in front of horovodrun
whenever the Gloo controller may be used (hvdscale.launch.rendezvous decides where):

    python -m hvdscale.launch.horovodrun --bind 10.0.0.5 [--port 29400] -- -np 4 -H a:2,b:2 --gloo CMD
    python -m hvdscale.launch.horovodrun --bind-interface ib0 -- ... --network-interface ib0 CMD

Only the rendezvous server changes. Horovod's other launcher services (host checks, elastic
notifications) keep their own ports; their messages are signed with a per-job key.
"""
import argparse
import sys
from typing import List, Optional

from hvdscale.errors import ConfigError
from hvdscale.launch.rendezvous import (ALL_INTERFACES, check_address, check_port,
                                        interface_address)


def bind_rendezvous(addr: str, port: int = 0) -> None:
    """Make horovodrun's RendezvousServer listen on (addr, port) only (port 0: any free one)
    and hand `addr` to the workers as the rendezvous address."""
    from horovod.runner.http import http_server
    from horovod.runner.util import network, threads

    def start(self, handler_cls=http_server.RendezvousHandler):
        # Horovod's own start() with the address fixed instead of find_port's ('', random).
        try:
            self._httpd = http_server.RendezvousHTTPServer((addr, port), handler_cls, self._verbose)
        except OSError as err:
            raise ConfigError(f"Gloo rendezvous: cannot listen on {addr}:{port} "
                              f"({err.strerror or err}); check --rendezvous-addr/--rendezvous-port")
        self._listen_thread = threads.in_thread(target=self._httpd.serve_forever)
        return self._httpd.server_address[1]

    http_server.RendezvousServer.start = start
    if addr != ALL_INTERFACES:
        # Every caller (static and elastic Gloo, run-function mode) asks this for the
        # address it passes to the workers; it must be the one listened on.
        network.get_driver_ip = lambda nics: addr


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hvdscale.launch.horovodrun",
                                     description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--bind", metavar="ADDR",
                       help="IPv4 address for the rendezvous server (0.0.0.0: every interface)")
    where.add_argument("--bind-interface", metavar="NIC",
                       help="listen on this interface's IPv4 address (horovodrun's "
                            "--network-interface)")
    parser.add_argument("--port", type=int, default=0, help="its port (default: any free one)")
    parser.add_argument("horovodrun_args", nargs=argparse.REMAINDER,
                        help="-- then horovodrun's arguments")
    args = parser.parse_args(argv)
    rest = args.horovodrun_args
    if rest and rest[0] == "--":
        rest = rest[1:]
    try:
        addr = (check_address(args.bind, "--bind") if args.bind
                else interface_address(args.bind_interface))
        port = check_port(args.port or None, "--port") or 0
    except ConfigError as err:
        parser.error(str(err))
    bind_rendezvous(addr, port)
    from horovod.runner.launch import run_commandline
    sys.argv = ["horovodrun", *rest]
    try:
        run_commandline()
    except ConfigError as err:
        print(f"horovodrun: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
