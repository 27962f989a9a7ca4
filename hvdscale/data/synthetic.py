"""Synthetic images for `hvdscale bench` and for tests: random pixels, random labels, fixed by
the seed so every run of a benchmark sees the same bytes."""
import numpy as np

# Uniform bytes 0..255 scaled to [0, 1]: mean 0.5, std sqrt((256^2 - 1) / 12) / 255.
MEAN, STD = 0.5, 0.28986
TRAIN_EXAMPLES, TEST_EXAMPLES = 4096, 1024      # when data.train_limit / test_limit are unset


def synthetic_arrays(count, image_size, channels, num_classes, seed=0):
    """(x, y): uint8 [count, H, W, C] images and int64 labels (channels-last like the loaders)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(count, image_size, image_size, channels), dtype=np.uint8)
    y = rng.integers(0, num_classes, size=(count,), dtype=np.int64)
    return x, y


def load_raw(data_cfg, seed=0):
    """data.kind synthetic as the data layer's RawArrays (its registry entry's `arrays`)."""
    from hvdscale.data.arrays import RawArrays
    channels = getattr(data_cfg, "channels", None) or 3
    n_train = getattr(data_cfg, "train_limit", None) or TRAIN_EXAMPLES
    n_test = getattr(data_cfg, "test_limit", None) or TEST_EXAMPLES
    x, y = synthetic_arrays(n_train + n_test, data_cfg.image_size, channels,
                            data_cfg.num_classes, seed=seed)
    return RawArrays(x[:n_train], y[:n_train], x[n_train:], y[n_train:],
                     (MEAN,) * channels, (STD,) * channels)
