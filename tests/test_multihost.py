"""Multi-host for real: two hosts made of network namespaces on this machine (tests/netns.py),
each with its own sshd, host name and /etc/hosts; `horovodrun -H hostA:1,hostB:1` ssh's into
both and `hvdscale train` runs across them, with and without `--network-interface`. The ranks
must have run in different namespaces and end with identical parameters."""
import json
import os
import sys

import numpy as np
import pytest

from conftest import REPO, WORKERS, job_env, tool
from netns import IFACE, LAUNCHER_IP, LAUNCHER_OTHER_IP, TwoHosts, Unavailable

pytestmark = [pytest.mark.multiproc, pytest.mark.netns]
WORKER = WORKERS / "fault_train.py"
PROBE = WORKERS / "rendezvous_probe.py"
SMALL = ["--set", "framework=torch", "--set", "data.train_limit=512",
         "--set", "data.test_limit=100", "--set", "batch.per_worker=32",
         "--set", "batch.reference=64", "--set", "train.max_steps=6",
         "--set", "lr.warmup_steps=1", "--set", "log.progress=false",
         "--set", "log.tensorboard=false"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    try:
        hosts = TwoHosts.create(tmp_path_factory.mktemp("hosts"))
    except Unavailable as err:
        pytest.skip(f"no network namespaces for the multi-host test: {err}")
    yield hosts
    hosts.close()


@pytest.mark.parametrize("nic", [None, IFACE], ids=["auto-nic", "network-interface"])
def test_train_across_two_ssh_hosts(cluster, nic, tmp_path):
    dump, out = tmp_path / "dump", tmp_path / "run"
    a, b = cluster.names           # host names, resolved by the hosts' own /etc/hosts
    cmd = [tool("horovodrun"), "-np", "2", "-H", f"{a}:1,{b}:1", "--gloo",
           "--start-timeout", "90", *(["--network-interface", nic] if nic else []),
           sys.executable, WORKER, dump, *SMALL, "--out", out]
    cluster.run_in_launcher(cmd, cluster.env(job_env()), timeout=300, cwd=REPO)

    # each rank ran in its own host namespace (rank 0 on A, rank 1 on B)
    where = [(dump / f"netns-rank{r}").read_text() for r in (0, 1)]
    expected = [f"net:[{os.stat(f'/run/netns/{ns}').st_ino}]" for ns in cluster.hosts]
    assert where == expected, (where, expected)

    p0, p1 = (np.load(dump / f"params-rank{r}.npz") for r in (0, 1))
    assert p0.files == p1.files and len(p0.files) > 4
    for key in p0.files:
        assert p0[key].tobytes() == p1[key].tobytes(), f"{key} differs between hosts"
    summary = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert summary["workers"] == 2 and summary["steps"] == 6


@pytest.mark.parametrize("via", ["hvdscale-launch", "plain-horovodrun"])
def test_rendezvous_is_bound_to_the_network_interface(cluster, via, tmp_path):
    """`hvdscale launch --network-interface hvd0` binds horovodrun's Gloo rendezvous to the
    launcher's address on hvd0: the workers on both hosts reach it there and not at the
    launcher's second address. Plain horovodrun listens on every interface (the control)."""
    a, b = cluster.names
    job = ["--", sys.executable, PROBE, tmp_path, LAUNCHER_IP, LAUNCHER_OTHER_IP]
    if via == "hvdscale-launch":
        cmd = [tool("hvdscale"), "launch", "--hosts", f"{a}:1,{b}:1", "--controller", "gloo",
               "--network-interface", IFACE, "--rendezvous-port", "29431",
               "--launcher-arg=--start-timeout", "--launcher-arg=90", *job]
    else:
        cmd = [tool("horovodrun"), "-np", "2", "-H", f"{a}:1,{b}:1", "--gloo",
               "--start-timeout", "90", "--network-interface", IFACE, *job[1:]]
    proc = cluster.run_in_launcher(cmd, cluster.env(job_env()), timeout=300, cwd=REPO)
    assert "warning" not in proc.stderr

    got = [json.loads((tmp_path / f"rendezvous-rank{r}.json").read_text()) for r in (0, 1)]
    assert [g["netns"] for g in got] == [f"net:[{os.stat(f'/run/netns/{ns}').st_ino}]"
                                         for ns in cluster.hosts]       # one rank per host
    for g in got:
        assert g["reach_given"] is True and g["size"] == 2 and g["sum"] == 3.0
        if via == "hvdscale-launch":
            assert g["addr"] == LAUNCHER_IP and g["port"] == 29431
            assert g["reach"] == {LAUNCHER_IP: True, LAUNCHER_OTHER_IP: False}
        else:   # Horovod's own server: every interface
            assert g["reach"] == {LAUNCHER_IP: True, LAUNCHER_OTHER_IP: True}
