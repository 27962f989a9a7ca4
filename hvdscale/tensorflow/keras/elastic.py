"""Elastic Horovod for Keras 3: KerasState, the commit/batch/epoch callbacks and `run`.

Horovod's TensorFlowKerasState calls `optimizer.variables()` (a list property in Keras 3) and
broadcasts Keras variables directly; this KerasState keeps Horovod's behaviour (save / restore /
sync of model and optimizer variables plus any keyword attributes) over the tf.Variables behind
the Keras 3 ones. `run` is Horovod's (on a lost or added worker: reset Horovod, restore the last
commit, call the training function again) with a wider net for Horovod's errors.
"""
import keras
import tensorflow as tf
from horovod.common.elastic import ObjectState, run_fn
from horovod.common.exceptions import HorovodInternalError
from horovod.tensorflow.elastic import _reset
from horovod.tensorflow.functions import broadcast_object
from horovod.tensorflow.mpi_ops import rank

from hvdscale.tensorflow.keras.optimizer import tf_variable


def _variables(model, optimizer):
    optimizer_vars = list(optimizer.variables) if optimizer is not None else []
    return [tf_variable(v) for v in list(model.variables) + optimizer_vars]


def run(func):
    """Decorator for the elastic training function (Horovod's `hvd.elastic.run`): on a lost or
    added worker, reset Horovod, restore the last commit, sync, and call `func(state)` again.

    Horovod's version turns only TF errors that mention HorovodAllreduce/Allgather/Broadcast
    into a reset (a grouped allreduce, e.g. DistributedOptimizer(groups=...), fails as
    HorovodGroupedAllreduce) and silently returns None for other UnknownErrors; here any
    TensorFlow op error from a Horovod op resets, and every other error propagates."""
    def wrapper(state, *args, **kwargs):
        try:
            return func(state, *args, **kwargs)
        except tf.errors.OpError as err:
            if "Horovod" in (err.message or ""):
                raise HorovodInternalError(err) from err
            raise
    return run_fn(wrapper, _reset)


class KerasState(ObjectState):
    """State of a Keras 3 model and optimizer, plus keyword attributes (epoch=0, batch=0...).

    commit() saves a copy (in memory) and checks for host changes; restore() goes back to the
    last commit; sync() gives every worker rank 0's state."""

    def __init__(self, model, optimizer=None, **kwargs):
        if not model.built:
            raise ValueError("Model must be built first. Run `model.build(input_shape)`.")
        self.model = model
        self.optimizer = optimizer or getattr(model, "optimizer", None)
        self._save_model()
        super().__init__(bcast_object=broadcast_object, get_rank=rank, **kwargs)

    def save(self):
        self._save_model()
        super().save()

    def restore(self):
        self._load_model()
        super().restore()

    def sync(self):
        import horovod.tensorflow as hvd
        variables = _variables(self.model, self.optimizer)
        if variables:
            hvd.broadcast_variables(variables, root_rank=0)
        self._save_model()
        super().sync()

    def _save_model(self):
        # the variable list is read each time: the optimizer creates its slots on first use
        self._saved = [(v, tf.identity(v)) for v in _variables(self.model, self.optimizer)]

    def _load_model(self):
        for var, value in self._saved:
            var.assign(value)


class CommitStateCallback(keras.callbacks.Callback):
    """Commit `state` every batches_per_commit batches and at the end of every epoch."""

    def __init__(self, state, batches_per_commit=1):
        super().__init__()
        self.state = state
        self.batches_per_commit = batches_per_commit
        self.batches_remaining = batches_per_commit

    def on_train_begin(self, logs=None):
        self.batches_remaining = self.batches_per_commit   # the same on every worker after a reset

    def on_batch_end(self, batch, logs=None):
        self.batches_remaining -= 1
        if self.batches_remaining == 0:
            self.state.commit()
            self.batches_remaining = self.batches_per_commit

    def on_epoch_end(self, epoch, logs=None):
        self.state.commit()


class UpdateBatchStateCallback(keras.callbacks.Callback):
    """Keep state.batch at the current batch (0 at the end of each epoch)."""

    def __init__(self, state):
        super().__init__()
        self.state = state
        self.steps_per_epoch = None

    def on_train_begin(self, logs=None):
        self.steps_per_epoch = None

    def on_epoch_begin(self, epoch, logs=None):
        if self.params.get("steps"):
            if self.steps_per_epoch is None:
                self.steps_per_epoch = self.params.get("steps")
            self.params["steps"] = self.steps_per_epoch - self.state.batch

    def on_batch_end(self, batch, logs=None):
        self.state.batch = batch

    def on_epoch_end(self, epoch, logs=None):
        self.state.batch = 0


class UpdateEpochStateCallback(keras.callbacks.Callback):
    """Keep state.epoch at the number of finished epochs, counted across resets."""

    def __init__(self, state):
        super().__init__()
        self.state = state
        self.initial_epoch = self.state.epoch

    def on_train_begin(self, logs=None):
        self.initial_epoch = self.state.epoch

    def on_epoch_end(self, epoch, logs=None):
        self.state.epoch = self.initial_epoch + epoch + 1


__all__ = ["KerasState", "CommitStateCallback", "UpdateBatchStateCallback",
           "UpdateEpochStateCallback", "run"]
