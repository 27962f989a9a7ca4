"""Worker for tests/test_keras_dropin.py, run under `horovodrun -np 2`: hvdscale.tensorflow.keras
in model.fit on Fashion-MNIST rows, several cases in one process (TensorFlow starts once).

    python keras_dropin.py OUT

fit cases (each rank starts from a different random init; BroadcastGlobalVariablesCallback
must fix that): rank r's shard of every global batch, shuffle=False; at the very end rank 0
fits one process on the global batch from rank 0's init with the plain optimizer. Written per rank:
weights (OUT/<case>.rank<r>.npz, OUT/<case>.single.npz), history and the local epoch logs
before MetricAverageCallback (OUT/rank<r>.json). lr cases: the learning rate before every
batch under Horovod's warm-up/schedule callbacks and CoreScheduleCallback. noise: the
NoiseScaleCallback's readings and the per-step squared norms. Last, Horovod's own ported
test cases (keras_horovod_cases.py) run in this process under pytest; its exit code is
recorded.
"""
import json
import os
import sys
from pathlib import Path

import numpy as np
import tensorflow as tf

tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)

import keras  # noqa: E402
import hvdscale.tensorflow.keras as hvd  # noqa: E402
from hvdscale.data.fashion_mnist import load_fashion_mnist  # noqa: E402

OUT = Path(sys.argv[1])
PER_RANK, STEPS, EPOCHS = 16, 6, 2
FIT_CASES = {  # name: (optimizer factory, backward_passes_per_step[, compression])
    "sgd": (lambda: keras.optimizers.SGD(0.05, momentum=0.9), 1),
    "sgd_fp16": (lambda: keras.optimizers.SGD(0.05, momentum=0.9), 1, hvd.Compression.fp16),
    "adam": (lambda: keras.optimizers.Adam(1e-3), 1),
    "lamb_accum2": (lambda: hvd.LAMB(learning_rate=5e-3, weight_decay=0.01), 2),
    "lars": (lambda: hvd.LARS(learning_rate=0.5, momentum=0.9, weight_decay=1e-4,
                              trust_coefficient=0.02), 1),
}


def model(seed):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((28, 28, 1)),
        keras.layers.Conv2D(4, 3, activation="relu"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Flatten(),
        keras.layers.Dense(10, activation="softmax"),
    ])


def data(rows):
    x, y, _, _ = load_fashion_mnist()
    return (x[:rows, ..., None] / 255.0).astype(np.float32), y[:rows]


class LocalLogs(keras.callbacks.Callback):
    """The epoch logs as this rank computed them (placed before MetricAverageCallback)."""

    def __init__(self):
        super().__init__()
        self.epochs = []

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append(dict(logs))


class LearningRates(keras.callbacks.Callback):
    """The learning rate each batch runs with (placed after the callbacks that set it)."""

    def __init__(self):
        super().__init__()
        self.values = []

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_batch_begin(self, batch, logs=None):
        self.values.append([self.epoch, batch,
                            float(self.model.optimizer.learning_rate.numpy())])


def fit_case(name, rank, size, x, y):
    make_optimizer, passes, *compression = FIT_CASES[name]
    rows = size * PER_RANK * passes          # one global batch (one update)
    # rank r's micro-batches of update t: rows t*rows + (j*size + r)*PER_RANK, j < passes
    idx = np.concatenate([np.arange(t * rows + (j * size + rank) * PER_RANK,
                                    t * rows + (j * size + rank + 1) * PER_RANK)
                          for t in range(STEPS) for j in range(passes)])
    net = model(seed=100 + rank)
    opt = hvd.DistributedOptimizer(make_optimizer(), backward_passes_per_step=passes,
                                   average_aggregated_gradients=True,
                                   compression=(compression or [hvd.Compression.none])[0])
    net.compile(loss=keras.losses.SparseCategoricalCrossentropy(), optimizer=opt,
                metrics=["accuracy"])
    local = LocalLogs()
    history = net.fit(x[idx], y[idx], batch_size=PER_RANK, epochs=EPOCHS, shuffle=False, verbose=0,
                      callbacks=[hvd.callbacks.BroadcastGlobalVariablesCallback(0), local,
                                 hvd.callbacks.MetricAverageCallback()])
    np.savez(OUT / f"{name}.rank{rank}.npz", *net.get_weights())
    return {"history": history.history, "local": local.epochs,
            "iterations": int(opt.iterations.numpy())}


