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


def register() -> None:
    """This backend's one registration (called by hvdscale.registry on its import)."""
    from hvdscale.registry import BackendInfo, register_backend
    register_backend(BackendInfo(
        "torch", "PyTorch through horovod.torch (NCCL on GPUs, MPI or Gloo on CPUs)",
        trainer="hvdscale.torch.trainer:TorchTrainer", display="torch", lr_name="lr", module="torch",
        horovod="horovod.torch", collectives="hvdscale.torch.collectives",
        optimizers={name: f"hvdscale.torch.optim:build_{name}"
                    for name in ("sgd", "sgdw", "lars", "lamb", "adamw")},
        models={name: "hvdscale.torch.models:build_from_config"
                for name in ("cnn", "resnet8", "resnet20", "resnet50", "mlp", "mlp4")},
        model_check="hvdscale.torch.models:check_model",
        dali="hvdscale.torch.dali:OUTPUT",
        # Horovod's grouped DistributedOptimizer broadcasts the parameter order when it is
        # built, which a worker joining a running elastic job would wait on forever
        elastic_groups=False, study=True))

