"""The GPU path of the engine (marker `gpu`; skipped on machines without a CUDA GPU, run by
launchers/gpu_check.sh): batches reach the trainer as CUDA tensors, convolutions run
channels_last, fp16 (GradScaler) and bf16 steps train, and a step never synchronises the host
with the device (torch's sync debug mode turns any such read into an error)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")]


def make_trainer(precision="fp32", nonfinite="abort", model="resnet8", accumulation=1):
    from hvdscale.comm import Comm
    from hvdscale.config import config_from_dict
    from hvdscale.torch.trainer import TorchTrainer
    cfg = config_from_dict({
        "framework": "torch", "model": {"name": model},
        "data": {"kind": "synthetic", "image_size": 32, "channels": 3, "num_classes": 10},
        "batch": {"per_worker": 32, "reference": 32, "accumulation": accumulation},
        "optimizer": {"name": "lamb", "base_lr": 0.01},
        "train": {"precision": precision}, "faults": {"nonfinite": nonfinite},
        "log": {"progress": False, "tensorboard": False}})
    trainer = TorchTrainer(cfg, Comm("torch"), threads=2)
    trainer.build()
    return trainer


def host_batches(n=4, batch=32):
    rng = np.random.default_rng(0)
    return [(rng.standard_normal((batch, 3, 32, 32)).astype(np.float32),
             rng.integers(0, 10, batch).astype(np.int64)) for _ in range(n)]


def test_array_batches_arrive_as_cuda_tensors_channels_last():
    trainer = make_trainer()
    batches = list(trainer.device_batches(host_batches()))
    for x, y in batches:
        assert x.is_cuda and y.is_cuda and y.dtype == torch.int64
        assert x.is_contiguous(memory_format=torch.channels_last)
    # parameters stay contiguous: Horovod allreduces only contiguous gradients
    assert all(p.is_contiguous() for p in trainer.model.parameters())
    # data on the device already is used as is (no copy)
    x, y = batches[0]
    assert next(trainer.device_batches([(x, y)]))[0].data_ptr() == x.data_ptr()


@pytest.mark.parametrize("precision,accumulation", [("bf16", 1), ("fp16", 1), ("fp16", 2),
                                                    ("fp32", 1)])
def test_steps_do_not_synchronise_with_the_host(precision, accumulation):
    """No step reads the device (fp16's GradScaler is the exception: it reads found_inf once
    per step, which torch's own AMP loop does too); the one read is read_stats()."""
    trainer = make_trainer(precision, accumulation=accumulation)
    batches = list(trainer.device_batches(host_batches()))
    trainer.train_step(batches[0], 0.01)        # warm-up: allocations, cuDNN choices
    trainer.read_stats()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error" if precision != "fp16" else "default")
    try:
        for batch in batches:
            trainer.train_step(batch, 0.01)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    stats = trainer.read_stats()
    assert stats["steps"] == len(batches) and stats["examples"] == 32 * len(batches)
    assert np.isfinite(stats["loss_sum"]) and stats["nonfinite_steps"] == 0
    for p in trainer.model.parameters():        # master weights stay fp32
        assert p.dtype == torch.float32


def test_fp16_loss_scaling_trains_and_checkpoints_the_scaler():
    trainer = make_trainer("fp16")
    batches = list(trainer.device_batches(host_batches(8)))
    first = None
    for i in range(3):
        for batch in batches:
            trainer.train_step(batch, 0.01)
        stats = trainer.read_stats()
        mean = stats["loss_sum"] / stats["examples"]
        first = mean if first is None else first
    assert mean < first
    import io
    state = torch.load(io.BytesIO(trainer.state_bytes()), weights_only=True)
    assert "grad_scaler" in state and state["grad_scaler"]["scale"] > 0


def test_nan_batch_is_skipped_on_the_gpu():
    trainer = make_trainer("bf16", nonfinite="skip")
    batch = next(trainer.device_batches(host_batches(1)))
    # what the trainer promises to keep: the weights and BatchNorm's running statistics
    # (float state; the int64 num_batches_tracked counts the attempt and is not restored)
    kept = lambda: {k: v for k, v in trainer.model.state_dict().items() if v.is_floating_point()}
    before = {k: v.clone() for k, v in kept().items()}
    assert any("running_mean" in k for k in before)
    trainer.train_step(trainer.poisoned(batch), 0.01)
    stats = trainer.read_stats()
    assert stats["nonfinite_steps"] == 1 and stats["first_nonfinite_step"] == 0
    for key, value in kept().items():
        assert torch.equal(value, before[key]), key


def test_tensorflow_batches_are_placed_on_the_gpu():
    tf = pytest.importorskip("tensorflow")
    if not tf.config.list_physical_devices("GPU"):
        pytest.skip("TensorFlow sees no GPU")
    from hvdscale.comm import Comm
    from hvdscale.config import config_from_dict
    from hvdscale.tensorflow.trainer import TensorFlowTrainer
    cfg = config_from_dict({
        "framework": "tensorflow", "model": {"name": "resnet8"},
        "data": {"kind": "synthetic", "image_size": 32, "channels": 3, "num_classes": 10},
        "batch": {"per_worker": 32, "reference": 32},
        "train": {"precision": "bf16"}, "log": {"progress": False, "tensorboard": False}})
    trainer = TensorFlowTrainer(cfg, Comm("tensorflow"), threads=2)
    trainer.build()
    nhwc = [(x.transpose(0, 2, 3, 1).copy(), y) for x, y in host_batches(3)]
    batches = list(trainer.device_batches(nhwc))
    assert all("GPU" in x.device for x, _ in batches)
    for batch in batches:
        trainer.train_step(batch, 0.01)
    stats = trainer.read_stats()
    assert stats["steps"] == 3 and np.isfinite(stats["loss_sum"])
