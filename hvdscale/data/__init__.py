"""Input data: Fashion-MNIST from Debian's package, per-rank sharding, synthetic images, and
the sources the engine reads batches from (ImageNet-layout folders come through DALI).

A training source has `num_examples`, `steps_per_epoch` and `epoch(epoch, start)` yielding this
rank's (x, y) batches (NHWC float32, int64); an evaluation source has `num_examples` and
`batches()` covering this rank's share of the test set.
"""
from pathlib import Path

from hvdscale.errors import ConfigError

EVAL_BATCH = 500


def check_data(data_cfg):
    """Cheap existence checks that can run before Horovod starts (same verdict on all ranks)."""
    if data_cfg.kind == "fashion_mnist":
        from hvdscale.data.fashion_mnist import DEFAULT_ROOT, FILES, _find
        root = Path(data_cfg.path) if data_cfg.path else DEFAULT_ROOT
        for stem, _ in FILES.values():
            _find(root, stem)      # DataError naming the path when missing
    elif data_cfg.kind == "imagefolder":
        _dali_module()


def _dali_module():
    try:
        from hvdscale.data import dali
    except ImportError as err:
        raise ConfigError(f"data.kind imagefolder needs the DALI pipeline "
                          f"(hvdscale.data.dali): {err}") from None
    if not hasattr(dali, "build_sources"):
        raise ConfigError("data.kind imagefolder: hvdscale.data.dali has no build_sources() "
                          "for the training engine yet")
    return dali


def build_sources(cfg, rank, size):
    """(train source, eval source) for this rank."""
    per_step = cfg.batch.per_worker * cfg.batch.accumulation
    eval_batch = max(EVAL_BATCH, cfg.batch.per_worker)
    if cfg.data.kind == "imagefolder":
        return _dali_module().build_sources(cfg, rank, size)
    from hvdscale.data.arrays import EvalBatches, TrainBatches, load_arrays
    train, test = load_arrays(cfg.data, seed=cfg.train.seed)
    return (TrainBatches(train, rank, size, per_step, cfg.train.seed),
            EvalBatches(test, rank, size, eval_batch))
