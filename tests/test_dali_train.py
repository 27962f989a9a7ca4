"""`hvdscale train` on a Fashion-MNIST-derived JPEG folder through the DALI pipeline, under
`horovodrun -np 2`, in both frameworks: it trains to a sensible accuracy and the evaluation
counts every validation image exactly once across the two ranks."""
import json

import pytest

from conftest import REPO, horovodrun, tool

pytest.importorskip("nvidia.dali")
pytestmark = pytest.mark.multiproc
TRAIN, VAL, BATCH, EPOCHS = 2400, 400, 32, 4


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    from hvdscale.data.imagefolder import write_fashion_mnist
    out = tmp_path_factory.mktemp("fm") / "jpeg"
    write_fashion_mnist(out, train_limit=TRAIN, val_limit=VAL)
    return out


@pytest.mark.parametrize("framework", ["torch", "tensorflow"])
def test_hvdscale_train_on_jpeg_folder(jpeg_folder, tmp_path, framework):
    if framework == "tensorflow":
        pytest.importorskip("hvdscale.tensorflow.optim", reason="the TF optimizers are not in yet")
    out = tmp_path / "run"
    # a short run (4 x 37 steps), so a higher LAMB rate than the recipe's
    horovodrun(2, tool("hvdscale"), "train", REPO / "pipelines/imagefolder_fashion_mnist.yaml",
               "--set", f"framework={framework}", "--set", f"data.path={jpeg_folder}",
               "--set", f"train.epochs={EPOCHS}", "--set", f"batch.per_worker={BATCH}",
               "--set", "optimizer.base_lr=0.02", "--out", out, timeout=300)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [rec for rec in lines if "test_accuracy" in rec and "event" not in rec]
    summary = lines[-1]
    assert summary["event"] == "summary" and summary["workers"] == 2
    assert all(rec["test_examples"] == VAL for rec in evals)
    assert len(evals) == EPOCHS and evals[-1]["step"] == EPOCHS * ((TRAIN // 2) // BATCH)
    # chance is 0.10; the in-memory arrays reach about 0.86 in this budget without augmentation
    assert summary["final_test_accuracy"] >= 0.65, summary
