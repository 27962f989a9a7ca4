"""What the pipelines read and how it is cut per rank: the image-file lists of a data kind on
disk, the in-memory arrays' external source, and the per-rank batch counts.

Shard `rank` of `size` is a contiguous slice of the file list, as DALI's file reader cuts it,
so shards are disjoint and cover the set. Training runs floor(floor(N/size)/batch) full
batches on every rank, the same number everywhere, as the gradient allreduce needs;
evaluation reads each image exactly once across ranks."""
import math

import numpy as np

from hvdscale.errors import ConfigError, DataError


def reader_shard_bounds(n, shard_id, num_shards):
    """[start, end) of shard `shard_id` in the file list, as DALI's readers cut it."""
    return n * shard_id // num_shards, n * (shard_id + 1) // num_shards


def train_steps(n, size, batch_size):
    """Full batches per epoch on every rank: the smallest shard, floor(n/size), in batches."""
    return (n // size) // batch_size


def eval_steps(n, rank, size, batch_size):
    start, end = reader_shard_bounds(n, rank, size)
    return math.ceil((end - start) / batch_size)


def setting(cfg_data, name, default=None):
    """A data setting; loaders also take a partial namespace (tests, benchmarks)."""
    return getattr(cfg_data, name, default)


def list_split(cfg_data, train, check="markers", threads=1):
    """The validated, limited file list of the train or val split of `cfg_data.path` (an
    ImageNet-layout folder: the `files` of data kind imagefolder's registry entry)."""
    from hvdscale.data.imagefolder import list_images, split_dir

    if not setting(cfg_data, "path"):
        raise ConfigError(f"data.path must name the image directory for data.kind: "
                          f"{setting(cfg_data, 'kind', 'imagefolder')}")
    split = "train" if train else "val"
    skip = bool(setting(cfg_data, "skip_corrupt", False))
    listing = list_images(split_dir(cfg_data.path, split), check="decode" if skip else check,
                          skip_corrupt=skip, threads=threads)
    limit = setting(cfg_data, "train_limit" if train else "test_limit")
    if limit and limit < len(listing):
        # An evenly spaced subset keeps every class (the list is sorted by class).
        keep = np.linspace(0, len(listing) - 1, limit).round().astype(int)
        listing.files = [listing.files[i] for i in keep]
        listing.labels = listing.labels[keep]
    classes = setting(cfg_data, "num_classes")
    if classes and len(listing.classes) != classes:
        raise DataError(f"{listing.root}: {len(listing.classes)} class folders, "
                        f"but data.num_classes is {classes}")
    return listing


class ArrayEpochs:
    """External-source input: every iter() is the next epoch of this rank's batches
    (sharding.shard_indices: a seeded shuffle per epoch for training, exactly once for eval)."""

    def __init__(self, x, y, rank, size, batch_size, seed, train):
        from hvdscale.data.sharding import shard_indices

        self._shard = shard_indices
        self.x = x if x.ndim == 4 else x[..., None]
        self.y = np.asarray(y, dtype=np.int64)
        self.rank, self.size, self.batch_size = rank, size, batch_size
        self.seed, self.train, self.epoch = seed, train, 0
        n_rank = len(self._indices(0))
        self.steps = n_rank // batch_size if train else math.ceil(n_rank / batch_size)
        self.num_samples = self.steps * batch_size if train else n_rank

    def _indices(self, epoch):
        return self._shard(len(self.y), self.rank, self.size, epoch=epoch, seed=self.seed,
                           shuffle=self.train, drop_last=self.train)

    def __iter__(self):
        idx = self._indices(self.epoch)
        self.epoch += 1
        for step in range(self.steps):
            take = np.sort(idx[step * self.batch_size:(step + 1) * self.batch_size])
            yield np.ascontiguousarray(self.x[take]), self.y[take]
