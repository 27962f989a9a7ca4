"""The data path of engine protocol v2 on a CPU: the trainers receive framework tensors on
their device in their layout (never NumPy; torch: an NCHW view of the NHWC arrays with
channels_last strides, no per-batch transposition), and a training step reads nothing from the device -- host reads are counted over several
steps with the reading methods of torch/TF tensors patched."""
import os

import numpy as np
import pytest

from hvdscale.comm import Comm
from hvdscale.config import config_from_dict

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

STEPS = 6


def small_cfg(framework, **sections):
    raw = {"framework": framework, "model": {"name": "cnn"},
           "data": {"kind": "synthetic", "image_size": 12, "channels": 1, "num_classes": 10,
                    "train_limit": 256, "test_limit": 64},
           "batch": {"per_worker": 32, "reference": 32},
           "optimizer": {"name": "lamb", "base_lr": 0.01},
           "lr": {"warmup_steps": 1, "decay": "constant"},
           "train": {"epochs": 1, "threads": 1, "eval_every_steps": None,
                     "eval_every_epochs": 1},
           "checkpoint": {"every_epochs": None}, "log": {"progress": False,
                                                        "tensorboard": False}}
    for key, values in sections.items():
        raw.setdefault(key, {}).update(values)
    return config_from_dict(raw)


def make_trainer(cfg):
    from hvdscale.commands.train import make_trainer as make
    trainer = make(cfg, Comm(cfg.framework), threads=1)
    trainer.build()
    return trainer


# ------------------------------------------------------------------ layouts and types
def test_array_data_is_not_transposed_per_batch():
    from hvdscale.data import build_sources
    from hvdscale.data.arrays import load_arrays
    cfg = small_cfg("torch")
    nhwc, _ = load_arrays(cfg.data, seed=1)
    nchw, _ = load_arrays(cfg.data, seed=1, layout="NCHW")
    assert nhwc.x.shape == (256, 12, 12, 1) and nchw.x.shape == (256, 1, 12, 12)
    assert nchw.x.flags["C_CONTIGUOUS"]           # a real transposition, made once
    np.testing.assert_array_equal(nchw.x, nhwc.x.transpose(0, 3, 1, 2))
    train, _ = build_sources(cfg, 0, 1)       # both backends read NHWC arrays
    assert train.dataset.layout == "NHWC"
    x, y = next(train.epoch(0))
    assert x.shape == (32, 12, 12, 1)
    trainer = make_trainer(cfg)
    tx, _ = next(trainer.device_batches([(x, y)]))
    # torch sees NCHW over the same memory: channels_last strides, no copy
    assert tuple(tx.shape) == (32, 1, 12, 12) and tx.stride(1) == 1
    assert tx.data_ptr() == x.__array_interface__["data"][0]
    train_tf, _ = build_sources(small_cfg("tensorflow"), 0, 1)
    assert next(train_tf.epoch(0))[0].shape == (32, 12, 12, 1)


@pytest.mark.parametrize("framework", ["torch", "tensorflow"])
def test_engine_hands_the_trainer_framework_tensors(framework, tmp_path):
    from hvdscale.data import build_sources
    from hvdscale.engine import Engine
    cfg = small_cfg(framework)
    trainer = make_trainer(cfg)
    seen = []
    original = trainer.train_step

    def spy(batch, lr):
        seen.append(batch)
        return original(batch, lr)

    trainer.train_step = spy
    trainer.build = lambda: None              # already built above
    train, evaluate = build_sources(cfg, 0, 1)
    result = Engine(cfg, Comm(framework), trainer, train, evaluate, tmp_path,
                    echo=lambda *a, **k: None).run()
    assert len(seen) == 8 and result.summary["steps"] == 8
    for x, y in seen:
        if framework == "torch":
            import torch
            assert isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
            assert tuple(x.shape) == (32, 1, 12, 12) and x.device == trainer.device
            assert x.stride(1) == 1                     # channels_last memory
            assert y.dtype == torch.int64
        else:
            import tensorflow as tf
            assert isinstance(x, tf.Tensor) and isinstance(y, tf.Tensor)
            assert tuple(x.shape) == (32, 12, 12, 1)
    assert np.isfinite(result.records[-1]["train_loss"])


def test_torch_device_batches_pass_tensors_through_without_a_copy():
    import torch
    trainer = make_trainer(small_cfg("torch"))
    x, y = torch.zeros(4, 1, 12, 12), torch.zeros(4, dtype=torch.int64)
    out_x, out_y = next(trainer.device_batches([(x, y)]))
    assert out_y.data_ptr() == y.data_ptr()
    assert torch.equal(out_x, x) and out_x.stride(1) == 1   # NCHW memory: one channels_last copy
    cl = torch.zeros(4, 12, 12, 1).permute(0, 3, 1, 2)
    assert next(trainer.device_batches([(cl, y)]))[0].data_ptr() == cl.data_ptr()


# ------------------------------------------------------------------ host reads
class HostReads:
    """Counts calls of the methods that copy a device value to the host."""

    def __init__(self, monkeypatch, owner, names):
        self.calls = []
        for name in names:
            original = getattr(owner, name)
            monkeypatch.setattr(owner, name, self._counting(name, original))

    def _counting(self, name, original):
        def counted(*args, **kwargs):
            self.calls.append(name)
            return original(*args, **kwargs)
        return counted


