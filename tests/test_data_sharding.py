"""Per-rank sharding, the per-epoch shuffle, the Fashion-MNIST reader and the batch sources."""
import gzip
import struct

import numpy as np
import pytest

from hvdscale.config import config_from_dict
from hvdscale.data import build_sources, check_data
from hvdscale.data.arrays import ArrayDataset, EvalBatches, TrainBatches, normalise
from hvdscale.data.fashion_mnist import DEFAULT_ROOT, load_fashion_mnist, read_idx
from hvdscale.data.sharding import shard_indices
from hvdscale.errors import ConfigError, DataError


@pytest.mark.parametrize("n, size", [(10, 2), (11, 2), (100, 3), (7, 8)])
def test_training_shards_are_equal_disjoint_and_reshuffled(n, size):
    shards = [shard_indices(n, r, size, epoch=0, seed=1) for r in range(size)]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == n // size
    joined = np.concatenate(shards)
    assert len(set(joined.tolist())) == len(joined)          # no example on two ranks
    again = [shard_indices(n, r, size, epoch=0, seed=1) for r in range(size)]
    assert all((a == b).all() for a, b in zip(shards, again))  # deterministic
    if n // size > 3:
        other = shard_indices(n, 0, size, epoch=1, seed=1)
        assert not (other == shards[0]).all()                  # reshuffled per epoch


@pytest.mark.parametrize("n, size", [(10, 3), (9, 2), (3, 4)])
def test_eval_shards_cover_every_example_once(n, size):
    shards = [shard_indices(n, r, size, shuffle=False, drop_last=False) for r in range(size)]
    assert sorted(np.concatenate(shards).tolist()) == list(range(n))


def test_shard_rejects_bad_rank():
    with pytest.raises(ConfigError, match="rank 2 is not in a world of size 2"):
        shard_indices(10, 2, 2)


def test_train_batches_resume_mid_epoch_reads_the_same_batches():
    data = ArrayDataset(np.arange(40, dtype=np.float32).reshape(40, 1, 1, 1),
                        np.arange(40, dtype=np.int64))
    src = TrainBatches(data, rank=1, size=2, per_step=4, seed=3)
    assert src.steps_per_epoch == 5
    full = [y for _, y in src.epoch(2)]
    tail = [y for _, y in src.epoch(2, start=3)]
    assert len(full) == 5 and all((a == b).all() for a, b in zip(full[3:], tail))
    assert len(set(np.concatenate(full).tolist())) == 20
    with pytest.raises(DataError, match="too few for one step"):
        TrainBatches(data, rank=0, size=2, per_step=32, seed=0)


def test_eval_batches_split_the_test_set():
    data = ArrayDataset(np.zeros((11, 2, 2, 1), np.float32), np.arange(11, dtype=np.int64))
    seen = [y for r in range(3) for _, y in EvalBatches(data, r, 3, batch_size=2).batches()]
    assert sorted(np.concatenate(seen).tolist()) == list(range(11))


@pytest.mark.skipif(not DEFAULT_ROOT.is_dir(), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_from_debian_package():
    x_train, y_train, x_test, y_test = load_fashion_mnist()
    assert x_train.shape == (60000, 28, 28) and x_test.shape == (10000, 28, 28)
    assert x_train.dtype == np.uint8 and y_train.dtype == np.int64
    assert set(np.unique(y_test).tolist()) == set(range(10))
    x = normalise(x_train[:2000], 0.2860, 0.3530)
    assert x.shape == (2000, 28, 28, 1) and abs(float(x.mean())) < 0.1


def _write_idx(path, array):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def test_idx_reader_names_bad_files(tmp_path):
    good = tmp_path / "ok.gz"
    _write_idx(good, np.arange(24).reshape(2, 3, 4))
    assert read_idx(good).shape == (2, 3, 4)
    truncated = tmp_path / "short.gz"
    with gzip.open(truncated, "wb") as fh:
        fh.write(struct.pack(">HBB", 0, 0x08, 1) + struct.pack(">I", 10) + b"abc")
    with pytest.raises(DataError, match="short.gz: holds 3 bytes of data, its header says 10"):
        read_idx(truncated)
    notidx = tmp_path / "junk.gz"
    with gzip.open(notidx, "wb") as fh:
        fh.write(b"PK\x03\x04 not idx")
    with pytest.raises(DataError, match="junk.gz: not an idx file"):
        read_idx(notidx)


def test_missing_data_set_is_a_data_error_naming_the_path(tmp_path):
    cfg = config_from_dict({"data": {"path": str(tmp_path / "nowhere")}})
    with pytest.raises(DataError, match="nowhere"):
        check_data(cfg.data)
    (tmp_path / "partial").mkdir()
    _write_idx(tmp_path / "partial" / "train-images-idx3-ubyte.gz", np.zeros((1, 28, 28)))
    cfg = config_from_dict({"data": {"path": str(tmp_path / "partial")}})
    with pytest.raises(DataError, match="train-labels-idx1-ubyte"):
        check_data(cfg.data)


def test_imagefolder_without_dali_is_refused_before_training(tmp_path, monkeypatch):
    """DALI reads image folders: where it is not installed the check says so in one line."""
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "nvidia.dali" else real(name, *a))
    cfg = config_from_dict({"data": {"kind": "imagefolder", "path": str(tmp_path)}})
    with pytest.raises(ConfigError, match="^data.kind imagefolder: needs NVIDIA DALI"):
        check_data(cfg.data)


def test_synthetic_sources_are_seeded():
    cfg = config_from_dict({"data": {"kind": "synthetic", "image_size": 8, "train_limit": 64,
                                     "test_limit": 10}, "batch": {"per_worker": 8}})
    train, test = build_sources(cfg, 0, 1)
    (x1, y1), = [next(train.epoch(0))]
    train2, _ = build_sources(cfg, 0, 1)
    x2, y2 = next(train2.epoch(0))
    assert x1.shape == (8, 8, 8, 3) and (x1 == x2).all() and (y1 == y2).all()
    assert test.num_examples == 10 and train.steps_per_epoch == 8
