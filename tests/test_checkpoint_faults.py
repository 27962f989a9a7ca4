"""Checkpoint storage faults: a full or read-only disk while a checkpoint is written.

Real file systems where this host allows a mount (a tiny tmpfs, then remounted read-only),
an injected OSError otherwise: one line naming the directory, the previous checkpoint intact
and loadable, nothing partial ever returned by `latest()` (what --resume loads), and under
`horovodrun -np 2` every rank stops together (`checkpoint.on_error: stop`, exit 6) or the
run goes on (`warn`)."""
import errno
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, WORKERS, horovodrun, job_env, mount_tmpfs, umount
from hvdscale.engine import checkpoint as ckpt
from hvdscale.engine.checkpoint import CheckpointStore, CheckpointWriteError

WORKER = WORKERS / "fault_train.py"


@pytest.fixture
def tiny_disk(tmp_path):
    path = tmp_path / "disk"
    mount_tmpfs(path, "64k")
    yield path
    umount(path)


def test_disk_full_then_read_only_keeps_the_previous_checkpoint(tiny_disk):
    store = CheckpointStore(tiny_disk / "checkpoints", keep=3)
    store.save(1, b"a" * 20_000, ".pt", {"framework": "torch"})
    with pytest.raises(CheckpointWriteError) as full:
        store.save(2, b"b" * 60_000, ".pt", {"framework": "torch"})
    line = str(full.value)
    assert "\n" not in line and str(store.dir) in line and "No space left on device" in line
    assert "newest complete checkpoint: step-00000001.pt" in line
    assert sorted(p.name for p in store.dir.iterdir()) == ["step-00000001.json",
                                                          "step-00000001.pt"]
    meta, state = store.latest()
    assert meta["step"] == 1 and state.read_bytes() == b"a" * 20_000

    subprocess.run(["mount", "-o", "remount,ro", str(tiny_disk)], check=True)
    with pytest.raises(CheckpointWriteError, match="Read-only file system"):
        store.save(3, b"c" * 100, ".pt", {"framework": "torch"})
    assert store.latest()[0]["step"] == 1


def test_injected_failure_of_the_sidecar_removes_the_new_state_file(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path, keep=2)
    store.save(4, b"four", ".pt", {})
    real = ckpt.atomic_write

    def failing(path, data):
        if Path(path).suffix == ".json":
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        real(path, data)
    monkeypatch.setattr(ckpt, "atomic_write", failing)
    with pytest.raises(CheckpointWriteError, match=f"checkpoint step 8 to {tmp_path}: "
                                                   "Disk quota exceeded"):
        store.save(8, b"eight", ".pt", {})
    assert not (tmp_path / "step-00000008.pt").exists()
    assert store.latest()[0]["step"] == 4


def test_latest_never_picks_a_partial_checkpoint(tmp_path):
    store = CheckpointStore(tmp_path, keep=5)
    store.save(4, b"four", ".pt", {})
    store.save(8, b"eight", ".pt", {})
    (tmp_path / "step-00000012.pt").write_bytes(b"twelve")       # no sidecar
    (tmp_path / ".step-00000016.pt.abc.tmp").write_bytes(b"x")  # a write cut short
    meta, state = store.latest()
    assert meta["step"] == 8 and state.read_bytes() == b"eight"
    assert meta["state_size"] == 5


RUN = ["--set", "framework=torch", "--set", "optimizer.name=lamb",
       "--set", "data.train_limit=1024", "--set", "data.test_limit=200",
       "--set", "batch.per_worker=32", "--set", "batch.reference=64",
       "--set", "train.max_steps=16", "--set", "lr.warmup_steps=2",
       "--set", "train.eval_every_steps=8", "--set", "checkpoint.every_steps=4",
       "--set", "checkpoint.keep=2", "--set", "log.progress=false",
       "--set", "log.tensorboard=false"]


@pytest.mark.multiproc
def test_full_disk_stops_every_rank_with_one_line(tmp_path):
    """6 MiB holds two checkpoints; the third (step 12) does not fit before the oldest is
    pruned: every rank reports it and exits 6, step 8 stays the newest and loads."""
    out = tmp_path / "run"
    mount_tmpfs(out / "checkpoints", "6m")
    try:
        proc = horovodrun(2, sys.executable, WORKER, tmp_path / "dump", *RUN, "--out", out,
                          check=False, timeout=300)
        meta, state = CheckpointStore(out / "checkpoints").latest()
        files = sorted(p.name for p in (out / "checkpoints").iterdir())
        size = state.stat().st_size
        import torch
        loaded = torch.load(state, weights_only=True)
    finally:
        umount(out / "checkpoints")
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Exit code: 6" in output, output[-3000:]
    for rank in (0, 1):
        lines = [l for l in output.splitlines() if f"hvdscale train: error: rank {rank}:" in l]
        assert len(lines) == 1, output[-3000:]
        assert (f"cannot write checkpoint step 12 to {out / 'checkpoints'}: No space left on "
                f"device [errno 28]; newest complete checkpoint: step-00000008.pt "
                f"(checkpoint.on_error = stop)") in lines[0]
    assert meta["step"] == 8 and meta["state_size"] == size
    assert files == ["step-00000004.json", "step-00000004.pt", "step-00000008.json",
                     "step-00000008.pt"]
    assert set(loaded) >= {"model", "optimizer"}


def test_warn_policy_trains_on(tmp_path):
    out = tmp_path / "run"
    mount_tmpfs(out / "checkpoints", "6m")
    try:
        proc = subprocess.run([sys.executable, WORKER, tmp_path / "dump", *RUN, "--no-horovod",
                               "--set", "checkpoint.on_error=warn", "--out", out],
                              env=job_env(), cwd=REPO, capture_output=True, text=True,
                              timeout=300)
        steps = [p.name for p in CheckpointStore(out / "checkpoints").checkpoints()]
    finally:
        umount(out / "checkpoints")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    warnings = [l for l in proc.stdout.splitlines() if l.startswith("warning: cannot write")]
    assert len(warnings) == 2, proc.stdout[-3000:]     # steps 12 and 16 (the final one)
    assert "checkpoint step 12" in warnings[0] and "(checkpoint.on_error = warn)" in warnings[0]
    assert steps == ["step-00000004.json", "step-00000008.json"]
    summary = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert summary["event"] == "summary" and summary["steps"] == 16
    assert np.load(tmp_path / "dump" / "params-rank0.npz").files
