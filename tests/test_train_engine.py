"""`hvdscale train` as one process (no Horovod): the metrics log contract, checkpoints,
the summary, and the learning-rate schedule the engine applies, for both frameworks."""
import json
import os

import numpy as np
import pytest

from hvdscale.cli import main
from hvdscale.config import load_config
from hvdscale.engine.checkpoint import CheckpointStore, atomic_write

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SMALL = ["--set", "data.train_limit=1024", "--set", "data.test_limit=301",
         "--set", "batch.per_worker=64", "--set", "batch.reference=64",
         "--set", "train.threads=1", "--set", "log.progress=false",
         "--set", "lr.warmup_steps=4", "--set", "train.epochs=2"]

RECORD_KEYS = {"step", "epoch", "framework", "workers", "global_batch", "lr", "train_loss",
               "test_accuracy", "images_per_sec", "elapsed_s"}
SUMMARY_KEYS = {"final_test_accuracy", "best_test_accuracy", "target_accuracy",
                "steps_to_target", "time_to_target_s", "images_per_sec",
                "images_per_sec_per_worker", "workers", "global_batch", "optimizer"}


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("framework", ["torch", "tensorflow"])
def test_single_process_run_writes_the_contract(framework, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--no-horovod", *SMALL, "--set", f"framework={framework}",
               "--set", "train.eval_every_steps=10", "--set", "train.target_accuracy=0.3",
               "--set", "checkpoint.every_steps=10", "--set", "checkpoint.keep=2",
               "--out", str(out)])
    assert rc == 0
    lines = read_jsonl(out / "metrics.jsonl")
    records, summary = lines[:-1], lines[-1]
    # 1024 examples / 64 per step = 16 steps per epoch, 2 epochs; evals at 10, 20, 30, 32
    assert [r["step"] for r in records] == [10, 20, 30, 32]
    for r in records:
        assert RECORD_KEYS <= set(r)
        assert r["framework"] == framework and r["workers"] == 1 and r["global_batch"] == 64
        assert r["test_examples"] == 301 and 0 <= r["test_accuracy"] <= 1
        assert r["images_per_sec"] > 0 and np.isfinite(r["train_loss"])
    # training works: loss falls and the accuracy is well above chance (10 classes)
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert records[-1]["test_accuracy"] > 0.5
    assert summary["event"] == "summary" and SUMMARY_KEYS <= set(summary)
    assert summary["final_test_accuracy"] == records[-1]["test_accuracy"]
    assert summary["best_test_accuracy"] == max(r["test_accuracy"] for r in records)
    first_hit = next(r for r in records if r["test_accuracy"] >= 0.3)
    assert summary["steps_to_target"] == first_hit["step"]
    assert summary["time_to_target_s"] == pytest.approx(first_hit["elapsed_s"])
    assert summary["steps"] == 32 and summary["optimizer"] == "lamb"
    # the lr logged is the schedule's value: cosine decays to end_lr=0 at the last step
    assert records[-1]["lr"] < records[0]["lr"]
    # checkpoints at 10, 20, 30 and the end; keep=2 leaves the newest two
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    suffix = ".pt" if framework == "torch" else ".npz"
    assert names == [f"step-00000030.json", f"step-00000030{suffix}",
                     f"step-00000032.json", f"step-00000032{suffix}"]
    meta = json.loads((out / "checkpoints" / "step-00000032.json").read_text())
    assert meta["step"] == 32 and meta["epoch"] == 2 and meta["step_in_epoch"] == 0
    assert list((out / "tensorboard").iterdir()), "no TensorBoard event file"
    text = capsys.readouterr().out
    assert "global batch 64 = 1 workers x 64 x 1 accumulation" in text
    assert "| hardware" in text and "| time/step" in text and "| accuracy" in text


def test_stop_at_target_ends_early(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--no-horovod", *SMALL, "--set", "train.eval_every_steps=4",
                 "--set", "train.target_accuracy=0.2", "--set", "train.stop_at_target=true",
                 "--out", str(out)]) == 0
    summary = read_jsonl(out / "metrics.jsonl")[-1]
    assert summary["steps_to_target"] is not None and summary["steps"] == summary["steps_to_target"]
    assert summary["steps"] < 32


def test_warmup_longer_than_training_in_steps_is_rejected(tmp_path, capsys):
    rc = main(["train", "--no-horovod", *SMALL, "--set", "lr.warmup_steps=40",
               "--out", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["hvdscale train: error: warm-up (40 steps) is not shorter than training "
                   "(32 steps of global batch 64)"]


def test_atomic_write_leaves_old_content_on_failure(tmp_path):
    target = tmp_path / "state.bin"
    atomic_write(target, b"first")

    with pytest.raises(TypeError):
        atomic_write(target, object())          # fails while writing the temporary file
    assert target.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["state.bin"]   # no temp file left


def test_checkpoint_store_ignores_state_without_sidecar(tmp_path):
    store = CheckpointStore(tmp_path, keep=3)
    store.save(5, b"five", ".pt", {"framework": "torch"})
    (tmp_path / "step-00000009.pt").write_bytes(b"half written, no sidecar")
    meta, path = store.latest()
    assert meta["step"] == 5 and path.read_bytes() == b"five"


def test_default_recipe_is_the_lamb_recipe():
    cfg = load_config()
    assert cfg.name == "fashion_mnist_lamb" and cfg.optimizer.name == "lamb"
    assert cfg.train.target_accuracy == 0.90
