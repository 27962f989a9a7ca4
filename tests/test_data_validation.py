"""data.validation: a fixed held-out part of the training set becomes the evaluation set;
train, validation and test are a partition of the data (no image in two of them), the split
does not depend on the run's seed, and the test set is left as it was."""
from pathlib import Path

import numpy as np
import pytest

from hvdscale.config import load_config
from hvdscale.data.arrays import load_arrays, load_raw, load_splits
from hvdscale.data.fashion_mnist import load_fashion_mnist
from hvdscale.errors import DataError

DATA = Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="Debian's dataset-fashion-mnist missing")
RECIPE = "pipelines/sweep_sgd.yaml"


def _rows(x):
    """Each image as one hashable byte string (a multiset of images, duplicates counted)."""
    from collections import Counter
    return Counter(bytes(r) for r in x.reshape(len(x), -1))


def test_validation_split_partitions_the_training_set():
    cfg = load_config(RECIPE, ["data.validation=5000"])
    raw = load_raw(cfg.data, seed=7)
    x_train, y_train, x_test, y_test = load_fashion_mnist()
    assert (len(raw.y_train), len(raw.y_val), len(raw.y_test)) == (55000, 5000, 10000)
    # train + validation is the original training set, image for image (duplicates counted)
    assert _rows(raw.x_train) + _rows(raw.x_val) == _rows(x_train)
    assert sorted(np.concatenate([raw.y_train, raw.y_val]).tolist()) == sorted(y_train.tolist())
    # the test set is untouched and nothing of it leaks into validation
    np.testing.assert_array_equal(raw.x_test, x_test)
    np.testing.assert_array_equal(raw.y_test, y_test)
    assert not set(_rows(raw.x_val)) & set(_rows(x_test)) - set(_rows(x_train))
    # every class is in the validation set (a random draw, not the first 5000 images)
    assert set(raw.y_val.tolist()) == set(range(10))
    # the split is one for every run: a different run seed draws the same validation images
    other = load_raw(cfg.data, seed=123)
    np.testing.assert_array_equal(other.x_val, raw.x_val)


def test_runs_evaluate_on_validation_and_splits_keep_test_apart():
    cfg = load_config(RECIPE, ["data.validation=5000", "data.train_limit=1000"])
    train, evaluation = load_arrays(cfg.data)
    train2, val, test = load_splits(cfg.data)
    assert len(train) == 1000 and len(evaluation) == len(val) == 5000 and len(test) == 10000
    np.testing.assert_array_equal(evaluation.x, val.x)
    np.testing.assert_array_equal(train.x, train2.x)
    plain_train, plain_eval = load_arrays(load_config(RECIPE, ["data.train_limit=1000"]).data)
    np.testing.assert_array_equal(plain_eval.x, test.x)      # without the setting: test, as before
    assert load_splits(load_config(RECIPE).data)[1] is None


def test_a_validation_split_leaving_nothing_to_train_is_refused():
    cfg = load_config(RECIPE, ["data.validation=60000"])
    with pytest.raises(DataError, match="data.validation"):
        load_raw(cfg.data)
