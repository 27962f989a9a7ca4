"""The DALI pipeline under `horovodrun -np 2`: each rank reads its own shard of a real JPEG
folder, the two shards of an epoch are disjoint, evaluation covers the set exactly once, and a
file DALI cannot decode stops every rank (no hang) with a message naming it."""
import json
import sys

import pytest

from conftest import WORKERS, horovodrun

pytest.importorskip("nvidia.dali")
pytestmark = pytest.mark.multiproc
sys.path.insert(0, str(WORKERS))
import dali_images  # noqa: E402

from hvdscale.tensorflow.dali import tf_plugin_problem  # noqa: E402

WORKER = WORKERS / "dali_shards.py"
N, BATCH, EPOCHS = 37, 4, 2


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return dali_images.identity_folder(tmp_path_factory.mktemp("ids"), N)


def _ranks(out):
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("framework,backend", [("torch", "auto"), ("tensorflow", "auto"),
                                               ("tensorflow", "tfdata")])
def test_two_ranks_read_disjoint_shards_and_eval_covers_once(folder, tmp_path, framework,
                                                               backend):
    horovodrun(2, sys.executable, WORKER, framework, folder, tmp_path, BATCH, EPOCHS, backend,
               timeout=180)
    ranks = _ranks(tmp_path)
    steps = (N // 2) // BATCH
    for rec in ranks:
        assert rec["size"] == 2 and rec["train_steps"] == steps
        assert all(len(epoch) == steps * BATCH for epoch in rec["train"])
        layout = "(4, 3, 32, 32)" if framework == "torch" else "(4, 32, 32, 3)"
        assert all(layout in shape for shape in rec["train_shapes"])
    if backend == "tfdata":
        assert ranks[0]["loader"] == "TFDataLoader"
    elif framework == "tensorflow" and tf_plugin_problem() is None:
        assert ranks[0]["loader"] == "DaliTFLoader"
    for epoch in range(EPOCHS):
        a, b = (set(rec["train"][epoch]) for rec in ranks)
        assert len(a) == len(b) == steps * BATCH and not a & b
        assert sorted(ranks[0]["eval"][epoch] + ranks[1]["eval"][epoch]) == list(range(N))
    assert ranks[0]["eval_total"] == N
    # a new global shuffle each epoch, the same on both ranks: the union changes
    assert ranks[0]["train"][0] + ranks[1]["train"][0] != ranks[0]["train"][1] + ranks[1]["train"][1]


def test_undecodable_file_stops_both_ranks_and_is_named(tmp_path):
    root = dali_images.identity_folder(tmp_path / "data", 12)
    dali_images.undecodable_jpeg(root / "train" / "c005" / "garbled.jpg")
    out = tmp_path / "out"
    out.mkdir()
    proc = horovodrun(2, sys.executable, WORKER, "torch", root, out, 2, 2, timeout=120,
                      check=False)
    assert proc.returncode != 0
    assert "c005/garbled.jpg" in proc.stdout + proc.stderr
    assert not list(out.glob("rank*.json"))


def test_skip_corrupt_runs_on_both_ranks_and_counts(tmp_path):
    root = dali_images.identity_folder(tmp_path / "data_skip", 12)
    dali_images.undecodable_jpeg(root / "train" / "c005" / "garbled.jpg")
    (root / "train" / "c007" / "readme.jpg").write_text("hello")
    horovodrun(2, sys.executable, WORKER, "torch", root, tmp_path, 2, 1, timeout=120)
    ranks = _ranks(tmp_path)
    assert [rec["skipped"] for rec in ranks] == [2, 2]
    assert sorted(ranks[0]["train"][0] + ranks[1]["train"][0]) == list(range(12))


def test_garbage_between_jpeg_markers_is_named_on_every_rank(tmp_path):
    """Such a file segfaulted DALI's decoder on the rank that read it (exit 139, the other
    rank reported a lost worker); the header check at start names it on every rank."""
    from conftest import REPO, tool
    from hvdscale.data.imagefolder import write_fashion_mnist
    from test_bad_input import refused_by_every_rank
    root = tmp_path / "fm"
    write_fashion_mnist(root, train_limit=200, val_limit=50)
    victim = sorted((root / "train").rglob("*.jpg"))[7]
    dali_images.garbage_between_markers(victim)
    proc = horovodrun(2, tool("hvdscale"), "train",
                      REPO / "pipelines" / "imagefolder_fashion_mnist.yaml",
                      "--set", f"data.path={root}", "--set", "train.max_steps=12",
                      "--set", "lr.warmup_steps=1", "--set", "batch.per_worker=32",
                      "--out", tmp_path / "run", check=False, timeout=180)
    refused_by_every_rank(proc, f"{victim}: JPEG header: garbage where a marker must start")
