"""The Horovod settings hvdscale applies before hvd.init() (hvdscale/comm.py) and shows in
`hvdscale doctor`: a one-worker job gets a long HOROVOD_CYCLE_TIME, a job of several workers
keeps Horovod's own, an elastic job and the user's own value are left alone; gradients go to
Horovod as one group on CPUs, per tensor on GPUs; and the Horovod that launchers/install.sh
builds waits without polling (launchers/horovod-wait.patch), measured on real ranks."""
import json
import re
import subprocess
import sys

import pytest

from conftest import WORKERS, horovodrun, job_env
from hvdscale.comm import SINGLE_WORKER_CYCLE_TIME_MS, apply_horovod_defaults, \
    gradient_groups, horovod_env_defaults, launched_world_size
from hvdscale.config import load_config
from hvdscale.errors import ConfigError

SHOW = ("import os; from hvdscale.comm import init_comm; c = init_comm('torch'); "
        "print('RANK', c.rank, 'OF', c.size, 'CYCLE', os.environ.get('HOROVOD_CYCLE_TIME'))")


@pytest.mark.parametrize("environ, expected", [
    ({}, {"HOROVOD_CYCLE_TIME": SINGLE_WORKER_CYCLE_TIME_MS}),
    ({"HOROVOD_SIZE": "1"}, {"HOROVOD_CYCLE_TIME": SINGLE_WORKER_CYCLE_TIME_MS}),
    ({"OMPI_COMM_WORLD_SIZE": "1"}, {"HOROVOD_CYCLE_TIME": SINGLE_WORKER_CYCLE_TIME_MS}),
    ({"HOROVOD_SIZE": "2"}, {}),
    ({"SLURM_NTASKS": "4"}, {}),
    ({"HOROVOD_SIZE": "1", "HOROVOD_ELASTIC": "1"}, {}),     # may grow: Horovod's own cycle
    ({"HOROVOD_CYCLE_TIME": "3"}, {}),                        # the user's value wins
])
def test_defaults_follow_the_job_size_and_never_override_the_user(environ, expected):
    assert horovod_env_defaults(environ) == expected
    applied = dict(environ)
    assert apply_horovod_defaults(applied) == expected
    assert applied == {**environ, **expected}


def test_world_size_from_the_launchers_variables():
    assert launched_world_size({}) == 1
    assert launched_world_size({"PMIX_SIZE": "8"}) == 8
    assert launched_world_size({"HOROVOD_SIZE": "x", "OMPI_COMM_WORLD_SIZE": "3"}) == 3


@pytest.mark.multiproc
def test_workers_see_the_setting_before_horovod_starts():
    out = horovodrun(1, sys.executable, "-c", SHOW).stdout
    assert f"RANK 0 OF 1 CYCLE {SINGLE_WORKER_CYCLE_TIME_MS}" in out, out
    out = horovodrun(2, sys.executable, "-c", SHOW).stdout
    assert out.count("OF 2 CYCLE None") == 2, out


def test_doctor_reports_the_cycle_time():
    proc = subprocess.run([sys.executable, "-m", "hvdscale", "doctor", "--json",
                           "--require", "torch"], env=job_env(HOROVOD_CYCLE_TIME="7"),
                          capture_output=True, text=True, timeout=300)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["horovod_settings"]["HOROVOD_CYCLE_TIME"] == "7 ms (environment)"
    assert report["horovod_settings"]["user_set"]["HOROVOD_CYCLE_TIME"] == "7"
    # the Horovod launchers/install.sh builds carries the wait patch
    assert report["horovod_settings"]["idle_wait"].startswith("yes: sleeps while idle")


def test_gradient_groups_by_device_unless_set():
    assert gradient_groups(None, gpu=False) == 1      # one grouped allreduce after backward
    assert gradient_groups(None, gpu=True) == 0       # per tensor, overlapping backward
    assert gradient_groups(0, gpu=False) == 0 and gradient_groups(4, gpu=True) == 4
    assert load_config(overrides=["horovod.groups=3"]).horovod.groups == 3
    with pytest.raises(ConfigError, match="horovod.groups"):
        load_config(overrides=["horovod.groups=-1"])


@pytest.mark.multiproc
@pytest.mark.parametrize("controller", ["gloo", "mpi"])
def test_horovod_waits_without_polling_or_spinning(controller):
    """Idle ranks sleep: upstream wakes every 1 ms cycle (~3,300-4,000 voluntary context
    switches/s under Gloo, 0.06 s CPU/s), and under MPI the ranks' idle wake-ups drift out of
    phase, so one spins in the cycle's collective until the other comes (0.24 and 0.79 s CPU/s
    upstream, 0.46 s/s on one rank with a naive idle sleep); patched ~200-300 switches/s and
    < 2 % of a core. Under Gloo a rank whose peer joins an allreduce 1.5 s late also waits in
    synchronize() without burning a core (upstream spins on sched_yield; under MPI the
    background thread's collective spins anyway while the peer is late)."""
    out = horovodrun(2, sys.executable, str(WORKERS / "horovod_waits.py"),
                     controller=controller).stdout
    # mpirun tags each rank's output chunk and may put two ranks' lines on one line
    ranks = [json.loads(m) for m in re.findall(r'\{"rank": [^{}]*\}', out)]
    assert sorted(r["rank"] for r in ranks) == [0, 1], out
    for r in ranks:
        assert r["sum"] == 3.0                          # 1 + 2: the collective is right
        assert r["idle_switches_per_s"] < 1000, r
        assert r["idle_cpu_per_s"] < 0.1, r
    waiter = next(r for r in ranks if r["rank"] == 0)
    assert waiter["wait_s"] > 1.0, waiter               # it did wait for the late peer ...
    if controller == "gloo":
        assert waiter["wait_cpu_s"] < 0.5 * waiter["wait_s"], waiter   # ... mostly asleep
