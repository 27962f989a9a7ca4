"""The image-folder pipeline for TensorFlow in one process: through DALI's TF plugin (when it
is installed) and through the tf.data fallback; NHWC, dtypes, ranges, exactly-once eval."""
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import WORKERS

pytest.importorskip("nvidia.dali")
tf = pytest.importorskip("tensorflow")
sys.path.insert(0, str(WORKERS))
import dali_images  # noqa: E402

from hvdscale.data import dali  # noqa: E402
from hvdscale.data.tfdata import TFDataLoader  # noqa: E402
from hvdscale.tensorflow.dali import tf_plugin_problem  # noqa: E402

N, BATCH, SIZE = 23, 4, 2
MEAN = np.array(dali.IMAGENET_MEAN) * 255
STD = np.array(dali.IMAGENET_STD) * 255
LOW, HIGH = ((0 - MEAN) / STD).min(), ((255 - MEAN) / STD).max()
PLUGIN = pytest.param("dali", marks=pytest.mark.skipif(
    tf_plugin_problem() is not None, reason=f"DALI TF plugin: {tf_plugin_problem()}"))


def cfg(path, **kw):
    base = dict(kind="imagefolder", path=None if path is None else str(path), image_size=32, num_classes=None,
                skip_corrupt=False, decode="auto", train_limit=None, test_limit=None)
    base.update(kw)
    return SimpleNamespace(**base)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return dali_images.identity_folder(tmp_path_factory.mktemp("ids"), N)


@pytest.mark.parametrize("backend", [PLUGIN, "tfdata"])
def test_tf_train_nhwc_full_batches_disjoint_ranks(folder, backend):
    per_rank = []
    for r in range(SIZE):
        loader = dali.build_train_loader(cfg(folder), "tensorflow", BATCH, r, SIZE, seed=2,
                                         tf_backend=backend)
        assert (backend == "tfdata") == isinstance(loader, TFDataLoader)
        assert loader.steps_per_epoch == (N // SIZE) // BATCH
        for _ in range(2):
            seen = []
            for images, labels in loader:
                assert tuple(images.shape) == (BATCH, 32, 32, 3)
                assert images.dtype == tf.float32 and labels.dtype == tf.int64
                assert LOW - 1e-3 <= float(tf.reduce_min(images))
                assert float(tf.reduce_max(images)) <= HIGH + 1e-3
                seen += labels.numpy().tolist()
            assert len(seen) == loader.steps_per_epoch * BATCH == len(set(seen))
        per_rank.append(set(seen))
    assert not per_rank[0] & per_rank[1]


@pytest.mark.parametrize("backend", [PLUGIN, "tfdata"])
def test_tf_eval_exactly_once_and_fp16(folder, backend):
    seen = []
    for r in range(SIZE):
        loader = dali.build_eval_loader(cfg(folder), "tensorflow", BATCH, r, SIZE, fp16=True,
                                        tf_backend=backend)
        batches = list(loader)
        assert len(batches) == loader.steps_per_epoch
        assert all(images.dtype == tf.float16 for images, _ in batches)
        assert all(images.shape[1:] == (32, 32, 3) for images, _ in batches)
        seen += [int(v) for _, labels in batches for v in labels.numpy()]
    assert sorted(seen) == list(range(N))


@pytest.mark.parametrize("backend", [PLUGIN, "tfdata"])
def test_tf_eval_normalises_flat_images_exactly(tmp_path, backend):
    for k, value in enumerate((30, 200)):
        (tmp_path / "val" / f"c{k}").mkdir(parents=True)
        dali_images.flat_image(tmp_path / "val" / f"c{k}" / "a.jpg", value, width=50, height=36)
    images, labels = next(iter(dali.build_eval_loader(cfg(tmp_path), "tensorflow", 2, 0, 1,
                                                      tf_backend=backend)))
    for image, label in zip(images.numpy(), labels.numpy()):
        want = (np.array([30, 200][label]) - MEAN) / STD
        np.testing.assert_allclose(image.mean(axis=(0, 1)), want, atol=2 / 255 / 0.224)


def test_tf_arrays_through_external_source():
    data = cfg(None, kind="fashion_mnist", image_size=28, train_limit=96,
               test_limit=40)
    train = dali.build_train_loader(data, "tensorflow", 16, 0, 1)
    for _ in range(2):
        batches = list(train)
        assert len(batches) == 6 and tuple(batches[0][0].shape) == (16, 28, 28, 1)
    ev = list(dali.build_eval_loader(data, "tensorflow", 16, 0, 1))
    assert [len(labels) for _, labels in ev] == [16, 16, 8]
