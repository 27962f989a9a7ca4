"""Two "hosts" on one machine for multi-host tests: Linux network namespaces joined by veth
pairs to a bridge, each host running its own sshd with keys made for the test.

    launcher namespace  (bridge hvd0, 10.77.0.254 + 10.77.0.253) -- runs horovodrun
      +-- veth -- host A namespace (hvd0, 10.77.0.1, sshd)
      +-- veth -- host B namespace (hvd0, 10.77.0.2, sshd)

The root namespace is left alone. The hosts and the launcher's bridge are all named `hvd0`,
so `horovodrun --network-interface hvd0` names one NIC present everywhere. Each host (and the
launcher) also has its own host name and /etc/hosts, so `-H hostA:1,hostB:1` resolves. ssh is
reached through a wrapper first on PATH that adds `-F <test ssh_config>` (the test's client
key, no known_hosts writes), so root's ~/.ssh is never touched. The file system is shared, as
on a cluster with a common home: the hosts run the same interpreter and repository.

    cluster = TwoHosts.create(tmp_path)     # raises Unavailable with a reason
    cluster.run_in_launcher([...], env)     # subprocess.run inside the launcher namespace
    cluster.close()                         # kills the sshds, deletes the namespaces
"""
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

SUBNET = "10.77.0"
LAUNCHER_IP = f"{SUBNET}.254"
# a second address of the launcher on the same bridge: a service bound to LAUNCHER_IP must
# not answer there (tests/test_multihost.py, rendezvous binding)
LAUNCHER_OTHER_IP = f"{SUBNET}.253"
IFACE = "hvd0"


class Unavailable(Exception):
    """This machine cannot host the namespaces (not root, no `ip netns`, no sshd, ...)."""


def _ip(*args, check=True):
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


