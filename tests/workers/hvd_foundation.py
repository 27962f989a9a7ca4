"""Worker for tests/test_horovod_foundation.py, run under horovodrun/mpirun with 2+ ranks.

Checks collectives and one distributed optimizer step for one framework, and writes what it
saw to OUT/rank<r>.npz so the test can compare ranks bitwise and against a one-process step.

    python hvd_foundation.py {torch|tensorflow} OUT [--with-mpi4py]
"""
import json
import os
import sys

import numpy as np

FRAMEWORK, OUT = sys.argv[1], sys.argv[2]
WITH_MPI4PY = "--with-mpi4py" in sys.argv
N_SAMPLES, N_IN, N_OUT, LR, STEPS = 8, 5, 3, 0.1, 3


def problem():
    """The same regression problem on every rank; rank r trains on rows r::size."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N_SAMPLES, N_IN)).astype(np.float32)
    y = rng.standard_normal((N_SAMPLES, N_OUT)).astype(np.float32)
    return x, y


def initial_weights(seed):
    rng = np.random.default_rng(100 + seed)  # differs per rank: broadcast must fix it
    return (rng.standard_normal((N_IN, N_OUT)).astype(np.float32),
            rng.standard_normal((N_OUT,)).astype(np.float32))


def run_torch():
    import torch
    import horovod.torch as hvd

    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    seen = {"rank": rank, "size": size, "gloo": hvd.gloo_enabled(), "mpi": hvd.mpi_enabled()}
    base = torch.arange(4, dtype=torch.float32) + rank
    seen["allreduce_sum"] = hvd.allreduce(base, op=hvd.Sum, name="sum").numpy()
    seen["allreduce_avg"] = hvd.allreduce(base, op=hvd.Average, name="avg").numpy()
    seen["allgather"] = hvd.allgather(torch.full((rank + 1, 2), float(rank)), name="gather").numpy()
    seen["broadcast"] = hvd.broadcast(torch.tensor([10.0 * rank + 1]), root_rank=0, name="bc").numpy()

    w0, b0 = initial_weights(rank)
    model = torch.nn.Linear(N_IN, N_OUT)
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(w0.T))
        model.bias.copy_(torch.from_numpy(b0))
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=LR),
                                   named_parameters=model.named_parameters())
    x, y = problem()
    xs, ys = torch.from_numpy(x[rank::size]), torch.from_numpy(y[rank::size])
    for _ in range(STEPS):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(xs), ys).backward()
        opt.step()
    seen["w"] = model.weight.detach().numpy().T.copy()
    seen["b"] = model.bias.detach().numpy().copy()
    return seen, hvd


def run_tensorflow():
    import tensorflow as tf
    import horovod.tensorflow as hvd

    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    seen = {"rank": rank, "size": size, "gloo": hvd.gloo_enabled(), "mpi": hvd.mpi_enabled()}
    base = tf.range(4, dtype=tf.float32) + rank
    seen["allreduce_sum"] = hvd.allreduce(base, op=hvd.Sum, name="sum").numpy()
    seen["allreduce_avg"] = hvd.allreduce(base, op=hvd.Average, name="avg").numpy()
    seen["allgather"] = hvd.allgather(tf.fill((rank + 1, 2), float(rank)), name="gather").numpy()
    seen["broadcast"] = hvd.broadcast(tf.constant([10.0 * rank + 1]), root_rank=0, name="bc").numpy()

    w0, b0 = initial_weights(rank)
    w, b = tf.Variable(w0), tf.Variable(b0)
    hvd.broadcast_variables([w, b], root_rank=0)
    x, y = problem()
    xs, ys = tf.constant(x[rank::size]), tf.constant(y[rank::size])
    for _ in range(STEPS):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(xs @ w + b - ys))
        tape = hvd.DistributedGradientTape(tape)
        gw, gb = tape.gradient(loss, [w, b])
        w.assign_sub(LR * gw)
        b.assign_sub(LR * gb)
    seen["w"] = w.numpy()
    seen["b"] = b.numpy()
    return seen, hvd


def main():
    seen, hvd = run_torch() if FRAMEWORK == "torch" else run_tensorflow()
    if WITH_MPI4PY:
        # mpi4py and Horovod in one process: both must see the same world and both must work.
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
        seen["mpi4py_rank"] = comm.Get_rank()
        seen["mpi4py_sum"] = comm.allreduce(comm.Get_rank() + 1, op=MPI.SUM)
    meta = {k: v for k, v in seen.items() if not isinstance(v, np.ndarray)}
    arrays = {k: v for k, v in seen.items() if isinstance(v, np.ndarray)}
    np.savez(os.path.join(OUT, f"rank{seen['rank']}.npz"), **arrays)
    with open(os.path.join(OUT, f"rank{seen['rank']}.json"), "w") as f:
        json.dump(meta, f)
    hvd.shutdown()


if __name__ == "__main__":
    main()
