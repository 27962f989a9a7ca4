"""TensorFlow side of the online gradient noise scale: the squared norm of a gradient list.

In a custom training loop the local gradients come from tf.GradientTape.gradient() before the
Horovod allreduce, and the averaged ones after it; this function turns either into a scalar
tensor (usable inside tf.function) that the trainer passes to hvdscale.study.gns as a float.
"""
import tensorflow as tf


def sq_norm(gradients, loss_scale=1.0):
    """sum |g|^2 over a list of gradients (None entries, for unused variables, are skipped;
    IndexedSlices count their values). loss_scale is divided back out, as in gns_torch."""
    parts = []
    for grad in gradients:
        if grad is None:
            continue
        if isinstance(grad, tf.IndexedSlices):
            # densify: repeated indices add up in the true gradient, not in the values
            grad = tf.convert_to_tensor(grad)
        parts.append(tf.reduce_sum(tf.square(tf.cast(grad, tf.float32))))
    if not parts:
        return tf.constant(0.0, tf.float32)
    return tf.add_n(parts) / (loss_scale * loss_scale)


class TFNoiseScale:
    """What a TF trainer holds to log the online noise scale (noise_scale.every > 0).

    On due steps the trainer takes its accumulation path (local gradients are visible there
    before the grouped allreduce), with `micro_batches()` pieces; it hands the local squared
    norms of the pieces and the squared norm of the allreduced gradient to `record`.
    """

    def __init__(self, noise_cfg, batch_cfg, comm):
        from hvdscale.study.gns import from_config
        self.online = from_config(noise_cfg, batch_cfg, comm)
        if self.online is None:
            raise ValueError("TFNoiseScale needs noise_scale.every > 0")

    @property
    def last(self):
        return self.online.last

    @property
    def due_now(self):
        return self.online.due_now

    def micro_batches(self, accumulation):
        return self.online.begin_step(accumulation)

    def record(self, local_sq_norms, global_sq_norm):
        return self.online.record([float(v) for v in local_sq_norms], float(global_sq_norm))

    def state_dict(self):
        return self.online.state_dict()

    def load_state_dict(self, state):
        self.online.load_state_dict(state)
