"""Data and model factories for the preemption-timing and bad-data tests
(tests/test_preemption_timing.py), used with examples/byo/recipe.yaml (16 px, 1 channel,
4 classes)."""
import os

import numpy as np


def _arrays(cfg, n, seed):
    rng = np.random.default_rng(seed)
    size, channels = cfg.data.image_size, cfg.in_channels
    x = rng.normal(size=(n, size, size, channels)).astype(np.float32)
    return x, (np.arange(n) % cfg.data.num_classes).astype(np.int64)


def uneven_by_rank(cfg):
    """What a factory that reads a per-node file can do: rank 1 gets fewer examples."""
    rank = int(os.environ.get("HOROVOD_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")))
    return _arrays(cfg, 512 - 64 * rank, 0), _arrays(cfg, 128, 1)


def no_test_examples(cfg):
    return _arrays(cfg, 256, 0), _arrays(cfg, 0, 1)


def big_state(cfg):
    """A small trainable model that carries a large non-trainable buffer (100 MB), so
    that writing its checkpoint takes long enough to send a signal in the middle of it."""
    import torch
    from torch import nn

    model = nn.Sequential(nn.Flatten(),
                          nn.Linear(cfg.in_channels * cfg.data.image_size ** 2,
                                    cfg.data.num_classes))
    # integers: not averaged by sync_statistics; ones: not a sparse file on disk
    model.register_buffer("ballast", torch.ones(25_000_000, dtype=torch.int32))
    return model
