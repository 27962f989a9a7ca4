"""A run directory has one owner (hvdscale/engine/rundir.py), run as a user would.

- A second job on an OUT that a running job holds is refused by every rank of
  `horovodrun -np 2` with one line naming the directory and the holder (host, pid); the
  running job is not disturbed. Once the holder is killed with SIGKILL no stale lock remains.
- A new run (no --resume) into an OUT holding another run's checkpoints or metrics is
  refused with one line offering --resume, a new --out or --overwrite;
  --overwrite moves the earlier run into OUT/previous-1/ byte for byte, deleting nothing.
- An unusable --out (a file, a read-only mount, a read-only tensorboard folder) is refused in
  one line within a second, before torch or TensorFlow is imported.
"""
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, horovodrun, job_env, tool, wait_for

ERROR = "hvdscale train: error: --out: "
TINY = ["--set", "framework=torch", "--set", "optimizer.name=sgd",
        "--set", "data.train_limit=256", "--set", "data.test_limit=64",
        "--set", "batch.per_worker=32", "--set", "batch.reference=64",
        "--set", "lr.warmup_steps=1", "--set", "log.progress=false",
        "--set", "log.tensorboard=false", "--set", "train.eval_every_steps=2",
        "--set", "checkpoint.every_steps=2"]


def hvdscale_train(*args, timeout=180):
    start = time.monotonic()
    proc = subprocess.run([tool("hvdscale"), "train", *map(str, args)], env=job_env(),
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - start


def error_lines_by_rank(output):
    """{rank: [error lines]} from horovodrun's `[r]<stderr>:` tagged output."""
    lines = {}
    for line in output.splitlines():
        if "<stderr>:hvdscale train: error:" in line:
            rank, text = line.split("]<stderr>:", 1)
            lines.setdefault(rank.lstrip("["), []).append(text)
    return lines


def refused_on_both_ranks(proc, words):
    output = proc.stdout + proc.stderr
    by_rank = error_lines_by_rank(output)
    assert "<stderr>:Traceback" not in output, output[-3000:]   # (horovodrun's own is fine)
    assert proc.returncode != 0 and "Exit code: 2" in output, output[-3000:]
    # horovodrun --gloo may end the slower rank (143) once the first exits non-zero; any
    # rank that printed printed exactly this one line
    for rank in ("0", "1"):
        assert rank in by_rank or f"Process {rank} exit with status code 143" in output, \
            output[-3000:]
    for lines in by_rank.values():
        assert len(lines) == 1 and lines[0].startswith(ERROR) and words in lines[0], lines
    return next(iter(by_rank.values()))[0]


def lock_is_held(out):
    path = Path(out) / ".hvdscale.lock"
    if not path.exists():
        return False
    with open(path) as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
    return False


@pytest.mark.multiproc
def test_second_job_refused_then_killed_holder_leaves_no_lock_then_overwrite(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [tool("hvdscale"), "train", *TINY, "--set", "train.max_steps=100000",
         "--set", "train.epochs=100000", "--no-horovod", "--out", str(out)],
        env=job_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        metrics = out / "metrics.jsonl"
        assert wait_for(lambda: lock_is_held(out) and metrics.exists()
                        and metrics.stat().st_size > 0
                        and any((out / "checkpoints").glob("step-*.json")), 120, holder), \
            "holder did not start"
        # a stopped job still owns its directory; stopped, it leaves the CPUs to the others
        holder.send_signal(signal.SIGSTOP)
        # 1. a second job while the first runs: refused on both ranks, naming the holder
        start = time.monotonic()
        proc = horovodrun(2, tool("hvdscale"), "train", *TINY, "--set", "train.max_steps=4",
                          "--out", out, check=False, timeout=120)
        took = time.monotonic() - start
        line = refused_on_both_ranks(proc, f"{out} is in use by another job (host ")
        assert f"pid {holder.pid}, since " in line, line
        assert holder.poll() is None, "the running job was disturbed"
        assert lock_is_held(out)
        print(f"second job refused in {took:.1f} s (horovodrun -np 2, end to end)")
        # 2. the holder dies by SIGKILL: no stale lock, but its files are another run's
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
    assert not lock_is_held(out)
    steps = sorted(p.name for p in (out / "checkpoints").glob("step-*.json"))
    assert steps, "the holder wrote no checkpoint"
    last = int(steps[-1][5:13])
    # (one process: rank 0's refusal reaches the other ranks as in step 1)
    proc, took = hvdscale_train(*TINY, "--set", "train.max_steps=4", "--no-horovod",
                                "--out", out)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(ERROR + f"{out} holds another run (checkpoints up to step "
                                       f"{last}, metrics.jsonl): continue it with --resume, "
                                       f"choose a new --out, or add --overwrite"), lines
    print(f"new run into an earlier run's directory refused in {took:.1f} s")
    # 3. --overwrite: the earlier run moves into OUT/previous-1/, nothing is deleted
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*")
              if p.is_file() and p.name != ".hvdscale.lock"}
    proc, _ = hvdscale_train(*TINY, "--set", "train.max_steps=2", "--no-horovod",
                             "--out", out, "--overwrite")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"--overwrite: moved the earlier run in {out}" in proc.stdout
    moved = {p.relative_to(out / "previous-1"): p.read_bytes()
             for p in (out / "previous-1").rglob("*") if p.is_file()}
    assert moved == before
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["event"] == "summary" and records[-1]["steps"] == 2
    assert [p.name for p in (out / "checkpoints").glob("*.json")] == ["step-00000002.json"]


def read_only_mount(path):
    path.mkdir(parents=True, exist_ok=True)
    for cmd in (["mount", "--bind", str(path), str(path)],
                ["mount", "-o", "remount,bind,ro", str(path)]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            subprocess.run(["umount", str(path)], capture_output=True)
            pytest.skip(f"cannot make a read-only bind mount here ({proc.stderr.strip()})")


def umount(path):
    subprocess.run(["umount", str(path)], capture_output=True)


def _file(tmp_path):
    out = tmp_path / "a-file"
    out.write_text("not a directory\n")
    return out, f"{out} is a file, not a directory"


def _read_only(tmp_path):
    read_only_mount(tmp_path / "ro")
    return tmp_path / "ro" / "run", f"{tmp_path / 'ro'} is not writable"


def _read_only_tensorboard(tmp_path):
    board = tmp_path / "run" / "tensorboard"
    read_only_mount(board)
    return tmp_path / "run", f"{board} is not writable"


@pytest.mark.parametrize("case", [_file, _read_only, _read_only_tensorboard])
def test_unusable_out_is_one_line_within_a_second(case, tmp_path):
    out, words = case(tmp_path)
    try:
        # -X importtime lists every module imported: neither framework may be among them
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "hvdscale", "train",
                               "--set", "log.tensorboard=true", "--out", str(out)],
                              env=job_env(), cwd=REPO, capture_output=True, text=True,
                              timeout=60)
        took = time.monotonic() - start
    finally:
        for mounted in (tmp_path / "ro", tmp_path / "run" / "tensorboard"):
            umount(mounted)
    lines = [l for l in proc.stderr.splitlines() if not l.startswith("import time:")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(ERROR) and words in lines[0], lines
    imported = {l.split("|")[-1].strip() for l in proc.stderr.splitlines()
                if l.startswith("import time:")}
    assert not imported & {"torch", "tensorflow", "horovod"}, imported & {"torch", "tensorflow"}
    assert took < 3, f"took {took:.2f} s"      # under a second unloaded (benchmarks/RESULTS.md)
