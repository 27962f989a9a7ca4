"""hvdscale.data.dali in one process: shapes, layouts, dtypes, value ranges, the exactly-once
and disjoint-shard counts (ranks simulated one after the other), the array path, the decode
choice and bad input. The real two-process runs are in test_dali_multiproc.py."""
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import WORKERS

pytest.importorskip("nvidia.dali")
torch = pytest.importorskip("torch")
torch.set_num_threads(1)
sys.path.insert(0, str(WORKERS))
import dali_images  # noqa: E402

from hvdscale.data import dali  # noqa: E402
from hvdscale.errors import ConfigError, DataError  # noqa: E402

N, BATCH, SIZE = 23, 4, 2
MEAN = np.array(dali.IMAGENET_MEAN) * 255
STD = np.array(dali.IMAGENET_STD) * 255
LOW, HIGH = ((0 - MEAN) / STD).min(), ((255 - MEAN) / STD).max()


def cfg(path, **kw):
    base = dict(kind="imagefolder", path=None if path is None else str(path), image_size=32, num_classes=None,
                skip_corrupt=False, decode="auto", train_limit=None, test_limit=None)
    base.update(kw)
    return SimpleNamespace(**base)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return dali_images.identity_folder(tmp_path_factory.mktemp("ids"), N)


def labels_of(loader):
    return [int(v) for _, labels in loader for v in np.asarray(labels)]


def test_decode_device_is_mixed_only_with_a_gpu():
    assert dali.decode_device("auto", gpus=0) == "cpu"
    assert dali.decode_device("auto", gpus=2) == "mixed"
    assert dali.decode_device("cpu", gpus=2) == "cpu"
    assert dali.decode_device("mixed", gpus=1) == "mixed"
    with pytest.raises(ConfigError, match="needs a GPU"):
        dali.decode_device("mixed", gpus=0)
    with pytest.raises(ConfigError, match="data.decode"):
        dali.decode_device("nvjpeg", gpus=0)


def test_torch_train_batches_are_full_nchw_and_ranks_disjoint(folder):
    loaders = [dali.build_train_loader(cfg(folder), "torch", BATCH, r, SIZE, seed=5)
               for r in range(SIZE)]
    epochs = {r: [] for r in range(SIZE)}
    for r, loader in enumerate(loaders):
        assert loader.steps_per_epoch == (N // SIZE) // BATCH == 2
        for _ in range(2):
            seen = []
            for images, labels in loader:
                assert tuple(images.shape) == (BATCH, 3, 32, 32)
                assert images.dtype == torch.float32 and labels.dtype == torch.int64
                assert LOW - 1e-3 <= float(images.min()) and float(images.max()) <= HIGH + 1e-3
                seen += labels.tolist()
            assert len(seen) == loader.steps_per_epoch * BATCH == len(set(seen))
            epochs[r].append(seen)
    for e in range(2):
        assert not set(epochs[0][e]) & set(epochs[1][e]), "ranks read the same image in one epoch"
    # the whole list is reshuffled every epoch, identically on all ranks
    assert epochs[0][0] + epochs[1][0] != epochs[0][1] + epochs[1][1]


def test_train_order_follows_the_seed(folder):
    def order(seed):
        return labels_of(dali.build_train_loader(cfg(folder), "torch", BATCH, 0, 1, seed=seed))
    assert order(3) == order(3)
    assert order(3) != order(4)


def test_torch_eval_reads_every_image_once_across_ranks(folder):
    counts, seen = [], []
    for r in range(SIZE):
        loader = dali.build_eval_loader(cfg(folder), "torch", BATCH, r, SIZE)
        labels = labels_of(loader)
        sizes = [len(lab) for _, lab in loader]
        assert len(sizes) == loader.steps_per_epoch and sum(sizes) == loader.num_samples
        assert all(s == BATCH for s in sizes[:-1]) and 0 < sizes[-1] <= BATCH
        counts.append(len(labels))
        seen += labels
    assert sorted(seen) == list(range(N)), "evaluation must cover each image exactly once"
    assert sum(counts) == N


def test_fp16_output(folder):
    images, _ = next(iter(dali.build_eval_loader(cfg(folder), "torch", BATCH, 0, 1, fp16=True)))
    assert images.dtype == torch.float16 and tuple(images.shape) == (BATCH, 3, 32, 32)


def test_eval_normalises_exactly_and_centre_crops(tmp_path):
    # A flat colour survives JPEG, resize and crop unchanged: output = (v - mean) / std.
    for k, value in enumerate((30, 200)):
        (tmp_path / "val" / f"c{k}").mkdir(parents=True)
        dali_images.flat_image(tmp_path / "val" / f"c{k}" / "a.jpg", value, width=50, height=36)
    loader = dali.build_eval_loader(cfg(tmp_path), "torch", 2, 0, 1)
    images, labels = next(iter(loader))
    for image, label in zip(images.numpy(), labels.tolist()):
        want = (np.array([30, 200][label]) - MEAN) / STD
        np.testing.assert_allclose(image.mean(axis=(1, 2)), want, atol=2 / 255 / 0.224)
        assert image.std(axis=(1, 2)).max() < 0.02


def test_random_resized_crop_and_flip(tmp_path):
    # A left-to-right ramp: a crop keeps its direction, a flip reverses it.
    ramp = np.tile(np.linspace(0, 255, 90, dtype=np.float32), (60, 1)).astype(np.uint8)
    from PIL import Image
    folder = tmp_path / "train" / "c0"
    folder.mkdir(parents=True)
    for i in range(16):
        Image.fromarray(np.stack([ramp] * 3, -1)).save(folder / f"{i}.png")
    loader = dali.build_train_loader(cfg(tmp_path), "torch", 16, 0, 1, seed=1)
    directions = []
    for _ in range(4):
        for images, _ in loader:
            assert tuple(images.shape) == (16, 3, 32, 32)
            left = images[:, :, :, :8].mean(dim=(1, 2, 3))
            right = images[:, :, :, -8:].mean(dim=(1, 2, 3))
            directions += torch.sign(right - left).tolist()
    flipped = directions.count(-1.0) / len(directions)
    assert 0.2 < flipped < 0.8, f"{flipped:.2f} of the crops were flipped, expected about half"


def test_arrays_through_external_source_two_epochs():
    data = cfg(None, kind="fashion_mnist", image_size=28, train_limit=200, test_limit=50)
    from hvdscale.data.fashion_mnist import load_fashion_mnist
    y_test = load_fashion_mnist()[3][:50]
    seen = []
    for r in range(SIZE):
        train = dali.build_train_loader(data, "torch", 16, r, SIZE, seed=0)
        assert train.steps_per_epoch == 100 // 16
        for _ in range(2):      # the second epoch needs the source to restart
            batches = list(train)
            assert len(batches) == train.steps_per_epoch
            assert tuple(batches[0][0].shape) == (16, 1, 28, 28)
        ev = dali.build_eval_loader(data, "torch", 16, r, SIZE)
        seen += labels_of(ev)
        assert len(list(ev)) == ev.steps_per_epoch
    assert sorted(seen) == sorted(y_test.tolist())


def test_missing_and_empty_folders_are_named(tmp_path):
    with pytest.raises(DataError, match="not found: .*nowhere"):
        dali.build_train_loader(cfg(tmp_path / "nowhere"), "torch", 2)
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "train" / "b").mkdir(parents=True)
    dali_images.flat_image(tmp_path / "train" / "a" / "x.jpg", 9)
    with pytest.raises(DataError, match=r"train/b: empty class folder"):
        dali.build_train_loader(cfg(tmp_path), "torch", 1)
    with pytest.raises(DataError, match="no 'val' folder"):
        dali.build_eval_loader(cfg(tmp_path), "torch", 1)


