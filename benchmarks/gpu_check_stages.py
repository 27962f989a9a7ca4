"""The measuring stages of launchers/gpu_check.sh, one per sub-command; each prints one JSON
line last (the driver puts it in summary.json). Exit 77 = skipped (what it needs is absent).

  host        python, torch, GPUs and their compute capability, TensorFlow/DALI present?
  bundle      the offline bundle: Fashion-MNIST readable by hvdscale, the sdist present
  horovod     what the Horovod in use was built with (horovodrun --check-build)
  allreduce   a size-1 hvd.allreduce of a CUDA tensor, shown to run through NCCL (timeline)
  sync_free   20 training steps per optimizer under torch.cuda.set_sync_debug_mode("error")
  throughput  ResNet-50 bf16 channels_last: ours (TorchTrainer, the Engine's step) against a
              plain PyTorch AMP loop (peer) in the same process, data on the device and from
              host memory, interleaved runs: img/s (median, min, max), peak memory
  tensorflow  TensorFlow sees the GPU and horovod.tensorflow imports
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SKIPPED = 77


def emit(result):
    print(json.dumps(result), flush=True)


def importable(name):
    import importlib.util
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


# ------------------------------------------------------------------------------ host, bundle
def host(args):
    import torch
    out = {"python": sys.version.split()[0], "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
           "cores": os.cpu_count(), "tensorflow": importable("tensorflow"),
           "dali": importable("nvidia.dali"), "horovod": importable("horovod")}
    if torch.cuda.is_available():
        out["gpus"] = [{"name": torch.cuda.get_device_name(i),
                        "capability": "%d%d" % torch.cuda.get_device_capability(i),
                        "memory_gib": round(torch.cuda.get_device_properties(i).total_memory
                                            / 2 ** 30, 1)}
                       for i in range(torch.cuda.device_count())]
    emit(out)


def bundle(args):
    from hvdscale.data.fashion_mnist import FILES, _find, read_idx
    root = Path(args.bundle)
    shapes = {key: list(read_idx(_find(root / "fashion-mnist", stem)).shape)
              for key, (stem, _) in FILES.items()}
    assert shapes["x_train"] == [60000, 28, 28] and shapes["y_test"] == [10000], shapes
    emit({"fashion_mnist": shapes, "sdist": sorted(p.name for p in root.glob("horovod-*.tar.gz")),
          "wheels": sorted(p.name for p in root.glob("wheels/*.whl"))})


def horovod(args):
    proc = subprocess.run([sys.executable, "-m", "horovod.runner.launch", "--check-build"],
                          capture_output=True, text=True)     # the stage has the time limit
    built = {line.split("]")[1].strip(): line.strip().startswith("[X]")
             for line in proc.stdout.splitlines() if line.strip()[:3] in ("[X]", "[ ]")}
    import horovod.torch as hvd
    emit({"check_build": built, "nccl_built": bool(hvd.nccl_built()), "rc": proc.returncode})


# ------------------------------------------------------------------------------ CUDA stages
def allreduce(args):
    import horovod.torch as hvd
    import torch
    timeline = Path(args.timeline)
    os.environ["HOROVOD_TIMELINE"] = str(timeline)
    hvd.init()
    torch.cuda.set_device(hvd.local_rank())
    x = torch.arange(1 << 20, dtype=torch.float32, device="cuda")
    y = hvd.allreduce(x, op=hvd.Sum, name="check")
    ok = bool(torch.equal(y, x * hvd.size())) and y.is_cuda
    hvd.shutdown()
    text = timeline.read_text() if timeline.exists() else ""
    emit({"size": 1, "correct": ok, "nccl_in_timeline": "NCCL_ALLREDUCE" in text,
          "nccl_built": bool(hvd.nccl_built())})
    sys.exit(0 if ok and "NCCL_ALLREDUCE" in text else 1)


def trainer_for(model, optimizer, batch, image_size, classes=1000, precision="bf16"):
    from hvdscale.comm import Comm
    from hvdscale.config import config_from_dict
    from hvdscale.torch.trainer import TorchTrainer
    cfg = config_from_dict({
        "framework": "torch", "model": {"name": model},
        "data": {"kind": "synthetic", "image_size": image_size, "channels": 3,
                 "num_classes": classes},
        "batch": {"per_worker": batch, "reference": batch},
        "optimizer": {"name": optimizer, "base_lr": 0.01},
        "train": {"precision": precision}, "log": {"progress": False, "tensorboard": False}})
    trainer = TorchTrainer(cfg, Comm("torch"), threads=max(1, (os.cpu_count() or 2) // 2))
    trainer.build()
    return trainer


class Device:
    """CUDA, or the CPU for --smoke (a quick run of the code paths, no measurement)."""

    def __init__(self, smoke):
        import torch
        self.torch, self.cuda = torch, not smoke
        self.size = 32 if smoke else 224

    def synchronize(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def debug_mode(self, mode):
        if self.cuda:
            self.torch.cuda.set_sync_debug_mode(mode)

    def reset_peak(self):
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()

    def peak_gib(self):
        return round(self.torch.cuda.max_memory_allocated() / 2 ** 30, 2) if self.cuda else None

    def pinned(self, t):
        return t.pin_memory() if self.cuda else t


def sync_free(args):
    """No step of ours synchronises the host with the device (a read, a blocking copy)."""
    import torch
    dev = Device(args.smoke)
    results = {}
    for optimizer in ("lamb", "lars", "sgd"):
        trainer = trainer_for(args.model, optimizer, args.batch, dev.size)
        x = torch.randn(args.batch, 3, dev.size, dev.size)
        y = torch.randint(0, 1000, (args.batch,))
        batch = next(trainer.device_batches([(x, y)]))
        trainer.train_step(batch, 0.01)            # warm-up: allocations, cuDNN's choices
        trainer.read_stats()
        dev.synchronize()
        dev.debug_mode("error")
        try:
            for _ in range(args.steps):
                trainer.train_step(batch, 0.01)
            results[optimizer] = "passed"
        except RuntimeError as err:
            results[optimizer] = f"failed: {str(err).splitlines()[0]}"
        finally:
            dev.debug_mode("default")
        stats = trainer.read_stats()
        results[optimizer + "_loss"] = stats["loss_sum"] / max(1, stats["examples"])
        del trainer
        if dev.cuda:
            torch.cuda.empty_cache()
    emit({"steps": args.steps, "model": args.model, "batch": args.batch, **results})
    sys.exit(0 if all(results[o] == "passed" for o in ("lamb", "lars", "sgd")) else 1)


def throughput(args):
    import torch
    import torch.nn.functional as F
    from hvdscale.torch.models import build_model

    dev = Device(args.smoke)
    batch, size, classes = args.batch, dev.size, 1000
    device = torch.device("cuda", 0) if dev.cuda else torch.device("cpu")
    torch.backends.cudnn.benchmark = True
    gen = torch.Generator().manual_seed(0)
    host_x = [torch.randn(batch, 3, size, size, generator=gen) for _ in range(2)]
    host_y = [torch.randint(0, classes, (batch,), generator=gen) for _ in range(2)]
    # in-memory images from the host: pinned, as a loader hands them over
    host_batches = [(dev.pinned(x.contiguous(memory_format=torch.channels_last)), dev.pinned(y))
                    for x, y in zip(host_x, host_y)]

    ours = trainer_for(args.model, "sgd", batch, size)

    def ours_runner(source):
        if source == "device":
            fixed = next(ours.device_batches([host_batches[0]]))
            step = lambda: ours.train_step(fixed, 0.1)
            return step, ours.read_stats

        def endless():
            while True:
                yield from host_batches
        stream = ours.device_batches(endless())
        return (lambda: ours.train_step(next(stream), 0.1)), ours.read_stats

    torch.manual_seed(0)
    model = build_model(args.model, classes, 3, size).to(device).to(
        memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def peer_runner(source):
        on_device = [(x.to(device), y.to(device)) for x, y in host_batches]
        count = [0]

        def step():
            x, y = host_batches[count[0] % 2] if source == "host" else on_device[0]
            count[0] += 1
            x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            y = y.to(device, non_blocking=True)
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x).float(), y)
            loss.backward()
            opt.step()
        return step, dev.synchronize

    def timed(step, finish, steps):
        finish()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        finish()
        return batch * steps / (time.perf_counter() - t0)

    out = {"model": args.model, "batch": batch, "precision": "bf16", "channels_last": True,
           "steps": args.steps, "repeats": args.repeats, "smoke": args.smoke,
           "device": torch.cuda.get_device_name(0) if dev.cuda else "cpu"}
    for source in ("device", "host"):
        runners = {"ours": ours_runner(source), "peer": peer_runner(source)}
        rates = {name: [] for name in runners}
        peak = {}
        for name, (step, finish) in runners.items():          # warm-up, peak memory
            dev.reset_peak()
            for _ in range(args.warmup):
                step()
            finish()
            peak[name] = dev.peak_gib()
        for _ in range(args.repeats):                           # interleaved: drift hits both
            for name, (step, finish) in runners.items():
                rates[name].append(timed(step, finish, args.steps))
        for name, r in rates.items():
            out[f"{source}_{name}"] = {"median": statistics.median(r), "min": min(r),
                                       "max": max(r), "runs": [round(v, 1) for v in r],
                                       "peak_gib": peak[name]}
        ratios = [a / b for a, b in zip(rates["ours"], rates["peer"])]
        out[f"{source}_ours_over_peer"] = {"median": statistics.median(ratios),
                                           "min": min(ratios), "max": max(ratios)}
    emit(out)


def tensorflow(args):
    if not importable("tensorflow"):
        emit({"skipped": "no TensorFlow in this environment"})
        sys.exit(SKIPPED)
    import tensorflow as tf
    gpus = tf.config.list_physical_devices("GPU")
    hvd_tf = importable("horovod.tensorflow")
    emit({"tensorflow": tf.__version__, "gpus": len(gpus), "horovod_tensorflow": hvd_tf})
    sys.exit(0 if gpus else 1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stage", choices=["host", "bundle", "horovod", "allreduce", "sync_free",
                                     "throughput", "tensorflow"])
    p.add_argument("--bundle", default=str(REPO / ".gpu_bundle"))
    p.add_argument("--timeline", default="/tmp/hvdscale-timeline.json")
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--smoke", action="store_true",
                   help="sync_free/throughput on the CPU, tiny: the code paths, no numbers")
    args = p.parse_args(argv)
    globals()[args.stage](args)


if __name__ == "__main__":
    main()
