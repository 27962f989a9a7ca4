"""train.precision on a CPU: bf16 really computes in bf16 in both frameworks while weights and
optimizer state stay fp32 and the model learns; fp16 (loss scaling, GPU only) and
train.compile are refused with one line before training starts."""
import os

import numpy as np
import pytest

from hvdscale.cli import main
from hvdscale.comm import Comm
from hvdscale.config import config_from_dict

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def fashion_cfg(framework, precision):
    return config_from_dict({
        "framework": framework, "model": {"name": "cnn"},
        "data": {"kind": "fashion_mnist", "train_limit": 512, "test_limit": 100},
        "batch": {"per_worker": 64, "reference": 64},
        "optimizer": {"name": "lamb", "base_lr": 0.01},
        "lr": {"warmup_steps": 2, "decay": "constant"},
        "train": {"precision": precision, "threads": 1, "epochs": 3},
        "log": {"progress": False, "tensorboard": False}})


def train_epochs(trainer, cfg, epochs=3):
    """Mean training loss of each epoch (statistics read once per epoch)."""
    from hvdscale.data import build_sources
    train, evaluate = build_sources(cfg, 0, 1)
    means = []
    for epoch in range(epochs):
        for batch in trainer.device_batches(train.epoch(epoch)):
            trainer.train_step(batch, 0.01)
        stats = trainer.read_stats()
        means.append(stats["loss_sum"] / stats["examples"])
    return means, trainer.evaluate(evaluate.batches())


def test_torch_bf16_autocast_with_fp32_master_weights():
    import torch
    from hvdscale.torch.trainer import TorchTrainer
    cfg = fashion_cfg("torch", "bf16")
    trainer = TorchTrainer(cfg, Comm("torch"), threads=1)
    trainer.build()
    seen = []
    conv = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    means, (correct, count, loss_sum) = train_epochs(trainer, cfg)
    assert set(seen) == {torch.bfloat16}                    # the arithmetic is bf16
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    state = [v for s in trainer.optimizer.state.values() for v in s.values()
             if torch.is_tensor(v) and v.is_floating_point() and v.dim() > 0]
    assert state and all(v.dtype == torch.float32 for v in state)
    assert means[-1] < means[0] * 0.8, means                # and it learns
    assert count == 100 and correct > 40 and np.isfinite(loss_sum)


def test_tensorflow_bf16_mixed_policy_with_fp32_variables():
    tf = pytest.importorskip("tensorflow")
    from hvdscale.tensorflow.trainer import TensorFlowTrainer
    cfg = fashion_cfg("tensorflow", "bf16")
    trainer = TensorFlowTrainer(cfg, Comm("tensorflow"), threads=1)
    trainer.build()
    convs = [layer for layer in trainer.model._flatten_layers()
             if type(layer).__name__ == "Conv2D"]
    assert convs and all(layer.compute_dtype == "bfloat16" for layer in convs)
    assert all(v.dtype == "float32" for v in trainer.model.trainable_variables)
    assert all(v.dtype in ("float32", "int64") for v in trainer.optimizer.variables)
    means, (correct, count, loss_sum) = train_epochs(trainer, cfg)
    assert means[-1] < means[0] * 0.8, means
    assert count == 100 and correct > 40 and np.isfinite(loss_sum)
    import keras
    assert keras.config.dtype_policy().name == "float32"     # the global policy is restored
    del tf


@pytest.mark.parametrize("framework", ["torch", "tensorflow"])
@pytest.mark.parametrize("setting,message", [
    ("train.precision=fp16", "train.precision fp16 needs a"),
    ("train.compile=true", "train.compile"),
])
def test_unsupported_combinations_are_refused_before_training(framework, setting, message,
                                                              tmp_path, capsys):
    rc = main(["train", "--no-horovod", "--set", f"framework={framework}", "--set", setting,
               "--set", "data.train_limit=256", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