def single_case(name, size, x, y):
    """One process, the global batch, rank 0's initial weights. Run after every collective:
    Horovod matches operations by name, and an extra model on one rank would shift the
    Keras layer names (and so the op names) of every later model there."""
    make_optimizer, passes = FIT_CASES[name][:2]
    rows = size * PER_RANK * passes
    single = model(seed=100)
    single.compile(loss=keras.losses.SparseCategoricalCrossentropy(),
                   optimizer=make_optimizer(), metrics=["accuracy"])
    single.fit(x[:rows * STEPS], y[:rows * STEPS], batch_size=rows, epochs=EPOCHS,
               shuffle=False, verbose=0)
    np.savez(OUT / f"{name}.single.npz", *single.get_weights())


def lr_case(x, y):
    """Horovod's warm-up, then a staircase and a smooth schedule (SGD with momentum, so the
    momentum correction runs too)."""
    net = model(seed=1)
    initial_lr = 0.1 * hvd.size()
    opt = hvd.DistributedOptimizer(keras.optimizers.SGD(0.01, momentum=0.9))
    net.compile(loss=keras.losses.SparseCategoricalCrossentropy(), optimizer=opt)
    rates = LearningRates()
    history = net.fit(x[:5 * PER_RANK], y[:5 * PER_RANK], batch_size=PER_RANK, epochs=6,
                      shuffle=False, verbose=0, callbacks=[
                          hvd.callbacks.LearningRateWarmupCallback(initial_lr, warmup_epochs=2),
                          hvd.callbacks.LearningRateScheduleCallback(initial_lr, 0.5,
                                                                     start_epoch=2, end_epoch=4),
                          hvd.callbacks.LearningRateScheduleCallback(
                              initial_lr, lambda epoch: 1.0 / (1.0 + epoch), start_epoch=4,
                              staircase=False),
                          rates])
    return {"rates": rates.values, "lr_logs": history.history["lr"]}


def core_schedule_case(x, y, passes):
    net = model(seed=2)
    opt = hvd.DistributedOptimizer(keras.optimizers.SGD(0.01), backward_passes_per_step=passes,
                                   average_aggregated_gradients=True)
    net.compile(loss=keras.losses.SparseCategoricalCrossentropy(), optimizer=opt)
    steps_per_epoch = 4     # updates per epoch
    schedule = hvd.callbacks.CoreScheduleCallback.for_horovod(
        base_lr=0.05, reference_batch=PER_RANK, batch_size=PER_RANK,
        steps_per_epoch=steps_per_epoch, epochs=3, scaling="linear",
        backward_passes_per_step=passes, warmup="linear", warmup_epochs=1, decay="cosine")
    rates = LearningRates()
    rows = steps_per_epoch * passes * PER_RANK
    net.fit(x[:rows], y[:rows], batch_size=PER_RANK, epochs=3, shuffle=False, verbose=0,
            callbacks=[schedule, rates])
    return {"rates": rates.values, "iterations": int(opt.iterations.numpy())}


class NormLog(keras.callbacks.Callback):
    def __init__(self, noise):
        super().__init__()
        self.noise, self.values = noise, []

    def on_batch_end(self, batch, logs=None):
        local, total = (float(v.numpy()) for v in self.noise.probe)
        self.values.append([local, total])


