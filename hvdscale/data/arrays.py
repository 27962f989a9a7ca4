"""In-memory data sets as NumPy arrays and the per-rank batches the trainers consume.

Images are float32 and normalised, channels-last [N, H, W, C] (`to_layout` makes an NCHW
copy once, for callers that want one). Both backends read NHWC: the torch trainer views a
batch as NCHW with channels_last strides, without a copy, and runs its convolutions
channels_last. The backends turn these NumPy batches into framework tensors on their device
(`device_batches`). The order of
training batches is a pure function of (seed, epoch, rank, size), so a resumed run reads
exactly the batches an uninterrupted one would have read.
"""
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from hvdscale.data.sharding import shard_indices
from hvdscale.errors import ConfigError, DataError


@dataclass
class RawArrays:
    """What an in-memory data kind loads (its registry entry's `arrays(data_cfg, seed)`):
    uint8 images [N, H, W(, C)], int64 labels, and the per-channel mean/std of its pixels
    scaled to [0, 1] -- the kind owns its normalisation; the NumPy and DALI paths apply it."""
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    x_val: Optional[np.ndarray] = None     # data.validation: held out of the training set
    y_val: Optional[np.ndarray] = None

    def evaluation(self):
        """(x, y) a run evaluates on: the validation split when there is one, else the test
        set."""
        if self.x_val is not None:
            return self.x_val, self.y_val
        return self.x_test, self.y_test


LAYOUTS = ("NHWC", "NCHW")


@dataclass
class ArrayDataset:
    x: np.ndarray       # float32 [N, H, W, C] or [N, C, H, W] (see `layout`)
    y: np.ndarray       # int64 [N]
    layout: str = "NHWC"

    def __len__(self):
        return len(self.y)

    def to_layout(self, layout):
        """The same data set in `layout`, transposed once into a contiguous array."""
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, not {layout!r}")
        if layout == self.layout:
            return self
        axes = (0, 3, 1, 2) if layout == "NCHW" else (0, 2, 3, 1)
        return ArrayDataset(np.ascontiguousarray(self.x.transpose(axes)), self.y, layout)


def normalise(images, mean, std):
    """uint8 [N, H, W] or [N, H, W, C] -> float32 [N, H, W, C], zero mean, unit variance;
    mean/std of the pixels scaled to [0, 1], one value or one per channel."""
    x = images.astype(np.float32) / 255.0
    if x.ndim == 3:
        x = x[..., None]
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


VALIDATION_SEED = 0      # one split for every run, whatever the run's own seed


def load_raw(data_cfg, seed=0) -> RawArrays:
    """The data kind's own arrays (registry entry `arrays`), the validation split and limits
    applied. data.validation = N holds out N training images, drawn by a fixed seed-0
    permutation, before data.train_limit takes the first images of the rest."""
    from hvdscale.registry import DATA_KINDS, resolve
    kind = DATA_KINDS.get(data_cfg.kind)
    if kind.arrays is None:
        raise ConfigError(f"data.kind {data_cfg.kind!r} has no in-memory arrays (it is read "
                          f"by its own pipeline)")
    raw = resolve(kind.arrays)(data_cfg, seed)
    train_limit = getattr(data_cfg, "train_limit", None)
    test_limit = getattr(data_cfg, "test_limit", None)
    validation = getattr(data_cfg, "validation", None)
    x_train, y_train, x_val, y_val = raw.x_train, raw.y_train, None, None
    if validation:
        if validation >= len(y_train):
            raise DataError(f"data.validation: {validation} images held out of a training set "
                            f"of {len(y_train)} leave none to train on")
        order = np.random.default_rng(VALIDATION_SEED).permutation(len(y_train))
        held, kept = np.sort(order[:validation]), np.sort(order[validation:])
        x_val, y_val = x_train[held], y_train[held]
        x_train, y_train = x_train[kept], y_train[kept]
    return RawArrays(x_train[:train_limit], y_train[:train_limit],
                     raw.x_test[:test_limit], raw.y_test[:test_limit], raw.mean, raw.std,
                     x_val, y_val)


def _dataset(raw, x, y, layout):
    return ArrayDataset(normalise(x, raw.mean, raw.std), y).to_layout(layout)


def load_arrays(data_cfg, seed=0, layout="NHWC"):
    """(train, evaluation) normalised ArrayDatasets of an in-memory data kind, in `layout`:
    the evaluation set is the validation split when data.validation is set, else the test
    set."""
    raw = load_raw(data_cfg, seed)
    return (_dataset(raw, raw.x_train, raw.y_train, layout),
            _dataset(raw, *raw.evaluation(), layout))


def load_splits(data_cfg, seed=0, layout="NHWC"):
    """(train, validation, test) normalised ArrayDatasets; validation is None unless
    data.validation is set. For callers that choose on validation and report on test."""
    raw = load_raw(data_cfg, seed)
    val = None if raw.x_val is None else _dataset(raw, raw.x_val, raw.y_val, layout)
    return (_dataset(raw, raw.x_train, raw.y_train, layout), val,
            _dataset(raw, raw.x_test, raw.y_test, layout))


class TrainBatches:
    # The training-source protocol the engine uses: num_examples, steps_per_epoch and
    # epoch(epoch, start) -> iterator of (x, y) for this rank. A DALI source offers the same.

    """Per-rank training batches: every rank takes `per_step` examples per step from its
    equal shard of the epoch's shuffled order; the tail that fills no full step is dropped."""

    def __init__(self, dataset, rank, size, per_step, seed):
        self.dataset, self.rank, self.size = dataset, rank, size
        self.per_step, self.seed = per_step, seed
        self.num_examples = len(dataset)
        self.steps_per_epoch = (len(dataset) // size) // per_step
        if self.steps_per_epoch == 0:
            raise DataError(f"the training set has {len(dataset)} examples: too few for one step "
                            f"of {per_step} examples on each of {size} workers")

    def epoch(self, epoch, start=0):
        """Yield (x, y) for steps start..steps_per_epoch-1 of `epoch`."""
        idx = shard_indices(len(self.dataset), self.rank, self.size, epoch=epoch,
                            seed=self.seed, shuffle=True, drop_last=True)
        for step in range(start, self.steps_per_epoch):
            take = np.sort(idx[step * self.per_step:(step + 1) * self.per_step])
            yield self.dataset.x[take], self.dataset.y[take]


class EvalBatches:
    """This rank's share of the test set, each example on exactly one rank (the evaluation
    source protocol: num_examples and batches() -> iterator of (x, y))."""

    def __init__(self, dataset, rank, size, batch_size):
        self.dataset, self.batch_size = dataset, batch_size
        self.num_examples = len(dataset)
        self.indices = shard_indices(len(dataset), rank, size, shuffle=False, drop_last=False)

    def batches(self):
        for start in range(0, len(self.indices), self.batch_size):
            take = self.indices[start:start + self.batch_size]
            yield self.dataset.x[take], self.dataset.y[take]
