"""Your own data for `hvdscale train`: a factory that gets the validated Config and returns
`((x_train, y_train), (x_test, y_test))` as NumPy arrays.

    data: {kind: "byo_data:load", image_size: 16, num_classes: 4, channels: 1}

Images are float32 [N, H, W, C] (channels last, whatever the framework; hvdscale transposes
once for torch), already normalised, with H = W = data.image_size and C = data.channels;
labels are integers in [0, data.num_classes). Every rank calls the factory and gets the same
arrays; hvdscale shards, shuffles and batches them per rank, so return the whole data set.

This one makes a small learnable set: each class is a fixed random pattern plus noise.
"""
import numpy as np


def load(cfg):
    d = cfg.data
    rng = np.random.default_rng(1234)           # the same arrays on every rank
    shape = (d.image_size, d.image_size, cfg.in_channels)
    patterns = rng.normal(size=(d.num_classes, *shape)).astype(np.float32)

    def split(n):
        labels = rng.integers(0, d.num_classes, size=n)
        noise = rng.normal(scale=1.5, size=(n, *shape)).astype(np.float32)
        return (patterns[labels] + noise) / np.float32(1.8), labels.astype(np.int64)

    return split(d.train_limit or 2048), split(d.test_limit or 512)
