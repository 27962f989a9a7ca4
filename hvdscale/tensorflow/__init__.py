"""hvdscale's TensorFlow (Keras 3) adapter. Kept light: the optimizers and the schedule load on
first use; models and the trainer are separate submodules (import hvdscale.tensorflow.models)."""
import importlib

_EXPORTS = {"LARS": "optim", "LAMB": "optim", "build_optimizer": "optim", "CoreSchedule": "schedule"}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"hvdscale.tensorflow.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'hvdscale.tensorflow' has no attribute {name!r}")
