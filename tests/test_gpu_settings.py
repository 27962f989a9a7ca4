"""Settings of the GPU path that a CPU can check: cuDNN's autotuner on in the torch trainer,
and DALI's CPU threads shared among the ranks of this node (not of the whole job)."""
import pytest

from hvdscale.comm import Comm, launched_local_size
from hvdscale.config import config_from_dict

torch = pytest.importorskip("torch")


def cfg_for(**train):
    return config_from_dict({
        "framework": "torch", "model": {"name": "cnn"},
        "data": {"kind": "imagefolder", "path": "/nonexistent", "image_size": 32,
                 "num_classes": 10, "channels": 3},
        "batch": {"per_worker": 8, "reference": 8},
        "train": dict({"threads": None}, **train),
        "log": {"progress": False, "tensorboard": False}})


def test_torch_trainer_on_cuda_turns_on_the_cudnn_autotuner(monkeypatch):
    from hvdscale.torch.trainer import TorchTrainer
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(TorchTrainer, "_new_stats", lambda self: None)   # no CUDA tensors here
    trainer = TorchTrainer(cfg_for(), Comm("torch"), threads=1)
    assert trainer.device.type == "cuda"
    assert torch.backends.cudnn.benchmark is True


def test_torch_trainer_on_cpu_leaves_the_autotuner_alone(monkeypatch):
    from hvdscale.torch.trainer import TorchTrainer
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    TorchTrainer(cfg_for(), Comm("torch"), threads=1)
    assert torch.backends.cudnn.benchmark is False


@pytest.mark.parametrize("env, world, want", [
    ({"HOROVOD_LOCAL_SIZE": "2"}, 8, 2),
    ({"OMPI_COMM_WORLD_LOCAL_SIZE": "4"}, 16, 4),
    ({"SLURM_NTASKS_PER_NODE": "8"}, 4, 4),      # never more than the job has
    ({}, 3, 3),                                  # no launcher: one node assumed
    ({"HOROVOD_LOCAL_SIZE": "0"}, 2, 2),
])
def test_local_size_from_the_launcher(env, world, want):
    assert launched_local_size(world, env) == want


def test_dali_threads_share_this_nodes_cores_among_its_ranks(monkeypatch):
    """8 ranks on 4 nodes of 16 cores: 8 DALI threads per rank (16 // 2), not 2 (16 // 8)."""
    pytest.importorskip("nvidia.dali")
    from hvdscale.data.dali import sources as dali
    seen = []
    monkeypatch.setattr(dali, "build_train_loader",
                        lambda *a, **k: seen.append(k["num_threads"]) or object())
    monkeypatch.setattr(dali, "build_eval_loader", lambda *a, **k: object())
    monkeypatch.setattr(dali, "EngineTrainSource", lambda loader: loader)
    monkeypatch.setattr(dali, "EngineEvalSource", lambda loader: loader)
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    monkeypatch.setenv("HOROVOD_LOCAL_SIZE", "2")
    dali.build_sources(cfg_for(), rank=3, size=8)
    assert seen == [8]
    seen.clear()
    dali.build_sources(cfg_for(threads=3), rank=3, size=8)     # train.threads wins
    assert seen == [3]
