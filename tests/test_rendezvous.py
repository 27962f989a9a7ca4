"""horovodrun's Gloo rendezvous bound to one address (hvdscale/launch/horovodrun.py): the commands
`hvdscale launch` builds for it, the warning for every-interface listening, refused options,
the server really listening on the address only, and a real horovodrun -np 2 job through it.
The multi-host case (bound to --network-interface on another host's network) is in
tests/test_multihost.py."""
import argparse
import json
import subprocess
import sys

import psutil
import pytest

from conftest import REPO, WORKERS, job_env, run_job, tool
from hvdscale import launch
from hvdscale.commands import launch as launch_cmd
from hvdscale.errors import ConfigError

TRAIN = ("hvdscale", "train", "pipelines/fashion_mnist_lamb.yaml")
ENV = {"PATH": "/usr/bin:/bin"}
RENDEZVOUS = [sys.executable, "-m", "hvdscale.launch.horovodrun"]


def layout_for(*options, interfaces=None):
    parser = argparse.ArgumentParser()
    launch_cmd.add_arguments(parser)
    args = parser.parse_args([*options, "--", *TRAIN])
    return launch_cmd.layout_from_args(args, ENV, cores=4, is_root=False,
                                       interfaces=interfaces or {"lo": ["127.0.0.1"]})


def command_for(*options, **kw):
    layout = layout_for(*options, **kw)
    return launch.build_command(layout, ENV), launch.rendezvous_warning(layout)


def test_one_machine_listens_on_loopback_only():
    argv, warning = command_for("--np", "2", "--controller", "gloo")
    assert argv[2:] == [*RENDEZVOUS, "--bind", "127.0.0.1", "--", "-np", "2", "-H",
                        "localhost:2", "--gloo", *TRAIN]
    assert warning is None
    argv, _ = command_for("--hosts", "localhost:2")       # horovodrun's choice of controller
    assert argv[2:7] == [*RENDEZVOUS, "--bind", "127.0.0.1"]


def test_other_hosts_bind_to_the_interface_or_the_given_address():
    argv, warning = command_for("--hosts", "node1:2,node2:2", "--controller", "gloo",
                                "--network-interface", "ib0", "--rendezvous-port", "29400")
    assert argv[2:10] == [*RENDEZVOUS, "--bind-interface", "ib0", "--port", "29400", "--"]
    assert argv[-5:-3] == ["--network-interface", "ib0"] and warning is None
    argv, warning = command_for("--hosts", "node1:2,node2:2", "--rendezvous-addr", "10.0.0.5")
    assert argv[2:8] == [*RENDEZVOUS, "--bind", "10.0.0.5", "--"] and warning is None


def test_every_interface_is_warned_about():
    for options in (["--hosts", "node1:2,node2:2", "--controller", "gloo"],
                    ["--hosts", "node1:2,node2:2", "--rendezvous-addr", "0.0.0.0"]):
        argv, warning = command_for(*options)
        assert "0.0.0.0" in warning and "--controller mpi" in warning
    # elastic jobs may gain hosts later: never loopback, and warned about without a NIC
    argv, warning = command_for("--elastic", "--hosts", "localhost:2,node2:2", "--np", "2")
    assert "--bind" not in argv and warning is not None
    argv, warning = command_for("--elastic", "--hosts", "localhost:2,node2:2", "--np", "2",
                                "--network-interface", "eth0")
    assert "--bind-interface" in argv and warning is None


def test_mpi_starts_no_rendezvous():
    for options in (["--controller", "mpi"], ["--launcher", "mpirun"]):
        argv, warning = command_for("--hosts", "node1:2,node2:2", *options)
        assert "hvdscale.launch.horovodrun" not in argv and warning is None
    with pytest.raises(ConfigError, match="only apply to horovodrun's Gloo controller"):
        command_for("--np", "2", "--controller", "mpi", "--rendezvous-port", "29400")
    with pytest.raises(ConfigError, match="only apply to horovodrun's Gloo controller"):
        command_for("--np", "2", "--launcher", "mpirun", "--rendezvous-addr", "10.0.0.5")


@pytest.mark.parametrize("options, message", [
    (["--rendezvous-addr", "node1"], "--rendezvous-addr 'node1' is not an IPv4 address"),
    (["--rendezvous-port", "70000"], "--rendezvous-port must be between 1 and 65535"),
])
def test_bad_rendezvous_options_are_refused(options, message):
    with pytest.raises(ConfigError, match=message):
        command_for("--np", "2", *options)


def _other_local_address():
    for name, addrs in psutil.net_if_addrs().items():
        for a in addrs:
            if a.family.name == "AF_INET" and not a.address.startswith("127."):
                return a.address
    return None


def test_bound_server_listens_on_that_address_only():
    """Horovod's own RendezvousServer, started after bind_rendezvous (in a fresh interpreter,
    so this one's Horovod is left unpatched)."""
    other = _other_local_address()
    if other is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    code = f"""
import socket
from hvdscale.launch.horovodrun import bind_rendezvous
bind_rendezvous("127.0.0.1")
from horovod.runner.http.http_server import RendezvousServer
from horovod.runner.util import network
server = RendezvousServer()
port = server.start()
def reach(a):
    try:
        socket.create_connection((a, port), timeout=5).close(); return True
    except OSError:
        return False
print(port, reach("127.0.0.1"), reach({other!r}), network.get_driver_ip(["lo"]))
server.stop()
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=job_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    port, on_loopback, on_other, driver_ip = proc.stdout.split()
    assert int(port) > 0 and on_loopback == "True" and on_other == "False"
    assert driver_ip == "127.0.0.1"


def test_busy_port_is_one_line_naming_it():
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([*RENDEZVOUS, "--bind", "127.0.0.1", "--port", str(port), "--",
                               "-np", "1", "-H", "localhost:1", "--gloo", "true"],
                              capture_output=True, text=True, timeout=120, env=job_env(), cwd=REPO)
    assert proc.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.multiproc
def test_two_workers_through_hvdscale_launch_meet_on_loopback(tmp_path):
    """hvdscale launch --np 2 --controller gloo: the workers are given 127.0.0.1, reach the
    rendezvous there and not at this machine's other address, and their allreduce works."""
    other = _other_local_address()
    run_job([tool("hvdscale"), "launch", "--np", "2", "--controller", "gloo", "--",
             sys.executable, WORKERS / "rendezvous_probe.py", tmp_path, other or ""],
            timeout=180)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rendezvous-rank{rank}.json").read_text())
        assert got["addr"] == "127.0.0.1" and got["reach_given"] is True
        assert got["size"] == 2 and got["sum"] == 3.0
        if other:
            assert got["reach"] == {other: False}


def test_missing_interface_is_one_line_before_anything_starts(capsys):
    from hvdscale.launch import horovodrun
    with pytest.raises(SystemExit) as stop:
        horovodrun.main(["--bind-interface", "nosuch0", "--", "-np", "1", "true"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "--network-interface nosuch0: this machine (the launcher) has no IPv4 address" in err
