"""Input data: the data-kind registry's builders (hvdscale.registry.DATA_KINDS), per-rank
sharding, and the sources the engine reads batches from.

A training source has `num_examples`, `steps_per_epoch` and `epoch(epoch, start)` yielding this
rank's (x, y) batches; an evaluation source has `num_examples` and `batches()` covering this
rank's share of the test set. In-memory data comes as NHWC NumPy arrays (the torch trainer
views them as NCHW with channels_last strides, without a copy), DALI data as framework
tensors. The backend's `device_batches()` puts them on the worker's device.

Your own data (`data.kind: "package.module:factory"`, docs/extending.md): the factory gets the
Config and returns `((x_train, y_train), (x_test, y_test))` as NumPy arrays, images float32
[N, H, W, C] (H = W = data.image_size, C = data.channels, default 3), labels integers in
[0, data.num_classes). hvdscale checks them, shards them per rank and batches them.
"""
from pathlib import Path
from typing import Any, Tuple

import numpy as np

from hvdscale import registry
from hvdscale.errors import ConfigError, DataError

EVAL_BATCH = 500


def check_data(data_cfg: Any) -> None:
    """Cheap checks that can run before Horovod starts (same verdict on all ranks)."""
    if registry.is_entry_point(data_cfg.kind) and data_cfg.kind not in registry.DATA_KINDS:
        registry.check_entry_point(data_cfg.kind, "data.kind")
        return
    kind = registry.DATA_KINDS.get(data_cfg.kind)
    if kind.check is not None:
        registry.resolve(kind.check)(data_cfg)


def build_sources(cfg: Any, rank: int, size: int) -> Tuple[Any, Any]:
    """(train source, eval source) for this rank, from the registered kind or the recipe's
    own "package.module:factory"."""
    if registry.is_entry_point(cfg.data.kind) and cfg.data.kind not in registry.DATA_KINDS:
        return user_sources(cfg, rank, size)
    return registry.resolve(registry.DATA_KINDS.get(cfg.data.kind).sources)(cfg, rank, size)


def check_sources(comm: Any, kind: str, train: Any, test: Any) -> None:
    """Refuse, on every rank alike, data the ranks cannot train on together: ranks that
    hold data sets of different sizes (they would run different numbers of steps and wait
    for each other in a collective until the step watchdog fires; e.g. a data factory that
    reads a per-node file) and an empty evaluation set (it would report accuracy 0.0).
    One allreduce of this rank's sizes."""
    sizes = np.array([train.num_examples, train.steps_per_epoch, test.num_examples],
                     dtype=np.int64)
    both = comm.allreduce(np.concatenate([sizes, -sizes]), op="max")
    high, low = both[:3], -both[3:]
    if (high != low).any():
        raise DataError(f"data.kind {kind!r}: the {comm.size} ranks hold data sets of "
                        f"different sizes (train {low[0]}..{high[0]} examples, test "
                        f"{low[2]}..{high[2]}); every rank must load the same whole data "
                        f"set (hvdscale gives each rank its shard)")
    if high[2] == 0:
        raise DataError(f"data.kind {kind!r}: the evaluation set is empty (0 test examples); "
                        f"accuracy cannot be measured")


# --------------------------------------------------------------------------- built-in kinds
def check_fashion_mnist(data_cfg: Any) -> None:
    from hvdscale.data.fashion_mnist import DEFAULT_ROOT, FILES, _find
    root = Path(data_cfg.path) if data_cfg.path else DEFAULT_ROOT
    for stem, _ in FILES.values():
        _find(root, stem)      # DataError naming the path when missing


def check_dali(data_cfg: Any) -> None:
    """imagefolder is read by DALI: refuse it up front where DALI is not installed."""
    import importlib.util
    try:
        found = importlib.util.find_spec("nvidia.dali")
    except (ImportError, ValueError):
        found = None
    if found is None:
        raise ConfigError(f"data.kind {data_cfg.kind}: needs NVIDIA DALI (nvidia-dali), "
                          f"which is not installed")


