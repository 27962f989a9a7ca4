"""metrics.jsonl on a full disk, under `horovodrun -np 2`: every rank stops with one line
naming the file and exit code 6 (checkpoint.on_error: stop), after a checkpoint of the step
the failure happened at (the checkpoints are on another file system with room), the earlier
checkpoints intact, and metrics.jsonl holding only whole lines (the write cut short at the
end of the disk is cut back). Real file systems: a tmpfs of a few pages for OUT (skipped
where this host allows no mount), another for OUT/checkpoints."""
import json
import os

import pytest

from conftest import horovodrun, mount_tmpfs, tool, umount
from hvdscale.engine.checkpoint import CheckpointStore

PAGE = 4096
RUN = ["--set", "framework=torch", "--set", "optimizer.name=sgd",
       "--set", "data.train_limit=512", "--set", "data.test_limit=32",
       "--set", "batch.per_worker=16", "--set", "batch.reference=32",
       "--set", "train.max_steps=16", "--set", "lr.warmup_steps=1",
       "--set", "train.eval_every_steps=1", "--set", "checkpoint.every_steps=4",
       "--set", "log.progress=false", "--set", "log.tensorboard=false"]


@pytest.mark.multiproc
def test_full_disk_under_metrics_stops_every_rank_with_one_line(tmp_path):
    out = tmp_path / "run"
    mount_tmpfs(out, "64k")
    try:
        mount_tmpfs(out / "checkpoints", "8m")
        # leave four pages: the lock file's, recipe.json's, steps.jsonl's (16 lines) and one
        # of metrics.jsonl (about nine records)
        st = os.statvfs(out)
        (out / "filler").write_bytes(b"\0" * (st.f_bavail * st.f_frsize - 4 * PAGE))
        proc = horovodrun(2, tool("hvdscale"), "train", *RUN, "--out", out, check=False,
                          timeout=300)
        text = (out / "metrics.jsonl").read_bytes().decode()
        store = CheckpointStore(out / "checkpoints")
        meta, state = store.latest()
        names = [p.name for p in store.checkpoints()]
        import torch
        loaded = torch.load(state, weights_only=True)
    finally:
        umount(out / "checkpoints")
        umount(out)
    output = proc.stdout + proc.stderr
    assert "<stderr>:Traceback" not in output and proc.returncode != 0, output[-3000:]
    assert "Exit code: 6" in output, output[-3000:]
    assert text.endswith("\n")
    records = [json.loads(line) for line in text.splitlines()]     # whole lines only
    written = [r["step"] for r in records]
    failed_at = written[-1] + 1
    assert written == list(range(1, failed_at)) and 4 < failed_at < 16, written
    expected = (f"cannot write {out / 'metrics.jsonl'}: No space left on device [errno 28]; "
                f"checkpoint step-{failed_at:08d} is written; continue with --resume once "
                f"there is room (checkpoint.on_error = stop)")
    for rank in (0, 1):
        lines = [l for l in output.splitlines()
                 if f"<stderr>:hvdscale train: error: rank {rank}: " in l]
        assert len(lines) == 1 and lines[0].endswith(expected), output[-3000:]
    assert meta["step"] == failed_at and set(loaded) >= {"model", "optimizer"}
    previous = (failed_at - 1) // 4 * 4
    assert names == [f"step-{previous:08d}.json", f"step-{failed_at:08d}.json"], names
