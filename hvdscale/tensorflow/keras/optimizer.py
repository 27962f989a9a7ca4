"""Horovod's DistributedOptimizer for Keras 3 optimizers (TensorFlow backend).

Keras 3 routes every update -- `model.fit`, `train_on_batch`, `apply_gradients` in a custom
loop, eager or inside `tf.function` -- through `Optimizer.apply(grads, variables)`. The wrapper
overrides exactly that method: it averages the gradients across workers with Horovod's own
gradient allreduce (horovod.tensorflow._make_allreduce_grads_fn: compression, sparse_as_dense,
gradient_predivide_factor, groups, process sets) and then lets the wrapped optimizer update
the variables. Horovod's own Keras layer fails on Keras 3 because it keys gradients by
`variable.ref()`, which Keras 3 variables do not have (Horovod issue #4290); here the tf.Variable
behind each Keras variable is what Horovod sees.

The wrapped optimizer keeps its class name and module, so a model saved with it loads without
hvdscale (as with Horovod). Wrapping changes the class of the object passed in (no copy): the
optimizer keeps its variables and every setting, including ones its get_config() omits.
"""
import os

import keras
import tensorflow as tf
import horovod.tensorflow as hvd
from horovod.tensorflow.compression import Compression


def tf_variable(variable):
    """The tf.Variable behind a Keras 3 variable (a tf.Variable is returned as it is)."""
    if isinstance(variable, tf.Variable):
        return variable
    inner = getattr(variable, "value", None)
    if isinstance(inner, tf.Variable):
        return inner
    raise TypeError(f"expected a Keras or TensorFlow variable, got {type(variable).__name__}")


class _HorovodSettings:
    """What one DistributedOptimizer(...) call asked for (a plain object, so Keras's attribute
    tracking leaves it alone)."""

    def __init__(self, name, device_dense, device_sparse, compression, sparse_as_dense,
                 gradient_predivide_factor, op, backward_passes_per_step,
                 average_aggregated_gradients, groups, process_set, scale_local_gradients):
        self.name = name
        self.device_dense, self.device_sparse = device_dense, device_sparse
        self.compression = compression
        self.sparse_as_dense = bool(sparse_as_dense)
        self.gradient_predivide_factor = gradient_predivide_factor
        self.op = op
        self.backward_passes_per_step = int(backward_passes_per_step)
        self.average_aggregated_gradients = bool(average_aggregated_gradients)
        self.groups = groups
        self.process_set = process_set
        self.scale_local_gradients = bool(scale_local_gradients)


class GradientAggregation:
    """Local sums of `backward_passes_per_step` gradients before one allreduce.

    `counter` holds the passes since the last update (Horovod's `_agg_helper.counter`);
    the accumulators are tf.Variables outside the optimizer's own variable list, so a model
    saved with the wrapped optimizer still loads into the plain one."""

    def __init__(self, passes, average):
        self.passes = passes
        self.average = average
        self.counter = None
        self.accumulators = {}

    def build(self, keyed_variables):
        with tf.init_scope():     # variables are created eagerly, even from inside a tf.function
            if self.counter is None:
                self.counter = tf.Variable(0, dtype=tf.int64, trainable=False,
                                           name="hvd_aggregation_counter")
            for key, variable in keyed_variables:
                if key not in self.accumulators:
                    self.accumulators[key] = tf.Variable(
                        tf.zeros(variable.shape, variable.dtype), trainable=False,
                        name="hvd_aggregated_gradient")


