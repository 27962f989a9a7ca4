"""Weak scaling of one training step: hvdscale (Horovod) against PyTorch DDP (gloo).

The same small CNN (hvdscale's `cnn`), the same synthetic Fashion-MNIST-shaped batches, SGD
with momentum, one thread per worker, per-worker batch fixed. For each side it launches K=1
and K=2 workers (`horovodrun -np K` for ours, `torch.distributed.run --nproc_per_node K` for
DDP), times the steps after a warm-up on every rank and keeps the slowest rank's time:

    tau_K = K * batch * steps / time        E_2 = tau_2 / (2 * tau_1)

and prints a table plus ours/DDP ratios; the last line is one JSON object.

    .venv/bin/python benchmarks/scaling.py [--batch 64] [--steps 60] [--repeats 2]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


# ---------------------------------------------------------------------------- workers
def synthetic(batch, rank, count=4):
    import numpy as np
    rng = np.random.default_rng(1000 + rank)
    x = rng.standard_normal((count, batch, 28, 28, 1)).astype(np.float32)
    y = rng.integers(0, 10, size=(count, batch)).astype(np.int64)
    return x, y


def worker_hvdscale(args):
    """Our step: hvdscale's torch trainer (Horovod DistributedOptimizer) as `hvdscale train`
    builds it."""
    from hvdscale.commands.train import start_workers
    from hvdscale.config import load_config
    cfg = load_config(overrides=["optimizer.name=sgd", "optimizer.weight_decay=0",
                                 f"batch.per_worker={args.batch}", "train.threads=1",
                                 "lr.warmup=none", "log.progress=false"])
    comm, trainer = start_workers(cfg)
    trainer.build()
    x, y = synthetic(args.batch, comm.rank)
    step = lambda i: trainer.train_step(x[i % len(x)], y[i % len(y)], 0.01)
    return timed(step, args, comm.barrier,
                 lambda t: comm.allreduce(t, op="max"), comm.rank, comm.size)


def worker_ddp(args):
    """The peer: the same model and optimizer under torch DistributedDataParallel (gloo)."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from hvdscale.torch.models import build_model
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(42)
    model = torch.nn.parallel.DistributedDataParallel(build_model("cnn", 10, 1, 28))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = synthetic(args.batch, rank)
    xs = [torch.from_numpy(b).permute(0, 3, 1, 2).contiguous() for b in x]
    ys = [torch.from_numpy(b) for b in y]

    def step(i):
        opt.zero_grad()
        F.cross_entropy(model(xs[i % len(xs)]), ys[i % len(ys)]).backward()
        opt.step()

    def slowest(t):
        value = torch.tensor([t], dtype=torch.float64)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return float(value)

    result = timed(step, args, dist.barrier, slowest, rank, size)
    dist.destroy_process_group()
    return result


def timed(step, args, barrier, slowest, rank, size):
    for i in range(args.warmup):
        step(i)
    barrier()
    t0 = time.perf_counter()
    for i in range(args.steps):
        step(i)
    elapsed = slowest(time.perf_counter() - t0)
    return rank, {"workers": size, "seconds": elapsed,
                  "images_per_sec": size * args.batch * args.steps / elapsed}


# ---------------------------------------------------------------------------- driver
def launch(side, k, args):
    out = Path(tempfile.mkdtemp(prefix=f"scaling-{side}-np{k}-")) / "result.json"
    me = [sys.executable, str(Path(__file__).resolve()), "--worker", side, "--result", str(out),
          "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    if side == "hvdscale":
        cmd = [str(BIN / "horovodrun"), "-np", str(k), "--gloo", *me]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={k}", *me[1:]]
    env = dict(os.environ, OMP_NUM_THREADS="1", TF_CPP_MIN_LOG_LEVEL="2",
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for attempt in (1, 2):   # a launcher that dies at start-up or teardown gets one retry
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode == 0 and out.is_file():
            return json.loads(out.read_text())["images_per_sec"]
        print(f"scaling.py: {side} -np {k} attempt {attempt} failed ({proc.returncode}): "
              f"{proc.stderr.strip().splitlines()[-1:] }", file=sys.stderr)
        out.unlink(missing_ok=True)
    sys.exit(f"scaling.py: {side} -np {k} failed twice:\n{proc.stderr[-3000:]}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64, help="images per worker per step")
    parser.add_argument("--steps", type=int, default=60, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=8, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs per configuration, interleaved; the median is reported")
    parser.add_argument("--worker", choices=("hvdscale", "ddp"), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        rank, result = (worker_hvdscale if args.worker == "hvdscale" else worker_ddp)(args)
        if rank == 0:
            Path(args.result).write_text(json.dumps(result))
        return

    samples = {(side, k): [] for side in ("hvdscale", "ddp") for k in (1, 2)}
    for _ in range(args.repeats):   # interleaved, so drifting machine load hits both sides
        for key in samples:
            samples[key].append(launch(*key, args))
    tau = {key: statistics.median(v) for key, v in samples.items()}
    eff = {side: tau[(side, 2)] / (2 * tau[(side, 1)]) for side in ("hvdscale", "ddp")}

    print(f"small CNN step, batch {args.batch}/worker, {args.steps} timed steps, 1 thread "
          f"per worker, median of {args.repeats}")
    print(f"| {'side':<9} | {'tau_1 img/s':>11} | {'tau_2 img/s':>11} | {'E_2':>5} |")
    print(f"|{'-' * 11}|{'-' * 13}|{'-' * 13}|{'-' * 7}|")
    for side in ("hvdscale", "ddp"):
        print(f"| {side:<9} | {tau[(side, 1)]:>11.1f} | {tau[(side, 2)]:>11.1f} | "
              f"{eff[side]:>5.3f} |")
    ratio1 = tau[("hvdscale", 1)] / tau[("ddp", 1)]
    ratio2 = tau[("hvdscale", 2)] / tau[("ddp", 2)]
    print(f"ours/DDP: tau_1 {ratio1:.3f}, tau_2 {ratio2:.3f}, E_2 "
          f"{eff['hvdscale'] / eff['ddp']:.3f}")
    print(json.dumps({
        "batch_per_worker": args.batch, "steps": args.steps, "repeats": args.repeats,
        "hvdscale_tau_1": tau[("hvdscale", 1)], "hvdscale_tau_2": tau[("hvdscale", 2)],
        "hvdscale_E_2": eff["hvdscale"], "ddp_tau_1": tau[("ddp", 1)],
        "ddp_tau_2": tau[("ddp", 2)], "ddp_E_2": eff["ddp"],
        "ratio_tau_1": ratio1, "ratio_tau_2": ratio2,
        "samples": {f"{s}_np{k}": v for (s, k), v in samples.items()},
    }))


if __name__ == "__main__":
    main()
