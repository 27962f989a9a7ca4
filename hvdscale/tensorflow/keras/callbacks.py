"""Horovod's Keras callbacks for Keras 3, plus two of hvdscale's.

Horovod's four (same names, arguments and learning rates):
  BroadcastGlobalVariablesCallback(root_rank)   model + optimizer variables from root_rank
  MetricAverageCallback()                       epoch logs averaged over workers, in place
  LearningRateScheduleCallback(initial_lr, multiplier, start_epoch, end_epoch, staircase, ...)
  LearningRateWarmupCallback(initial_lr, warmup_epochs, ...)
      lr(epoch) = initial_lr / size * (epoch * (size - 1) / warmup_epochs + 1), with
      epoch = full epochs + (batch + 1) / steps_per_epoch, set before every batch
hvdscale's:
  CoreScheduleCallback(schedule)                lr of every update from a hvdscale.core schedule
  NoiseScaleCallback(batch_size, every, ema)    online gradient noise scale (B_simple) in logs

Differences from Horovod's, each forced by Keras 3 or a fix (docs/horovod-migration.md):
- the broadcast happens before the first batch (the optimizer is built for it if the model is
  built); Horovod broadcast after the first batch, when Keras 2 had created the optimizer slots;
- momentum correction scales the optimizer's momentum buffers by new_lr / old_lr before the
  step, which is Horovod's temporary `momentum * new_lr / old_lr` coefficient for that one step:
  Keras 3 optimizers read `momentum` as a Python constant when the train step is traced, so
  setting the attribute between steps (Horovod's way) would silently do nothing.
"""
import warnings

import keras
import numpy as np
import tensorflow as tf
import horovod.tensorflow as hvd

from hvdscale.errors import ConfigError
from hvdscale.tensorflow.keras.optimizer import tf_variable


def _broadcast(variables, root_rank):
    variables = [tf_variable(v) for v in variables]
    if variables:
        hvd.broadcast_variables(variables, root_rank=root_rank)


class BroadcastGlobalVariablesCallback(keras.callbacks.Callback):
    """Broadcast the model's and the optimizer's variables from root_rank, once, before the
    first batch, so every worker starts from the same state (random init or a checkpoint)."""

    def __init__(self, root_rank, device="", local_variables=None):
        super().__init__()
        self.root_rank = root_rank
        self.device = device
        self.broadcast_done = False
        if local_variables is None:
            local_variables = []
        elif not isinstance(local_variables, (list, tuple)):
            local_variables = [local_variables]
        self._local_ids = {id(tf_variable(v)) for v in local_variables}

    def register_local_var(self, var):
        """This variable keeps each worker's own value."""
        self._local_ids.add(id(tf_variable(var)))

    def _broadcast_now(self):
        model_vars = [v for v in self.model.variables if id(tf_variable(v)) not in self._local_ids]
        with tf.device(self.device):
            _broadcast(model_vars, self.root_rank)
            optimizer = getattr(self.model, "optimizer", None)
            if optimizer is not None and optimizer.built:
                _broadcast(optimizer.variables, self.root_rank)
        self.broadcast_done = True

    def on_train_begin(self, logs=None):
        if self.broadcast_done or not self.model.built:
            return
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is not None and not optimizer.built:
            # Keras 3 (TF backend, no tf.distribute strategy) builds the optimizer when it
            # traces the first step; build it now, as Keras itself does under a strategy, so
            # the first step already starts from root_rank's state
            optimizer.build(self.model.trainable_variables)
        self._broadcast_now()

    def on_batch_end(self, batch, logs=None):
        if not self.broadcast_done:       # a model or optimizer built only by the first step
            self._broadcast_now()


class MetricAverageCallback(keras.callbacks.Callback):
    """Average every value in the epoch logs over all workers, in place, so later callbacks
    (ReduceLROnPlateau, ModelCheckpoint, History) see the same numbers on every worker.
    Put it before those callbacks."""

    def __init__(self, device=""):
        super().__init__()
        self.device = device

    def _average_metrics_in_place(self, logs):
        if not logs:
            return
        reduced = {}
        with tf.device(self.device):
            for metric, value in sorted(logs.items()):   # same order on every worker
                reduced[metric] = hvd.allreduce(
                    tf.constant(value, dtype=tf.float64 if isinstance(value, float) else None),
                    op=hvd.Average, name=f"MetricAverageCallback.{metric}").numpy()
        for metric, value in reduced.items():
            logs[metric] = value.item() if np.ndim(value) == 0 else value

    def on_epoch_end(self, epoch, logs=None):
        self._average_metrics_in_place(logs)