def test_class_count_must_match_the_recipe(folder):
    with pytest.raises(DataError, match="23 class folders, but data.num_classes is 10"):
        dali.build_eval_loader(cfg(folder, num_classes=10), "torch", 2)


def _corrupt_folder(root):
    dali_images.identity_folder(root, 6, splits=("train",))
    (root / "train" / "c001" / "notes.jpg").write_text("not an image\n")
    good = (root / "train" / "c002" / "img.jpg").read_bytes()
    (root / "train" / "c002" / "cut.jpg").write_bytes(good[: len(good) // 2])
    dali_images.undecodable_jpeg(root / "train" / "c003" / "garbled.jpg")
    return root


def test_corrupt_files_fail_fast_by_default(tmp_path):
    root = _corrupt_folder(tmp_path)
    with pytest.raises(DataError, match=r"c001/notes.jpg: not a readable image"):
        dali.build_train_loader(cfg(root), "torch", 2)
    (root / "train" / "c001" / "notes.jpg").unlink()
    with pytest.raises(DataError, match=r"c002/cut.jpg: truncated JPEG"):
        dali.build_train_loader(cfg(root), "torch", 2)


def test_file_dali_cannot_decode_is_named_when_read(tmp_path):
    root = dali_images.identity_folder(tmp_path, 4, splits=("train",))
    dali_images.undecodable_jpeg(root / "train" / "c003" / "garbled.jpg")
    loader = dali.build_train_loader(cfg(root), "torch", 5, 0, 1)   # passes the marker check
    with pytest.raises(DataError, match=r"c003/garbled.jpg: .*DALI could not decode it"):
        list(loader)


def test_skip_corrupt_leaves_bad_files_out_and_counts_them(tmp_path):
    root = _corrupt_folder(tmp_path)
    loader = dali.build_train_loader(cfg(root, skip_corrupt=True), "torch", 2, 0, 1, seed=0)
    assert sorted(p.rsplit("/", 1)[-1] for p, _ in loader.skipped) == \
        ["cut.jpg", "garbled.jpg", "notes.jpg"]
    assert sorted(labels_of(loader)) == list(range(6))


def test_bad_loader_arguments(folder):
    with pytest.raises(ConfigError, match="framework"):
        dali.build_train_loader(cfg(folder), "jax", 2)
    with pytest.raises(ConfigError, match="rank 2"):
        dali.build_train_loader(cfg(folder), "torch", 2, 2, 2)
    with pytest.raises(DataError, match="too few for one batch"):
        dali.build_train_loader(cfg(folder), "torch", 16, 0, 2)
    with pytest.raises(ConfigError, match="data.path"):
        dali.build_train_loader(cfg(None), "torch", 2)
