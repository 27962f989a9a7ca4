"""Bad settings get one line, run as a user would (`hvdscale train`, `hvdscale launch`).

- A YAML alias bomb (10 nested levels of 10 aliases, ~400 bytes) in a recipe or a `--set`
  value is refused before it is expanded: one short line, in well under a second of work,
  inside a 1 GiB address-space limit (the old code formatted the expanded value into its
  error message until memory ran out).
- A long bad value is shown as a short prefix.
- `train.threads` above this machine's cores is warned about in one line.
- `hvdscale launch --network-interface` naming an interface this machine lacks, and stale
  MPI/Horovod rank variables in its environment, are refused in one line before anything
  starts. (optimizer.base_lr=1e39, beyond float32, is a case of tests/test_bad_input.py.)
"""
import os
import resource
import subprocess
import sys
import time

import pytest

from conftest import REPO, job_env, tool
from hvdscale.hardware import cpu_count


def bomb(levels=10, width=10):
    """A YAML flow sequence whose aliases stand for width**levels strings."""
    parts = ["&l0 [" + ", ".join(["lol"] * width) + "]"]
    for i in range(1, levels):
        parts.append(f"&l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]")
    return "[" + ", ".join(parts) + "]"


def limited_memory():
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


def run(args, env=None, timeout=60, limit_memory=False):
    start = time.monotonic()
    proc = subprocess.run([str(a) for a in args], env=env or job_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=timeout,
                          preexec_fn=limited_memory if limit_memory else None)
    return proc, time.monotonic() - start


def one_line(proc, prefix):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(prefix), lines
    return lines[0]


@pytest.mark.parametrize("where", ["recipe", "set"])
def test_yaml_alias_bomb_is_refused_before_expansion(where, tmp_path):
    value = bomb()
    assert len(value) < 700
    if where == "recipe":
        recipe = tmp_path / "bomb.yaml"
        recipe.write_text(f"name: {value}\n")
        args = [recipe]
    else:
        args = ["--set", f"name={value}"]
    try:
        proc, took = run([sys.executable, "-m", "hvdscale", "train", *args,
                          "--out", tmp_path / "run"], timeout=30, limit_memory=True)
    except subprocess.TimeoutExpired:
        pytest.fail("still expanding the alias bomb after 30 s")
    line = one_line(proc, "hvdscale train: error: ")
    assert f"YAML aliases expand to more than 10000 values" in line, line
    assert len(line) < 400 and took < 10, (len(line), took)


def test_a_long_bad_value_is_shown_as_a_short_prefix(tmp_path):
    proc, _ = run([sys.executable, "-m", "hvdscale", "train",
                   "--set", "batch.per_worker=" + "9x" * 5000, "--out", tmp_path / "run"])
    line = one_line(proc, "hvdscale train: error: ")
    assert "batch.per_worker: expected a number, got '9x9x" in line and len(line) < 250, line


def test_threads_above_the_cores_are_warned_in_one_line(tmp_path):
    threads = cpu_count() + 1
    proc, _ = run([tool("hvdscale"), "train", "--no-horovod", "--set", "framework=torch",
                   "--set", f"train.threads={threads}", "--set", "train.max_steps=1",
                   "--set", "data.train_limit=64", "--set", "data.test_limit=32",
                   "--set", "batch.per_worker=32", "--set", "batch.reference=32",
                   "--set", "lr.warmup_steps=0", "--set", "log.progress=false",
                   "--set", "log.tensorboard=false", "--out", tmp_path / "run"], timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [l for l in proc.stderr.splitlines() if "warning" in l]
    assert warnings == [f"hvdscale: warning: train.threads {threads} x 1 worker(s) on this "
                        f"machine is more than its {cpu_count()} cores: the threads will take "
                        f"turns and every step slows down; leave train.threads unset "
                        f"(cores // workers = {cpu_count()})"], proc.stderr[-3000:]


def test_unknown_network_interface_is_one_line(tmp_path):
    proc, took = run([tool("hvdscale"), "launch", "--np", "2", "--network-interface",
                      "nosuch0", "--", sys.executable, "-c", "print('started')"])
    line = one_line(proc, "hvdscale launch: error: --network-interface nosuch0: no such "
                          "interface on this machine (it has ")
    assert "lo" in line and "started" not in proc.stdout and took < 10, (line, took)


def test_stale_rank_variables_are_named_in_one_line(tmp_path):
    env = job_env(HOROVOD_RANK="1", OMPI_COMM_WORLD_SIZE="4")
    proc, _ = run([tool("hvdscale"), "launch", "--np", "1", "--", sys.executable, "-c",
                   "print('started')"], env=env)
    line = one_line(proc, "hvdscale launch: error: the environment holds another job's "
                          "rank variables (HOROVOD_RANK=1, OMPI_COMM_WORLD_SIZE=4)")
    assert "started" not in proc.stdout, line
