"""Shared helpers for hvdscale's tests: find the launchers next to the interpreter and run
real multi-process jobs with an environment that works as root and on 2 cores."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WORKERS = Path(__file__).resolve().parent / "workers"


def tool(name):
    """A console script of this environment (horovodrun, hvdscale, ...)."""
    path = BIN / name
    if not path.exists():
        pytest.skip(f"{name} is not installed next to {sys.executable}; run launchers/install.sh")
    return str(path)


def job_env(**extra):
    env = dict(os.environ)
    env.update({
        "OMPI_ALLOW_RUN_AS_ROOT": "1",
        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        "OMP_NUM_THREADS": "1",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
        "PATH": str(BIN) + os.pathsep + env.get("PATH", ""),
    })
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_job(cmd, timeout=240, check=True, **env):
    """Run a launcher command; on failure show its output so the test log explains itself."""
    proc = subprocess.run([str(c) for c in cmd], env=job_env(**env), capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}\n"
                             f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}")
    return proc


def horovodrun(np_, *args, controller="gloo", timeout=240, check=True, **env):
    flag = {"gloo": "--gloo", "mpi": "--mpi"}[controller]
    return run_job([tool("horovodrun"), "-np", np_, flag, *args], timeout=timeout, check=check, **env)


def mpirun(np_, *args, timeout=240, check=True, **env):
    return run_job(["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", np_,
                    "-bind-to", "none", "-map-by", "slot", *args],
                   timeout=timeout, check=check, **env)


def wait_for(predicate, timeout, proc):
    """Poll `predicate` until it holds (True), `proc` ends or `timeout` passes (False)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def mount_tmpfs(path, size):
    """A tmpfs of `size` at `path` (a small full disk); skips where this host allows no mount."""
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()})")


def umount(path):
    subprocess.run(["umount", "-l", str(path)], capture_output=True)
