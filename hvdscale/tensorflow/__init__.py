"""hvdscale's TensorFlow (Keras 3) adapter. Kept light: the optimizers and the schedule load on
first use; models and the trainer are separate submodules (import hvdscale.tensorflow.models)."""
import importlib

_EXPORTS = {"LARS": "optim", "LAMB": "optim", "build_optimizer": "optim", "CoreSchedule": "schedule"}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"hvdscale.tensorflow.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'hvdscale.tensorflow' has no attribute {name!r}")


def register() -> None:
    """This backend's one registration (called by hvdscale.registry on its import)."""
    from hvdscale.registry import BackendInfo, register_backend
    register_backend(BackendInfo(
        "tensorflow", "TensorFlow 2 / Keras 3 through horovod.tensorflow",
        trainer="hvdscale.tensorflow.trainer:TensorFlowTrainer", display="Keras",
        lr_name="learning_rate", module="tensorflow",
        load="hvdscale.tensorflow.quiet:import_tensorflow", horovod="horovod.tensorflow",
        collectives="hvdscale.tensorflow.collectives",
        option_names={"betas": ("beta_1", "beta_2"), "eps": ("epsilon",)},
        optimizers={name: f"hvdscale.tensorflow.optim:build_{name}"
                    for name in ("sgd", "sgdw", "lars", "lamb", "adamw")},
        models={name: "hvdscale.tensorflow.models:build_from_config"
                for name in ("cnn", "resnet8", "resnet20", "resnet50", "mlp", "mlp4")},
        model_check="hvdscale.tensorflow.models:check_model",
        dali="hvdscale.tensorflow.dali:OUTPUT"))

