"""hvdscale's PyTorch adapter. Kept light: the optimizers and the schedule adapter load on first
use; models and the trainer are separate submodules (import hvdscale.torch.models etc.)."""
import importlib

_EXPORTS = {"LARS": "optim", "LAMB": "optim", "build_optimizer": "optim",
            "LRScheduleAdapter": "schedule"}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"hvdscale.torch.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'hvdscale.torch' has no attribute {name!r}")
