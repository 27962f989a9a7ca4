"""The Horovod settings hvdscale applies before hvd.init() (hvdscale/comm.py) and shows in
`hvdscale doctor`: a one-worker job gets a long HOROVOD_CYCLE_TIME, a job of several workers
keeps Horovod's own, an elastic job and the user's own value are left alone."""
import json
import subprocess
import sys

import pytest

from conftest import horovodrun, job_env
from hvdscale.comm import SINGLE_WORKER_CYCLE_TIME_MS, apply_horovod_defaults, \
    horovod_env_defaults, launched_world_size

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
