"""Worker for tests/test_models_tf.py::test_two_horovod_workers_..., run by horovodrun -np 2.

For the Keras `cnn` and `resnet8` (custom residual-block layers): each rank initialises
differently, rank 0's variables are broadcast, then a tf.function step with Horovod's
DistributedGradientTape trains each rank on its own batch. Writes OUT/rank<r>.json.

    python models_tf_hvd.py OUT
"""
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import keras  # noqa: E402
import horovod.tensorflow as hvd  # noqa: E402

from hvdscale.tensorflow.models import build_model  # noqa: E402

OUT = sys.argv[1]
LR, STEPS, SIZE, BATCH = 0.1, 3, 16, 16


def flat(variables):
    return np.concatenate([np.asarray(v).ravel() for v in variables])


def check(name, rank):
    keras.utils.set_random_seed(100 + rank)        # a different init on every rank
    model = build_model(name, 10, 1, SIZE)
    own_init = flat(model.trainable_variables)
    inits = hvd.allgather(tf.constant(own_init[None, :])).numpy()
    # Horovod 0.28 handles tf.Variables, not Keras 3 variables (broadcast_variables assigns to
    # a traced tensor, DistributedGradientTape calls .ref()); on the TF backend `.value` is
    # the backing tf.Variable, which works for both.
    hvd.broadcast_variables([v.value for v in model.variables], root_rank=0)
    backing = [v.value for v in model.trainable_variables]
    start = flat(model.trainable_variables)

    rng = np.random.default_rng(rank)              # each rank its own shard of data
    x = tf.constant(rng.normal(size=(BATCH, SIZE, SIZE, 1)).astype("float32"))
    y = tf.constant(rng.integers(0, 10, size=BATCH))
    opt = keras.optimizers.SGD(LR)

    def loss_fn():
        logits = model(x, training=True)
        return tf.reduce_mean(
            tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits))

    @tf.function
    def local_grads():
        with tf.GradientTape() as tape:
            loss = loss_fn()
        return tape.gradient(loss, model.trainable_variables)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = loss_fn()
        tape = hvd.DistributedGradientTape(tape)
        grads = tape.gradient(loss, backing)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return loss, [g is not None for g in grads]

    # The expected first update, from the ranks' local gradients gathered by hand.
    mine = np.concatenate([g.numpy().ravel() for g in local_grads()])
    mean_grad = hvd.allgather(tf.constant(mine[None, :])).numpy().mean(axis=0)
    _, reached = step()
    after_one = flat(model.trainable_variables)
    first_update_error = float(np.abs(after_one - (start - LR * mean_grad)).max())
    for _ in range(STEPS - 1):
        step()
    final = [np.asarray(v) for v in model.trainable_variables]
    return {
        "init_differs_before_broadcast": bool(np.abs(inits[0] - inits[1]).max() > 0),
        "all_grads": bool(all(bool(r) for r in reached)),
        "first_update_error": first_update_error,
        "moved": float(np.abs(flat(final) - start).max()),
        "checksums": [float(np.sum(v, dtype=np.float64)) for v in final],
    }


def main():
    tf.config.threading.set_intra_op_parallelism_threads(1)   # before TF starts its runtime
    hvd.init()
    report = {name: check(name, hvd.rank()) for name in ("cnn", "resnet8")}
    with open(os.path.join(OUT, f"rank{hvd.rank()}.json"), "w") as f:
        json.dump(report, f)
    hvd.shutdown()


if __name__ == "__main__":
    main()