def noise_case(rank, x, y):
    x, y = x[rank * 6 * PER_RANK:], y[rank * 6 * PER_RANK:]    # this rank's own rows
    net = model(seed=3)
    opt = hvd.DistributedOptimizer(keras.optimizers.SGD(0.05))
    net.compile(loss=keras.losses.SparseCategoricalCrossentropy(), optimizer=opt)
    noise = hvd.callbacks.NoiseScaleCallback(batch_size=PER_RANK, every=2, ema=0.5)
    norms = NormLog(noise)
    history = net.fit(x[:6 * PER_RANK], y[:6 * PER_RANK], batch_size=PER_RANK, epochs=1,
                      shuffle=False, verbose=0,
                      callbacks=[hvd.callbacks.BroadcastGlobalVariablesCallback(0), noise, norms])
    return {"norms": norms.values,
            "logs": {k: v[-1] for k, v in history.history.items() if k != "loss"}}


def momentum_case(x, y):
    """Momentum correction (one process, no collectives): model.fit with
    LearningRateScheduleCallback against an eager loop doing what Horovod's callback does --
    for the step where the lr changes from old to new, SGD's momentum coefficient is
    momentum * new / old, then restored."""
    multiplier = lambda epoch: 0.5 ** epoch  # noqa: E731
    rows, batches, epochs = PER_RANK * 4, 4, 3
    fitted = model(seed=4)
    fitted.compile(loss=keras.losses.SparseCategoricalCrossentropy(),
                   optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    fitted.fit(x[:rows], y[:rows], batch_size=PER_RANK, epochs=epochs, shuffle=False, verbose=0,
               callbacks=[hvd.callbacks.LearningRateScheduleCallback(0.2, multiplier)])
    manual = model(seed=4)
    opt = keras.optimizers.SGD(0.1, momentum=0.9)
    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    lr = 0.1
    for epoch in range(epochs):
        for b in range(batches):
            xb, yb = x[b * PER_RANK:(b + 1) * PER_RANK], y[b * PER_RANK:(b + 1) * PER_RANK]
            new_lr = 0.2 * multiplier(epoch) if b == 0 else lr
            opt.learning_rate = new_lr
            opt.momentum = 0.9 * new_lr / lr
            with tf.GradientTape() as tape:
                loss = loss_fn(yb, manual(xb, training=True))
            grads = tape.gradient(loss, manual.trainable_variables)
            opt.apply_gradients(zip(grads, manual.trainable_variables))   # eager: reads momentum
            opt.momentum, lr = 0.9, new_lr
    np.savez(OUT / "momentum.fit.npz", *fitted.get_weights())
    np.savez(OUT / "momentum.horovod_rule.npz", *manual.get_weights())


def main():
    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    OUT.mkdir(parents=True, exist_ok=True)
    x, y = data(size * PER_RANK * 2 * STEPS)
    result = {"size": size, "controller": "mpi" if hvd.mpi_enabled() else "gloo"}
    only = os.environ.get("KERAS_DROPIN_CASES")
    for name in FIT_CASES:
        if not only or name in only.split(","):
            result[name] = fit_case(name, rank, size, x, y)
    result["lr"] = lr_case(x, y)
    result["core_schedule"] = core_schedule_case(x, y, passes=1)
    result["core_schedule_accum2"] = core_schedule_case(x, y, passes=2)
    result["noise"] = noise_case(rank, x, y)
    (OUT / f"rank{rank}.json").write_text(json.dumps(result))

    import pytest
    cases = Path(__file__).with_name("keras_horovod_cases.py")
    code = pytest.main(["-q", "--color=no", "-p", "no:cacheprovider", "-W",
                        "ignore::DeprecationWarning", "--rootdir", str(cases.parent), str(cases)])
    (OUT / f"cases.rank{rank}.txt").write_text(str(int(code)))
    if rank == 0:
        for name in FIT_CASES:
            if not only or name in only.split(","):
                single_case(name, size, x, y)
        momentum_case(x, y)


if __name__ == "__main__":
    main()
