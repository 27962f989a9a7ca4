"""The step rules every trainer shares (docs/architecture.md, "Engine protocol"), written once
and applied by each backend with its own tensors: the settings a trainer refuses before it
builds, the non-finite rule, the statistics `read_stats()` answers with, BatchNorm's running
statistics averaged over the ranks, and a change of the micro-batches per step. How a batch
splits into micro-batches is `hvdscale.core.scaling.micro_batch_sizes`.

Framework-neutral: no torch or TensorFlow here. The non-finite rule combines flags with `&`
and `~`, which torch and TensorFlow bool tensors and NumPy bools all take.
"""
import dataclasses
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from hvdscale.errors import ConfigError


def check_step_settings(cfg: Any, comm: Any, gpu: bool, compile_refusal: str) -> None:
    """One ConfigError before anything is built: fp16 without a GPU, train.compile (the
    backend says why it is not offered), Adasum on CPUs without Horovod's MPI controller."""
    if cfg.train.precision == "fp16" and not gpu:
        raise ConfigError("train.precision fp16 needs a GPU (loss-scaled fp16 is not run on "
                          "CPUs); use bf16 or fp32 here")
    if cfg.train.compile:
        raise ConfigError(f"train.compile: {compile_refusal}; leave it false")
    if cfg.horovod.adasum and comm.distributed and comm.controller != "mpi" and not gpu:
        raise ConfigError("horovod.adasum on CPU needs Horovod's MPI controller "
                          f"(horovodrun --mpi or mpirun), this job runs on {comm.controller}")


class NonFiniteRule:
    """`faults.nonfinite` inside a step, decided from the Horovod-averaged gradients (equal on
    every rank, so no collective is needed):
      off    nothing is checked or counted;
      skip   a step whose loss or gradients are not finite is counted, and its update (and
             its change to BatchNorm's running statistics) is dropped on every rank;
      abort  counted; the engine stops when it reads the statistics.
    With loss-scaled fp16 an overflowing gradient is the loss scaler's to skip, not a fault:
    only a non-finite loss counts, and the scaler, not this rule, drops the update."""

    def __init__(self, policy: str, loss_scaled: bool = False):
        self.policy = policy
        self.counts = policy != "off"
        self.check_gradients = self.counts and not loss_scaled
        self.drops_updates = policy == "skip" and self.check_gradients

    def bad(self, loss_ok, grads_ok=None):
        """The step's flag from `loss_ok` and (when check_gradients) `grads_ok`."""
        if not self.counts:
            return loss_ok & False
        return ~loss_ok if grads_ok is None or not self.check_gradients else ~(loss_ok & grads_ok)


def step_stats(loss_sum: float, examples: float, bad_steps: float, first_bad: float,
               steps: int) -> Dict[str, Any]:
    """read_stats()'s answer from the host values of the device counters (first_bad < 0:
    no bad step since the last read)."""
    first = int(first_bad)
    return {"loss_sum": float(loss_sum), "examples": int(examples), "steps": int(steps),
            "nonfinite_steps": int(bad_steps),
            "first_nonfinite_step": None if first < 0 else first}


def average_running_statistics(comm: Any, read: Callable[[], List[np.ndarray]]
                               ) -> Optional[List[np.ndarray]]:
    """BatchNorm's running statistics (every float non-trained variable, read() as host
    arrays) averaged over the ranks, in their own dtypes, so that evaluation and checkpoints
    see one model; None on one rank (nothing to do, nothing read)."""
    if not comm.distributed:
        return None
    values = read()
    return [avg.astype(old.dtype, copy=False)
            for old, avg in zip(values, comm.allreduce_many(values))]


def with_accumulation(trainer: Any, passes: int) -> None:
    """What `passes` micro-batches per step from now on means for any trainer: its recipe's
    batch.accumulation, and the online noise scale's small and big batch sizes."""
    cfg = trainer.cfg
    trainer.cfg = dataclasses.replace(cfg, batch=dataclasses.replace(cfg.batch,
                                                                      accumulation=passes))
    noise = getattr(trainer, "noise_scale", None)
    if noise is not None:
        noise.online.set_accumulation(cfg.batch.per_worker, passes, trainer.comm.size)
