"""The smallest backend: only what every backend must do (hvdscale.engine.backend.Backend),
registered as framework `numpy_minimal`. The fake's trainer without its optional parts: no
CheckpointSupport, AccumulationSupport, ElasticSupport or MetricsSupport. The conformance
tests run the engine with it: a run writes no checkpoints, and --resume is refused."""
from hvdscale.registry import BACKENDS, BackendInfo, register_backend
from hvdscale_numpy.trainer import NumpyTrainer

CORE = ("build", "device_batches", "poisoned", "train_step", "read_stats", "evaluate",
        "sync_statistics")


class MinimalTrainer:
    framework = "numpy_minimal"
    device_description = "cpu"

    def __init__(self, cfg, comm, threads, model_fn=None):
        full = NumpyTrainer(cfg, comm, threads, model_fn)
        self.optimizer_name, self.precision = full.optimizer_name, full.precision
        for name in CORE:
            setattr(self, name, getattr(full, name))


if "numpy_minimal" not in BACKENDS:
    register_backend(BackendInfo(
        "numpy_minimal", "the numpy fake with the Backend core only",
        trainer="hvdscale_numpy.minimal:MinimalTrainer", display="numpy_minimal",
        lr_name="lr", module="numpy",
        optimizers={"sgd": "hvdscale_numpy.nn:build_sgd"},
        models={"mlp": "hvdscale_numpy.nn:build_mlp"},
        model_check="hvdscale_numpy.nn:check_model"))
