"""`hvdscale bench [RECIPE] [--set ...] [--steps N] [--save-ref FILE | --tau-ref X]`.

Throughput of the recipe's model and optimizer on synthetic data of the recipe's shape:
fixed steps after a few warm-up steps, images/s per worker and total. Run it with one worker
and --save-ref to store tau_ref, then with K workers and --tau-ref to get the scaling
efficiency E_K = tau_K / (K * tau_ref). The last line printed is one JSON object.
"""
import json
import time
from pathlib import Path

import numpy as np

from hvdscale.commands.train import hardware_name, read_tau_ref, start_workers
from hvdscale.config import DEFAULT_RECIPE, config_from_dict, load_config
from hvdscale.data.arrays import normalise
from hvdscale.data.synthetic import MEAN as SYNTHETIC_MEAN, STD as SYNTHETIC_STD
from hvdscale.data.synthetic import synthetic_arrays
from hvdscale.errors import ConfigError

# Errors about these settings came from these flags (hvdscale.cli prefixes the flag).
SETTING_FLAGS = {"overrides": "--set"}


def add_arguments(parser):
    parser.add_argument("recipe", nargs="?", default=str(DEFAULT_RECIPE),
                        help="YAML recipe whose model, batch and optimizer are measured")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a recipe value")
    parser.add_argument("--steps", type=int, default=30, help="timed steps (default 30)")
    parser.add_argument("--warmup-steps", type=int, default=5,
                        help="untimed steps first (graph tracing, allocation; default 5)")
    parser.add_argument("--save-ref", metavar="FILE", default=None,
                        help="write tau_ref (this run's images/s per worker) to a JSON file; "
                             "run with one worker")
    parser.add_argument("--tau-ref", metavar="IMG_S|FILE", default=None,
                        help="one worker's images/s (number or --save-ref file) for E_K")
    parser.add_argument("--no-horovod", action="store_true",
                        help="run as one plain process without initialising Horovod")


def synthetic_config(cfg):
    """The recipe with its data replaced by synthetic images of the same shape."""
    raw = cfg.to_dict()
    raw["data"].update(kind="synthetic", channels=cfg.in_channels, path=None,
                       train_limit=None, test_limit=None)
    raw["log"].update(progress=False, tensorboard=False)
    return config_from_dict(raw)


def synthetic_batches(cfg, rank, count=2):
    """A few distinct batches per rank, reused round-robin (no input pipeline in the way)."""
    per_step = cfg.batch.per_worker * cfg.batch.accumulation
    x, y = synthetic_arrays(count * per_step, cfg.data.image_size, cfg.in_channels,
                            cfg.data.num_classes, seed=cfg.train.seed + rank)
    x = normalise(x, SYNTHETIC_MEAN, SYNTHETIC_STD)
    return [(x[i * per_step:(i + 1) * per_step], y[i * per_step:(i + 1) * per_step])
            for i in range(count)]


def measure(trainer, batches, comm, lr, steps, warmup_steps):
    """Seconds for `steps` timed steps, as seen by the slowest rank (the batches are put on
    the device first; the statistics read at the end waits for the device)."""
    batches = list(trainer.device_batches(batches))
    for i in range(warmup_steps):
        trainer.train_step(batches[i % len(batches)], lr)
    trainer.read_stats()
    comm.barrier()
    t0 = time.perf_counter()
    for i in range(steps):
        trainer.train_step(batches[i % len(batches)], lr)
    trainer.read_stats()
    elapsed = time.perf_counter() - t0
    return comm.allreduce(elapsed, op="max")


def run(args):
    if args.steps < 1 or args.warmup_steps < 0:
        raise ConfigError(f"--steps must be >= 1 and --warmup-steps >= 0, got {args.steps} "
                          f"and {args.warmup_steps}")
    cfg = synthetic_config(load_config(args.recipe, args.overrides))
    tau_ref = read_tau_ref(args.tau_ref)
    comm, trainer = start_workers(cfg, horovod=not args.no_horovod)
    if args.save_ref and comm.size != 1:
        raise ConfigError(f"--save-ref stores one worker's throughput; this run has "
                          f"{comm.size} workers")
    trainer.build()
    per_step = cfg.batch.per_worker * cfg.batch.accumulation
    elapsed = measure(trainer, synthetic_batches(cfg, comm.rank), comm, cfg.optimizer.base_lr, args.steps,
                      args.warmup_steps)
    total = comm.size * per_step * args.steps / elapsed
    per_worker = total / comm.size
    efficiency = total / (comm.size * tau_ref) if tau_ref else None
    result = {
        "framework": cfg.framework, "model": cfg.model.name, "optimizer": cfg.optimizer.name,
        "hardware": hardware_name(trainer.device_description, comm.size),
        "workers": comm.size, "per_worker_batch": per_step,
        "global_batch": comm.size * per_step, "steps": args.steps,
        "time_per_step_s": elapsed / args.steps, "images_per_sec": total,
        "images_per_sec_per_worker": per_worker, "tau_ref": tau_ref,
        "scaling_efficiency": efficiency,
    }
    if comm.is_root:
        rows = [("framework", cfg.framework), ("model", cfg.model.name),
                ("workers", str(comm.size)), ("batch/worker", str(per_step)),
                ("time/step", f"{elapsed / args.steps * 1000:.1f} ms"),
                ("images/s total", f"{total:.1f}"), ("images/s/worker", f"{per_worker:.1f}")]
        if efficiency is not None:
            rows.append(("scaling eff.", f"{efficiency:.3f} (tau_ref {tau_ref:.1f})"))
        width = max(len(k) for k, _ in rows)
        for key, value in rows:
            print(f"{key:<{width}}  {value}")
        if args.save_ref:
            ref = dict(result, tau_ref=per_worker)
            Path(args.save_ref).write_text(json.dumps(ref, indent=1) + "\n")
            print(f"tau_ref {per_worker:.1f} images/s written to {args.save_ref}")
        print(json.dumps({k: (None if isinstance(v, float) and not np.isfinite(v) else v)
                          for k, v in result.items()}))
    return 0
