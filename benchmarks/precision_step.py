"""Step throughput of hvdscale's trainers by train.precision and faults.nonfinite, one
process, one thread (no Horovod): the cnn with LAMB on 28x28x1 batches of 128, each variant
built once, then timed in interleaved samples of `--steps` steps (statistics read at the end
of each sample). Prints median and min..max per variant; the last line is one JSON object.

    .venv/bin/python benchmarks/precision_step.py [--framework torch|tensorflow] [--repeats 3]
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

VARIANTS = {"fp32": {}, "bf16": {"precision": "bf16"}, "fp32_guard_off": {"nonfinite": "off"},
            "fp32_skip": {"nonfinite": "skip"}}


def build(framework, batch, precision="fp32", nonfinite="abort"):
    import numpy as np
    from hvdscale.comm import Comm
    from hvdscale.commands.train import make_trainer
    from hvdscale.config import config_from_dict
    cfg = config_from_dict({
        "framework": framework, "model": {"name": "cnn"}, "data": {"kind": "fashion_mnist"},
        "batch": {"per_worker": batch, "reference": batch},
        "optimizer": {"name": "lamb", "base_lr": 0.01},
        "train": {"threads": 1, "precision": precision}, "faults": {"nonfinite": nonfinite},
        "log": {"progress": False, "tensorboard": False}})
    trainer = make_trainer(cfg, Comm(framework), 1)
    trainer.build()
    rng = np.random.default_rng(0)
    shape = (batch, 1, 28, 28) if framework == "torch" else (batch, 28, 28, 1)
    host = [(rng.standard_normal(shape).astype(np.float32), rng.integers(0, 10, batch))
            for _ in range(4)]
    batches = list(trainer.device_batches(host))
    for i in range(5):                       # tracing, allocation
        trainer.train_step(batches[i % 4], 0.01)
    trainer.read_stats()
    return trainer, batches


def sample(trainer, batches, steps, batch):
    t0 = time.perf_counter()
    for i in range(steps):
        trainer.train_step(batches[i % 4], 0.01)
    trainer.read_stats()
    return steps * batch / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--framework", default="torch", choices=("torch", "tensorflow"))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    load_start = os.getloadavg()
    built = {name: build(args.framework, args.batch, **kw) for name, kw in VARIANTS.items()}
    rates = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):
        for name in VARIANTS:
            rates[name].append(sample(*built[name], args.steps, args.batch))
    for name, values in rates.items():
        print(f"{args.framework:<10} {name:<16} {statistics.median(values):8.1f} img/s "
              f"({min(values):.1f}..{max(values):.1f})")
    print(json.dumps({"framework": args.framework, "batch": args.batch, "steps": args.steps,
                      "repeats": args.repeats, "load": [load_start, os.getloadavg()],
                      "median_img_s": {k: statistics.median(v) for k, v in rates.items()},
                      "samples": rates}))


if __name__ == "__main__":
    main()