def dali_sources(cfg: Any, rank: int, size: int) -> Tuple[Any, Any]:
    from hvdscale.data.dali import build_sources
    return build_sources(cfg, rank, size)


def _layout(cfg: Any) -> str:
    # both backends read NHWC arrays: torch views them as NCHW with channels_last strides
    return "NHWC"


def array_batches(cfg: Any, rank: int, size: int, train: Any, test: Any) -> Tuple[Any, Any]:
    """The engine's sources over two in-memory ArrayDatasets (hvdscale.data.arrays) already in
    the backend's layout: this rank's shuffled shard of `train`, its share of `test`."""
    from hvdscale.data.arrays import EvalBatches, TrainBatches
    per_step = cfg.batch.per_worker * cfg.batch.accumulation
    eval_batch = max(EVAL_BATCH, cfg.batch.per_worker)
    return (TrainBatches(train, rank, size, per_step, cfg.train.seed),
            EvalBatches(test, rank, size, eval_batch))


def array_sources(cfg: Any, rank: int, size: int) -> Tuple[Any, Any]:
    """fashion_mnist and synthetic: NumPy arrays in memory."""
    from hvdscale.data.arrays import load_arrays
    train, test = load_arrays(cfg.data, seed=cfg.train.seed, layout=_layout(cfg))
    return array_batches(cfg, rank, size, train, test)


# --------------------------------------------------------------------------- your own data
def user_sources(cfg: Any, rank: int, size: int) -> Tuple[Any, Any]:
    """Sources from `data.kind: "package.module:factory"`; every mistake in what the factory
    returns is a DataError naming the entry point."""
    from hvdscale.data.arrays import ArrayDataset
    where = f"data.kind {cfg.data.kind!r}"
    factory = registry.load_entry_point(cfg.data.kind, "data.kind")
    result = registry.call_factory(factory, cfg, where)
    if not (isinstance(result, (tuple, list)) and len(result) == 2):
        raise DataError(f"{where}: expected ((x_train, y_train), (x_test, y_test)), got "
                        f"{_kind(result)}")
    split = []
    for name, pair in zip(("train", "test"), result):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise DataError(f"{where}: the {name} part must be a pair (x, y), got {_kind(pair)}")
        x, y = _check_arrays(cfg, where, name, *pair)
        split.append(ArrayDataset(x, y, "NHWC").to_layout(_layout(cfg)))
    return array_batches(cfg, rank, size, *split)


def _kind(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}"
    return type(value).__name__


def _check_arrays(cfg: Any, where: str, name: str, x: Any, y: Any):
    if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray):
        raise DataError(f"{where}: {name} images and labels must be NumPy arrays, got "
                        f"{type(x).__name__} and {type(y).__name__}")
    d = cfg.data
    want = (d.image_size, d.image_size, cfg.in_channels)
    if x.ndim != 4 or tuple(x.shape[1:]) != want:
        raise DataError(f"{where}: {name} images have shape {tuple(x.shape)}, expected "
                        f"[N, {want[0]}, {want[1]}, {want[2]}] (NHWC: data.image_size, "
                        f"data.channels)")
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(f"{where}: {name} labels have shape {tuple(y.shape)}, expected "
                        f"[{len(x)}] (one integer per image)")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{where}: {name} labels are {y.dtype}, expected integers")
    if len(y) and (y.min() < 0 or y.max() >= d.num_classes):
        raise DataError(f"{where}: {name} labels span {int(y.min())}..{int(y.max())}, "
                        f"outside 0..{d.num_classes - 1} (data.num_classes {d.num_classes})")
    if not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{where}: {name} images are {x.dtype}, expected float32 "
                        "(normalise them in the factory)")
    return np.ascontiguousarray(x, dtype=np.float32), y.astype(np.int64)