class TwoHosts:
    def __init__(self, workdir, tag):
        self.dir = Path(workdir)
        self.tag = tag
        self.launcher = f"hvdL{tag}"
        self.hosts = {f"hvdA{tag}": f"{SUBNET}.1", f"hvdB{tag}": f"{SUBNET}.2"}
        self.namespaces = []
        self.sshd = []

    # ------------------------------------------------------------------ set-up
    @classmethod
    def create(cls, workdir):
        for tool in ("ip", "ssh", "ssh-keygen"):
            if shutil.which(tool) is None:
                raise Unavailable(f"{tool} is not installed")
        if not Path("/usr/sbin/sshd").exists():
            raise Unavailable("openssh-server (/usr/sbin/sshd) is not installed")
        if os.geteuid() != 0:
            raise Unavailable("network namespaces need root")
        cluster = cls(workdir, uuid.uuid4().hex[:6])
        probe = _ip("netns", "add", cluster.launcher, check=False)
        if probe.returncode != 0:
            raise Unavailable(f"`ip netns add` is not permitted here: {probe.stderr.strip()}")
        cluster.namespaces.append(cluster.launcher)
        try:
            cluster._network()
            cluster._keys()
            for ns, addr in cluster.hosts.items():
                cluster._start_sshd(ns, addr)
            cluster._wait_for_ssh()
        except BaseException:
            cluster.close()
            raise
        return cluster

    def _network(self):
        L = self.launcher
        _ip("-n", L, "link", "set", "lo", "up")
        # the bridge is named like the hosts' interface: horovodrun takes the driver's
        # address from the NIC it chose for the workers, so the launcher needs one too
        _ip("-n", L, "link", "add", IFACE, "type", "bridge")
        _ip("-n", L, "addr", "add", f"{LAUNCHER_IP}/24", "dev", IFACE)
        _ip("-n", L, "addr", "add", f"{LAUNCHER_OTHER_IP}/24", "dev", IFACE)   # secondary
        _ip("-n", L, "link", "set", IFACE, "up")
        for i, (ns, addr) in enumerate(self.hosts.items()):
            _ip("netns", "add", ns)
            self.namespaces.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            # temporary unique names in the launcher namespace, renamed inside the host
            host_end, bridge_end = f"h{i}{self.tag}", f"b{i}{self.tag}"
            _ip("-n", L, "link", "add", host_end, "type", "veth", "peer", "name", bridge_end)
            _ip("-n", L, "link", "set", host_end, "netns", ns)
            _ip("-n", ns, "link", "set", host_end, "name", IFACE)
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", IFACE)
            _ip("-n", ns, "link", "set", IFACE, "up")
            _ip("-n", L, "link", "set", bridge_end, "master", IFACE)
            _ip("-n", L, "link", "set", bridge_end, "up")

    def _keys(self):
        d = self.dir
        d.mkdir(parents=True, exist_ok=True)
        self.hosts_file = d / "hosts"
        self.hosts_file.write_text("127.0.0.1 localhost\n" + "".join(
            f"{addr} {ns}\n" for ns, addr in [*self.hosts.items(),
                                              (self.launcher, LAUNCHER_IP)]))
        for name in ("host_key", "client_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)],
                           check=True, timeout=30)
        shutil.copy(d / "client_key.pub", d / "authorized_keys")
        os.chmod(d / "authorized_keys", 0o600)
        (d / "ssh_config").write_text(
            "Host *\n"
            f"  IdentityFile {d / 'client_key'}\n"
            "  IdentitiesOnly yes\n"
            "  StrictHostKeyChecking no\n"
            "  UserKnownHostsFile /dev/null\n"
            "  GlobalKnownHostsFile /dev/null\n"
            "  BatchMode yes\n"
            "  LogLevel ERROR\n"
            "  ConnectTimeout 10\n")
        bindir = d / "bin"
        bindir.mkdir(exist_ok=True)
        wrapper = bindir / "ssh"
        wrapper.write_text(f"#!/bin/sh\nexec {shutil.which('ssh')} -F {d / 'ssh_config'} \"$@\"\n")
        wrapper.chmod(0o755)
        self.bin = bindir

    def _start_sshd(self, ns, addr):
        d = self.dir
        config = d / f"sshd_{ns}.conf"
        config.write_text(
            f"ListenAddress {addr}\n"
            "Port 22\n"
            f"HostKey {d / 'host_key'}\n"
            f"AuthorizedKeysFile {d / 'authorized_keys'}\n"
            f"PidFile {d / f'sshd_{ns}.pid'}\n"
            "PermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "UsePAM no\n"
            "StrictModes no\n"          # the pytest tmp dir is not root-only
            "PermitUserEnvironment no\n"
            "AcceptEnv *\n")
        Path("/run/sshd").mkdir(exist_ok=True)   # sshd's privilege-separation directory
        # Its own host name (UTS namespace) and /etc/hosts (private mount namespace), as a
        # real host has; ssh sessions inherit both from sshd. This matters: this Horovod
        # build's Gloo binds to the address of the host name and ignores
        # HOROVOD_GLOO_IFACE, so the name must resolve to the host's own address.
        proc = subprocess.Popen(["ip", "netns", "exec", ns, "unshare", "--uts", "--mount",
                                 "sh", "-c", f'mount --bind "$1" /etc/hosts && hostname {ns} '
                                 f'&& exec /usr/sbin/sshd -D -e -f "$0"', str(config),
                                 str(self.hosts_file)], stdout=subprocess.DEVNULL,
                                stderr=open(d / f"sshd_{ns}.log", "w"))
        self.sshd.append(proc)

    def _wait_for_ssh(self, timeout=30):
        end = time.monotonic() + timeout
        for addr in self.hosts.values():
            while True:
                proc = self.run_in_launcher(["ssh", addr, "true"], env=self.env(), timeout=20,
                                            check=False)
                if proc.returncode == 0:
                    break
                if time.monotonic() > end:
                    logs = " | ".join(p.read_text()[-300:] for p in self.dir.glob("sshd_*.log"))
                    raise RuntimeError(f"ssh {addr} failed: {proc.stderr.strip()} (sshd: {logs})")
                time.sleep(0.3)

    # ------------------------------------------------------------------ use
    @property
    def addresses(self):
        return list(self.hosts.values())

    @property
    def names(self):
        return list(self.hosts)

    def env(self, base=None):
        env = dict(os.environ if base is None else base)
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        return env

    def run_in_launcher(self, cmd, env, timeout=300, check=True, cwd=None):
        # the launcher sees the same host names (its own /etc/hosts, private mount namespace)
        proc = subprocess.run(["ip", "netns", "exec", self.launcher, "unshare", "--uts",
                               "--mount", "sh", "-c", 'mount --bind "$0" /etc/hosts && '
                               f'hostname {self.launcher} && exec "$@"', str(self.hosts_file),
                               *map(str, cmd)],
                              env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}\n"
                                 f"--- stdout ---\n{proc.stdout[-4000:]}\n"
                                 f"--- stderr ---\n{proc.stderr[-4000:]}")
        return proc

    # ------------------------------------------------------------------ tear-down
    def close(self):
        for proc in self.sshd:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        for ns in self.namespaces:
            # whatever the test left running in the namespace (ssh sessions, workers)
            pids = _ip("netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _ip("netns", "del", ns, check=False)
        self.namespaces = []