class DistributedMixin:
    """Placed before the wrapped optimizer's class in a subclass made per wrap (see wrap)."""

    _hvd_settings = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)    # from_config() / load paths construct afresh
        self._hvd_configure()

    # ------------------------------------------------------------------ setup
    def _hvd_configure(self):
        s = self._hvd_settings
        self._hvd_local_keys = set()
        self._agg_helper = None
        self._hvd_norm_probe = None
        if s.backward_passes_per_step > 1:
            self._agg_helper = GradientAggregation(s.backward_passes_per_step,
                                                   s.average_aggregated_gradients)
        groups = s.groups
        if isinstance(groups, list):
            groups = [[tf_variable(v) for v in group] for group in groups]
        self._hvd_allreduce_grads = hvd._make_allreduce_grads_fn(
            s.name or f"Distributed{type(self).__name__}", s.device_dense, s.device_sparse,
            s.compression, s.sparse_as_dense, s.op, s.gradient_predivide_factor, groups,
            s.process_set)

    def hvd_attach_norm_probe(self):
        """From now on (in functions traced from now on) record |local gradient|^2 and
        |allreduced gradient|^2 of every update in two scalar variables (for
        callbacks.NoiseScaleCallback)."""
        if self._hvd_norm_probe is None:
            with tf.init_scope():
                self._hvd_norm_probe = (tf.Variable(0.0, trainable=False, name="hvd_local_sq"),
                                        tf.Variable(0.0, trainable=False, name="hvd_global_sq"))
        return self._hvd_norm_probe

    def register_local_var(self, var):
        """Gradients of this variable are not allreduced: each worker applies its own (divided
        by the number of workers when scale_local_gradients, as in Horovod)."""
        self._hvd_local_keys.add(self._var_key(var))

    @property
    def process_set(self):
        return self._hvd_settings.process_set

    def build(self, variables):
        super().build(variables)
        if self._agg_helper is not None:
            self._agg_helper.build([(self._var_key(v), v) for v in variables])

    # ------------------------------------------------------------------ counters
    @property
    def iterations(self):
        """Updates applied (as Keras 3's own gradient accumulation counts them): with
        backward_passes_per_step = k, `_iterations` counts backward passes and this is
        `_iterations // k`, so Adam/LAMB bias corrections and schedules see update steps."""
        if self._agg_helper is None:
            return self._iterations
        return self._iterations // self._agg_helper.passes

    def _get_current_learning_rate(self):
        if isinstance(self._learning_rate, keras.optimizers.schedules.LearningRateSchedule):
            return self._learning_rate(self.iterations)
        return super()._get_current_learning_rate()

    # ------------------------------------------------------------------ the update
    def _hvd_workers(self):
        process_set = self._hvd_settings.process_set
        if int(os.environ.get("HOROVOD_ELASTIC", 0)):
            return tf.cast(hvd.size_op(process_set_id=process_set.process_set_id), tf.float32)
        return float(process_set.size())

    def allreduce_gradients(self, grads, variables):
        """Horovod's gradient allreduce over the non-local variables; local ones are divided
        by the worker count when scale_local_gradients (Horovod's rule)."""
        keys = [self._var_key(v) for v in variables]
        shared = [i for i, k in enumerate(keys) if k not in self._hvd_local_keys]
        reduced = self._hvd_allreduce_grads([grads[i] for i in shared],
                                            [tf_variable(variables[i]) for i in shared])
        out = list(grads)
        for i, g in zip(shared, reduced):
            out[i] = g
        if self._hvd_local_keys and self._hvd_settings.scale_local_gradients:
            workers = self._hvd_workers()
            for i, k in enumerate(keys):
                g = out[i]
                if k in self._hvd_local_keys and g is not None:
                    if isinstance(g, tf.IndexedSlices):
                        out[i] = tf.IndexedSlices(g.values / tf.cast(workers, g.values.dtype),
                                                  g.indices, g.dense_shape)
                    else:
                        out[i] = g / tf.cast(workers, g.dtype)
        return out

    def apply(self, grads, trainable_variables=None):
        grads = list(grads)
        if not grads:
            return None
        if trainable_variables is None:
            if not self.built:
                return super().apply(grads, None)     # Keras's own error message
            variables = list(self._trainable_variables)
        else:
            variables = list(trainable_variables)
            if not self.built:
                with keras.name_scope(self.name, caller=self):
                    self.build(variables)
                self.built = True
        if self._agg_helper is not None:
            return self._aggregate_and_apply(grads, variables)
        reduced = self.allreduce_gradients(grads, variables)
        if self._hvd_norm_probe is not None:
            from hvdscale.study.gns_tf import sq_norm
            local_sq, global_sq = self._hvd_norm_probe
            local_sq.assign(sq_norm(grads))
            global_sq.assign(sq_norm(reduced))
        return super().apply(reduced, variables)

    def _aggregate_and_apply(self, grads, variables):
        agg = self._agg_helper
        agg.build([(self._var_key(v), v) for v in variables])
        accumulators = [agg.accumulators[self._var_key(v)] for v in variables]
        for acc, g in zip(accumulators, grads):
            if g is not None:
                acc.assign_add(tf.cast(tf.convert_to_tensor(g), acc.dtype))
        agg.counter.assign_add(1)

        def update():
            scale = 1.0 / agg.passes if agg.average else 1.0
            summed = [None if g is None else acc.read_value() * scale
                      for acc, g in zip(accumulators, grads)]
            reduced = self.allreduce_gradients(summed, variables)
            super(DistributedMixin, self).apply(reduced, variables)
            # assign zeros (not multiply): an inf/nan sum must not leak into the next cycle
            for acc in accumulators:
                acc.assign(tf.zeros_like(acc))
            agg.counter.assign(0)
            return tf.constant(True)

        def skip():
            self._iterations.assign_add(1)
            return tf.constant(False)

        if tf.executing_eagerly():
            return update() if int(agg.counter.numpy()) >= agg.passes else skip()
        return tf.cond(agg.counter >= agg.passes, update, skip)


_SETTINGS_NAMES = ("name", "device_dense", "device_sparse", "compression", "sparse_as_dense",
                   "gradient_predivide_factor", "op", "backward_passes_per_step",
                   "average_aggregated_gradients", "groups", "process_set",
                   "scale_local_gradients")


def distributed_class(base, settings):
    """A subclass of `base` with the same name and module, averaging gradients per settings."""
    if issubclass(base, DistributedMixin):
        raise ValueError(f"{base.__name__} is already a DistributedOptimizer")
    return type(base.__name__, (DistributedMixin, base),
                {"_hvd_settings": settings, "__module__": base.__module__,
                 "__qualname__": base.__qualname__, "__doc__": base.__doc__})


def wrap(optimizer, settings):
    """Turn `optimizer` (a Keras 3 optimizer) into its distributed subclass, keeping its state."""
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise TypeError("DistributedOptimizer needs a Keras 3 optimizer "
                        f"(keras.optimizers.Optimizer), got {type(optimizer).__name__}")
    if isinstance(optimizer, DistributedMixin):
        raise ValueError("this optimizer is already a DistributedOptimizer")
    object.__setattr__(optimizer, "__class__", distributed_class(type(optimizer), settings))
    optimizer._hvd_configure()
    if optimizer.built and optimizer._agg_helper is not None:
        optimizer._agg_helper.build([(optimizer._var_key(v), v)
                                     for v in optimizer._trainable_variables])
    return optimizer


def make_settings(**kwargs):
    unknown = set(kwargs) - set(_SETTINGS_NAMES)
    if unknown:
        raise TypeError(f"unknown DistributedOptimizer arguments: {sorted(unknown)}")
    return _HorovodSettings(**kwargs)


__all__ = ["Compression", "tf_variable", "wrap", "make_settings", "distributed_class",
           "DistributedMixin", "GradientAggregation"]
