"""The TensorFlow helper of the online noise scale: squared norms of gradient lists, dense and
sparse, inside and outside tf.function, equal to the same numbers computed in NumPy."""
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from hvdscale.study.gns_tf import sq_norm  # noqa: E402

tf.config.threading.set_intra_op_parallelism_threads(1)


def test_dense_gradients_of_two_half_batches_match_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 5)).astype(np.float32)
    y = rng.normal(size=(16, 1)).astype(np.float32)
    w = tf.Variable(rng.normal(size=(5, 1)).astype(np.float32))
    b = tf.Variable(np.zeros(1, np.float32))
    unused = tf.Variable(np.ones(3, np.float32))

    @tf.function
    def half_norms():
        out = []
        for part in (slice(0, 8), slice(8, 16)):
            with tf.GradientTape() as tape:
                loss = 0.5 * tf.reduce_mean((tf.matmul(x[part], w) + b - y[part]) ** 2) / 2
            out.append(sq_norm(tape.gradient(loss, [w, b, unused]), loss_scale=0.5))
        return out

    got = [float(v) for v in half_norms()]
    wn, bn = w.numpy(), b.numpy()
    expected = []
    for part in (slice(0, 8), slice(8, 16)):
        err = x[part] @ wn + bn - y[part]
        gw, gb = x[part].T @ err / 8, err.mean(0)
        expected.append(float(np.sum(gw ** 2) + np.sum(gb ** 2)))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_sparse_gradient_counts_repeated_rows_once_summed():
    table = tf.Variable(np.arange(12, dtype=np.float32).reshape(4, 3))
    ids = tf.constant([1, 1, 3])
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.gather(table, ids))
    (grad,) = tape.gradient(loss, [table])
    assert isinstance(grad, tf.IndexedSlices)
    # dense gradient: row 1 has 2s, row 3 has 1s -> 3*4 + 3*1 = 15 (not 3 rows of 1s = 9)
    assert float(sq_norm([grad])) == pytest.approx(15.0)
    assert float(sq_norm([None])) == 0.0