def torch_reads(monkeypatch):
    import torch
    return HostReads(monkeypatch, torch.Tensor, ["item", "tolist", "numpy", "__float__",
                                                 "__int__", "__bool__", "__index__", "cpu"])


def tf_reads(monkeypatch):
    from tensorflow.python.framework import ops
    return HostReads(monkeypatch, ops._EagerTensorBase,
                     ["numpy", "__float__", "__int__", "__bool__", "__index__", "__array__"])


@pytest.mark.parametrize("framework,precision,nonfinite,accumulation,reads", [
    ("torch", "fp32", "abort", 1, 0),
    ("torch", "bf16", "abort", 2, 0),
    ("torch", "fp32", "off", 1, 0),
    ("torch", "fp32", "skip", 1, STEPS),          # skip: one flag read per step (documented)
    ("tensorflow", "fp32", "abort", 1, 0),
    ("tensorflow", "bf16", "skip", 1, 0),         # TF decides skip inside the step function
    ("tensorflow", "fp32", "abort", 2, 0),
])
def test_no_host_read_in_the_step(framework, precision, nonfinite, accumulation, reads,
                                  monkeypatch):
    # torch: SGD, whose step is device-only; the CPU fast paths of hvdscale's LARS/LAMB may
    # read their trust ratios on the host (tests/test_gpu.py checks LAMB on a GPU)
    optimizer = {"name": "sgd"} if framework == "torch" else {}
    cfg = small_cfg(framework, train={"precision": precision}, optimizer=optimizer,
                    faults={"nonfinite": nonfinite}, batch={"accumulation": accumulation})
    trainer = make_trainer(cfg)
    from hvdscale.data import build_sources
    train, _ = build_sources(cfg, 0, 1)
    batches = list(trainer.device_batches(train.epoch(0)))
    trainer.train_step(batches[0], 0.01)      # warm-up: tracing, first allocations
    trainer.read_stats()
    counter = (torch_reads if framework == "torch" else tf_reads)(monkeypatch)
    for i in range(STEPS):
        trainer.train_step(batches[(i + 1) % len(batches)], 0.01)
    assert len(counter.calls) == reads, counter.calls
    stats = trainer.read_stats()
    monkeypatch.undo()
    assert len(counter.calls) - reads <= 2      # the read itself: one transfer (+ unpacking)
    assert stats["steps"] == STEPS and stats["examples"] == 32 * accumulation * STEPS
    assert stats["nonfinite_steps"] == 0 and np.isfinite(stats["loss_sum"])


def all_weights(trainer):
    """Every float tensor of the model, trained or not (BatchNorm statistics too)."""
    if trainer.framework == "torch":
        return {k: v.detach().cpu().numpy().copy() for k, v in
                trainer.model.state_dict().items() if v.is_floating_point()}
    return {f"{i}:{v.path}": np.array(v.numpy()) for i, v in enumerate(trainer.model.weights)}


@pytest.mark.parametrize("framework", ["torch", "tensorflow"])
def test_nonfinite_step_is_counted_on_the_device_and_skipped(framework):
    """skip: the poisoned step leaves every variable as it was (BatchNorm statistics too);
    read_stats names it by its position since the last read."""
    cfg = small_cfg(framework, faults={"nonfinite": "skip"}, model={"name": "resnet8"})
    trainer = make_trainer(cfg)
    from hvdscale.data import build_sources
    train, _ = build_sources(cfg, 0, 1)
    batches = list(trainer.device_batches(train.epoch(0)))[:3]
    trainer.train_step(batches[0], 0.01)
    before = all_weights(trainer)
    trainer.train_step(trainer.poisoned(batches[1]), 0.01)
    after = all_weights(trainer)
    assert len(before) > len(trainer.parameters())          # BatchNorm statistics included
    assert all(np.array_equal(before[k], after[k]) for k in before)
    trainer.train_step(batches[2], 0.01)
    stats = trainer.read_stats()
    assert stats["nonfinite_steps"] == 1 and stats["first_nonfinite_step"] == 1
    assert stats["examples"] == 64 and np.isfinite(stats["loss_sum"])


def test_tf_step_uses_the_learning_rate_it_is_given_that_step():
    """The TF step takes the learning rate as an argument and assigns it inside the graph:
    plain SGD's update must be exactly -lr * gradient of that very step."""
    import tensorflow as tf
    cfg = small_cfg("tensorflow", optimizer={"name": "sgd", "momentum": 0.0, "weight_decay": 0.0},
                    faults={"nonfinite": "off"})
    trainer = make_trainer(cfg)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 12, 12, 1)).astype(np.float32)
    y = rng.integers(0, 10, 32).astype(np.int64)
    variables = trainer.model.trainable_variables

    def gradient():
        with tf.GradientTape() as tape:
            loss = trainer._loss(tf.constant(x), tf.constant(y))
        return [g.numpy() for g in tape.gradient(loss, variables)]

    for lr in (0.0, 0.25, 0.05):
        before, grads = [v.numpy().copy() for v in variables], gradient()
        trainer.train_step((x, y), lr)
        for v, b, g in zip(variables, before, grads):
            np.testing.assert_allclose(v.numpy(), b - lr * g, rtol=1e-5, atol=1e-7)
