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

import numpy as np

from hvdscale.data.sharding import shard_indices
from hvdscale.errors import ConfigError, DataError

SYNTHETIC_TRAIN, SYNTHETIC_TEST = 4096, 1024


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
    """uint8 [N, H, W] or [N, H, W, C] -> float32 [N, H, W, C], zero mean, unit variance."""
    x = images.astype(np.float32) / 255.0
    if x.ndim == 3:
        x = x[..., None]
    return (x - np.float32(mean)) / np.float32(std)


def load_arrays(data_cfg, seed=0, layout="NHWC"):
    """(train, test) ArrayDatasets for data.kind fashion_mnist or synthetic, in `layout`."""
    train, test = _load_nhwc(data_cfg, seed)
    return train.to_layout(layout), test.to_layout(layout)


def _load_nhwc(data_cfg, seed):
    if data_cfg.kind == "fashion_mnist":
        from hvdscale.data.fashion_mnist import MEAN, STD, load_fashion_mnist
        x_train, y_train, x_test, y_test = load_fashion_mnist(data_cfg.path)
        train = ArrayDataset(normalise(x_train[:data_cfg.train_limit], MEAN, STD),
                             y_train[:data_cfg.train_limit])
        test = ArrayDataset(normalise(x_test[:data_cfg.test_limit], MEAN, STD),
                            y_test[:data_cfg.test_limit])
        return train, test
    if data_cfg.kind == "synthetic":
        from hvdscale.data.synthetic import synthetic_arrays
        channels = data_cfg.channels or 3
        n_train = data_cfg.train_limit or SYNTHETIC_TRAIN
        n_test = data_cfg.test_limit or SYNTHETIC_TEST
        x, y = synthetic_arrays(n_train + n_test, data_cfg.image_size, channels,
                                data_cfg.num_classes, seed=seed)
        x = normalise(x, 127.5, 73.9)   # uniform bytes: mean 127.5, std ~73.9
        return ArrayDataset(x[:n_train], y[:n_train]), ArrayDataset(x[n_train:], y[n_train:])
    raise ConfigError(f"data.kind {data_cfg.kind!r} is read by the DALI pipeline "
                      f"(hvdscale/data/dali.py), which is not available in this build")


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