def _momentum_buffers(optimizer):
    for attr in ("momentums", "_momentums"):
        buffers = getattr(optimizer, attr, None)
        if buffers:
            return list(buffers)
    return []


class LearningRateScheduleCallback(keras.callbacks.Callback):
    """Set the learning rate to initial_lr * multiplier(epoch) between start_epoch and
    end_epoch (exclusive). multiplier: a constant c (then c ** (epoch - start_epoch)) or a
    function of the epoch. staircase=True: at the first batch of each epoch, integer epoch;
    False: before every batch, epoch = epoch + batch / steps_per_epoch."""

    def __init__(self, initial_lr, multiplier, start_epoch=0, end_epoch=None, staircase=True,
                 momentum_correction=True, steps_per_epoch=None):
        super().__init__()
        if initial_lr is None:
            raise ValueError("Parameter `initial_lr` is required")
        self.start_epoch = start_epoch
        self.end_epoch = end_epoch
        self.staircase = staircase
        self.momentum_correction = momentum_correction
        self.initial_lr = initial_lr
        self.steps_per_epoch = steps_per_epoch
        self.current_epoch = None
        if not callable(multiplier):
            self.multiplier = lambda epoch: multiplier ** (epoch - start_epoch)
        else:
            self.multiplier = multiplier

    def _autodetect_steps_per_epoch(self):
        if self.params.get("steps"):
            return self.params["steps"]
        if self.params.get("samples") and self.params.get("batch_size"):
            return self.params["samples"] // self.params["batch_size"]
        raise ValueError("Could not autodetect the number of steps per epoch. Please specify "
                         f"the steps_per_epoch parameter to the {type(self).__name__}().")

    def _adjust_learning_rate(self, epoch):
        optimizer = self.model.optimizer
        old_lr = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
        new_lr = self.initial_lr * self.multiplier(epoch)
        optimizer.learning_rate = new_lr
        momentum = getattr(optimizer, "momentum", None)
        # before the first update (optimizer not built yet) the buffers are zero: nothing to do
        if self.momentum_correction and isinstance(momentum, (int, float)) and momentum \
                and optimizer.built and old_lr > 0 and new_lr != old_lr:
            buffers = _momentum_buffers(optimizer)
            if not buffers:
                warnings.warn(f"{type(optimizer).__name__}: no momentum buffers found, "
                              "momentum correction skipped", stacklevel=2)
            factor = new_lr / old_lr
            for buf in buffers:
                buf.assign(buf * factor)

    def on_train_begin(self, logs=None):
        if not self.staircase and not self.steps_per_epoch:
            self.steps_per_epoch = self._autodetect_steps_per_epoch()

    def on_epoch_begin(self, epoch, logs=None):
        self.current_epoch = epoch

    def on_batch_begin(self, batch, logs=None):
        if (self.current_epoch < self.start_epoch
                or (self.end_epoch is not None and self.current_epoch >= self.end_epoch)):
            return
        if self.staircase and batch == 0:
            self._adjust_learning_rate(self.current_epoch)
        elif not self.staircase:
            self._adjust_learning_rate(self.current_epoch + float(batch) / self.steps_per_epoch)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["lr"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))


class LearningRateWarmupCallback(LearningRateScheduleCallback):
    """Gradual warm-up (Goyal et al. 2017) from initial_lr / size to initial_lr over
    warmup_epochs, adjusted before every batch:
        lr = initial_lr / size * (epoch' * (size - 1) / warmup_epochs + 1),
        epoch' = epoch + (batch + 1) / steps_per_epoch
    """

    def __init__(self, initial_lr, warmup_epochs=5, momentum_correction=True,
                 steps_per_epoch=None, verbose=0):
        def multiplier(epoch):
            epoch += 1.0 / self.steps_per_epoch   # round numbers at the end of each epoch
            return 1.0 / hvd.size() * (epoch * (hvd.size() - 1) / warmup_epochs + 1)

        super().__init__(initial_lr, multiplier, start_epoch=0, end_epoch=warmup_epochs,
                         staircase=False, momentum_correction=momentum_correction,
                         steps_per_epoch=steps_per_epoch)
        self.verbose = verbose

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        if epoch == self.end_epoch - 1 and self.verbose > 0 and hvd.rank() == 0:
            new_lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
            print(f"\nEpoch {epoch + 1}: finished gradual learning rate warmup to {new_lr:g}.")


