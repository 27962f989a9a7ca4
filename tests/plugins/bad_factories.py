"""Model and data factories that are wrong in one way each (tests/test_byo.py)."""
import numpy as np


def returns_string(cfg):
    return "not a model"


def wrong_classes(cfg):
    from torch import nn
    return nn.Sequential(nn.Flatten(), nn.Linear(cfg.in_channels * cfg.data.image_size ** 2, 3))


def wrong_input(cfg):
    from torch import nn
    return nn.Sequential(nn.Flatten(), nn.Linear(7, cfg.data.num_classes))


def raises(cfg):
    raise RuntimeError("cannot reach the weights server")


def not_a_pair(cfg):
    return np.zeros((4, 16, 16, 1), np.float32)


def wrong_shape(cfg):
    x, y = np.zeros((64, 16, 16, 3), np.float32), np.zeros(64, np.int64)
    return (x, y), (x, y)


def labels_out_of_range(cfg):
    x, y = np.zeros((64, 16, 16, 1), np.float32), np.arange(64) % 7
    return (x, y), (x, y)


NOT_CALLABLE = 3
