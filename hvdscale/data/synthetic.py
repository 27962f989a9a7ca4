"""Synthetic images for `hvdscale bench` and for tests: random pixels, random labels, fixed by
the seed so every run of a benchmark sees the same bytes."""
import numpy as np


def synthetic_arrays(count, image_size, channels, num_classes, seed=0):
    """(x, y): uint8 [count, H, W, C] images and int64 labels (channels-last like the loaders)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(count, image_size, image_size, channels), dtype=np.uint8)
    y = rng.integers(0, num_classes, size=(count,), dtype=np.int64)
    return x, y