class CoreScheduleCallback(keras.callbacks.Callback):
    """The learning rate of every update from a hvdscale.core schedule (a callable
    step -> lr, e.g. hvdscale.core.build_lr_schedule(...)): before each batch,
    lr = float32(schedule(optimizer.iterations)), the value `hvdscale train` uses at that step.

    `CoreScheduleCallback.for_horovod(...)` builds the schedule the way the engine does: the
    peak LR scaled from base_lr at reference_batch to the global batch
    (size x batch_size x backward_passes_per_step) by hvdscale.core.scale_lr, then warm-up and
    decay from hvdscale.core.schedules."""

    def __init__(self, schedule, verbose=0):
        super().__init__()
        if not callable(schedule):
            raise ConfigError("CoreScheduleCallback needs a callable step -> learning rate")
        self.schedule = schedule
        self.verbose = verbose

    @classmethod
    def for_horovod(cls, base_lr, reference_batch, batch_size, steps_per_epoch, epochs,
                    scaling="linear", backward_passes_per_step=1, workers=None, **lr_settings):
        """lr_settings: the recipe's `lr` keys (warmup, warmup_epochs, warmup_steps, decay,
        milestones, gamma, power, end_lr, decay_rate, decay_epochs)."""
        from hvdscale.core.scaling import global_batch, scale_lr
        from hvdscale.core.schedules import LRScheduleSpec, build_lr_schedule
        workers = hvd.size() if workers is None else workers
        batch = global_batch(workers, batch_size, backward_passes_per_step)
        peak = scale_lr(base_lr, reference_batch, batch, rule=scaling)
        total = max(1, int(round(epochs * steps_per_epoch)))
        schedule = build_lr_schedule(LRScheduleSpec(**lr_settings), base_lr, peak,
                                     steps_per_epoch, total)
        return cls(schedule)

    def on_batch_begin(self, batch, logs=None):
        optimizer = self.model.optimizer
        step = int(keras.ops.convert_to_numpy(optimizer.iterations))
        optimizer.learning_rate = float(np.float32(self.schedule(step)))

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["lr"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))


class NoiseScaleCallback(keras.callbacks.Callback):
    """Online gradient noise scale (McCandlish et al. 2018) during model.fit, from the
    DistributedOptimizer's gradients: every `every` updates, this worker's gradient (a batch
    of batch_size) is the small one, the allreduced gradient (size x batch_size) the big one
    (hvdscale.study.gns; one extra scalar allreduce on due steps). Adds b_simple, gns_g2,
    gns_trace, gns_samples to the epoch logs (the same on every worker).

    Needs hvd.DistributedOptimizer with backward_passes_per_step=1, and two or more workers.
    """

    def __init__(self, batch_size, every=10, ema=0.9):
        super().__init__()
        from hvdscale.study.gns import OnlineNoiseScale
        if hvd.size() < 2:
            raise ConfigError("NoiseScaleCallback needs two or more workers (the local and the "
                              "averaged gradient are its two batch sizes)")
        self.online = OnlineNoiseScale(
            every, ema, batch_size, 1, hvd.size(),
            average_across_workers=lambda v: float(hvd.allreduce(
                tf.constant(float(v), tf.float64), op=hvd.Average,
                name="NoiseScaleCallback.small_sq").numpy()))
        self.probe = None

    def on_train_begin(self, logs=None):
        from hvdscale.tensorflow.keras.optimizer import DistributedMixin
        optimizer = self.model.optimizer
        if not isinstance(optimizer, DistributedMixin) or optimizer._agg_helper is not None:
            raise ConfigError("NoiseScaleCallback needs the model compiled with "
                              "hvd.DistributedOptimizer(..., backward_passes_per_step=1)")
        if optimizer._hvd_norm_probe is None:
            self.probe = optimizer.hvd_attach_norm_probe()
            self.model.make_train_function(force=True)   # retrace with the probe in the step
        self.probe = optimizer._hvd_norm_probe

    def on_batch_begin(self, batch, logs=None):
        self.online.begin_step(1)

    def on_batch_end(self, batch, logs=None):
        if self.online.due_now:
            local, total = (float(v.numpy()) for v in self.probe)
            self.online.record([local], total)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and self.online.last is not None:
            logs.update({k: v for k, v in self.online.last.items() if v is not None})


__all__ = ["BroadcastGlobalVariablesCallback", "MetricAverageCallback",
           "LearningRateScheduleCallback", "LearningRateWarmupCallback",
           "CoreScheduleCallback", "NoiseScaleCallback"]
