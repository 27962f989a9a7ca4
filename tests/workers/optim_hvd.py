"""Worker for tests/test_hvd_optimizers.py: trains a tiny MLP with hvdscale's optimizers.

    python optim_hvd.py FRAMEWORK OPTIMIZER ACCUMULATION OUT [--single]

Under horovodrun each of K ranks takes its shard of every global batch (K * PER_RANK *
ACCUMULATION rows), runs ACCUMULATION backward passes of PER_RANK rows and applies the averaged
gradient (torch: hvd.DistributedOptimizer with backward_passes_per_step; TF:
hvd.DistributedGradientTape, or local accumulation + hvd.grouped_allreduce). With --single one
process without Horovod takes each whole global batch at once: the distributed run must end
at the same weights. Rank r writes OUT/rank<r>.npz (OUT/single.npz with --single).
"""
import os
import sys

import numpy as np

FRAMEWORK, OPTIMIZER, ACCUMULATION, OUT = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
SINGLE = "--single" in sys.argv
WORKERS, PER_RANK, STEPS, N_IN, N_HID, N_OUT = 2, 4, 5, 6, 5, 3
SETTINGS = {"sgd": (0.1, {"momentum": 0.9, "weight_decay": 1e-3}),
            "lars": (2.0, {"momentum": 0.9, "weight_decay": 1e-3, "trust_coefficient": 0.02}),
            # eps comparable to sqrt(v) keeps LAMB sensitive to the gradient's scale, so summed
            # instead of averaged gradients would show
            "lamb": (0.05, {"betas": (0.9, 0.999), "eps": 1e-3, "weight_decay": 0.01})}


def data():
    rng = np.random.default_rng(0)
    rows = WORKERS * PER_RANK * ACCUMULATION
    x = rng.standard_normal((STEPS, rows, N_IN)).astype(np.float32)
    y = rng.standard_normal((STEPS, rows, N_OUT)).astype(np.float32)
    return x, y


def initial_weights(seed):
    rng = np.random.default_rng(10 + seed)  # differs per rank: the broadcast must fix it
    return [rng.standard_normal(s).astype(np.float32) * 0.5
            for s in [(N_HID, N_IN), (N_HID,), (N_OUT, N_HID), (N_OUT,)]]


def micro_batches(x, y, rank):
    """This rank's ACCUMULATION micro-batches of one global batch (or the whole batch)."""
    if SINGLE:
        return [(x, y)]
    shard = slice(rank * PER_RANK * ACCUMULATION, (rank + 1) * PER_RANK * ACCUMULATION)
    xs, ys = x[shard], y[shard]
    return [(xs[j * PER_RANK:(j + 1) * PER_RANK], ys[j * PER_RANK:(j + 1) * PER_RANK])
            for j in range(ACCUMULATION)]


def run_torch():
    import torch
    from hvdscale.torch.optim import build_optimizer
    torch.set_num_threads(1)
    hvd = None
    rank = 0
    if not SINGLE:
        import horovod.torch as hvd
        hvd.init()
        rank = hvd.rank()
        assert hvd.size() == WORKERS, hvd.size()
    model = torch.nn.Sequential(torch.nn.Linear(N_IN, N_HID), torch.nn.Tanh(), torch.nn.Linear(N_HID, N_OUT))
    with torch.no_grad():
        for p, w in zip(model.parameters(), initial_weights(rank if not SINGLE else 0)):
            p.copy_(torch.from_numpy(w))
    lr, cfg = SETTINGS[OPTIMIZER]
    opt = build_optimizer(OPTIMIZER, model, lr, cfg)
    if hvd is not None:
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                       backward_passes_per_step=ACCUMULATION)
    x, y = data()
    for s in range(STEPS):
        opt.zero_grad()
        batches = micro_batches(x[s], y[s], rank)
        for xb, yb in batches:
            loss = torch.nn.functional.mse_loss(model(torch.from_numpy(xb)), torch.from_numpy(yb))
            (loss / len(batches)).backward()  # Horovod sums the passes; the mean is ours to take
        opt.step()
    return rank, [p.detach().numpy() for p in model.parameters()], hvd


def run_tensorflow():
    import tensorflow as tf
    import keras
    from hvdscale.tensorflow.optim import build_optimizer
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    hvd = None
    rank = 0
    if not SINGLE:
        import horovod.tensorflow as hvd
        hvd.init()
        rank = hvd.rank()
        assert hvd.size() == WORKERS, hvd.size()
    model = keras.Sequential([keras.Input((N_IN,)), keras.layers.Dense(N_HID, activation="tanh"),
                              keras.layers.Dense(N_OUT)])
    w = initial_weights(rank if not SINGLE else 0)
    model.set_weights([w[0].T, w[1], w[2].T, w[3]])  # Keras kernels are (in, out)
    variables = model.trainable_variables
    if hvd is not None:  # hvd.broadcast_variables cannot assign Keras 3 variables: do it by value
        for i, v in enumerate(variables):
            v.assign(hvd.broadcast(tf.convert_to_tensor(v), root_rank=0, name=f"init{i}"))
    lr, cfg = SETTINGS[OPTIMIZER]
    cfg = dict(cfg, exclude_1d=True)
    opt = build_optimizer(OPTIMIZER, lr, cfg)
    if OPTIMIZER == "sgd":  # Keras SGD decays decoupled; not what the torch run does, so leave it out
        opt = build_optimizer("sgd", lr, dict(cfg, weight_decay=0.0))
    x, y = data()

    def loss_fn(xb, yb):
        return tf.reduce_mean(tf.square(model(xb) - yb))

    for s in range(STEPS):
        batches = micro_batches(x[s], y[s], rank)
        if hvd is not None and len(batches) == 1:
            with tf.GradientTape() as tape:
                loss = loss_fn(*batches[0])
            # Horovod calls .ref() on what it differentiates against: give it the tf.Variables
            # behind the Keras 3 variables
            grads = hvd.DistributedGradientTape(tape).gradient(loss, [v.value for v in variables])
        else:
            grads = [tf.zeros_like(v) for v in variables]
            for xb, yb in batches:
                with tf.GradientTape() as tape:
                    loss = loss_fn(xb, yb) / len(batches)
                grads = [a + g for a, g in zip(grads, tape.gradient(loss, variables))]
            if hvd is not None:
                grads = hvd.grouped_allreduce(grads, op=hvd.Average)
        opt.apply_gradients(zip(grads, variables))
    out = [v.numpy() for v in variables]
    return rank, [out[0].T, out[1], out[2].T, out[3]], hvd


def main():
    rank, weights, hvd = run_torch() if FRAMEWORK == "torch" else run_tensorflow()
    name = "single" if SINGLE else f"rank{rank}"
    np.savez(os.path.join(OUT, f"{name}.npz"), *weights)
    if hvd is not None:
        hvd.shutdown()


if __name__ == "__main__":
    main()
