"""hvdscale.tensorflow.keras: a drop-in for `horovod.tensorflow.keras` under Keras 3.

    import hvdscale.tensorflow.keras as hvd      # was: import horovod.tensorflow.keras as hvd

The names and arguments are Horovod's (init, size, rank, DistributedOptimizer, callbacks,
load_model, elastic, ...). It is a layer of its own over `horovod.tensorflow`, whose collectives
work on Keras 3; Horovod's Keras layer itself is not used (docs/horovod-migration.md says why
and lists the differences). Extras no Horovod version has: hvdscale's LARS/LAMB as the wrapped
optimizer (`hvd.LARS`, `hvd.LAMB`), `callbacks.CoreScheduleCallback` (hvdscale.core warm-up and
decay, the engine's numbers) and `callbacks.NoiseScaleCallback` (online gradient noise scale).
"""
import keras
import tensorflow as tf

from horovod.tensorflow import (init, shutdown, is_initialized, start_timeline, stop_timeline,
                                size, local_size, cross_size, rank, local_rank, cross_rank,
                                mpi_threads_supported, mpi_enabled, mpi_built, gloo_enabled,
                                gloo_built, nccl_built, ddl_built, ccl_built, cuda_built,
                                rocm_built, Average, Sum, Adasum)
from horovod.tensorflow.mpi_ops import (ProcessSet, global_process_set, add_process_set,
                                        remove_process_set)
import horovod.tensorflow as _hvd
from horovod.tensorflow.compression import Compression

from hvdscale.tensorflow.keras import optimizer as _opt
from hvdscale.tensorflow.optim import LAMB, LARS


def DistributedOptimizer(optimizer, name=None, device_dense="", device_sparse="",
                         compression=Compression.none, sparse_as_dense=False,
                         gradient_predivide_factor=1.0, op=Average, backward_passes_per_step=1,
                         average_aggregated_gradients=False, num_groups=0, groups=None,
                         process_set=global_process_set, scale_local_gradients=True):
    """Wrap a Keras 3 optimizer so its gradients are averaged across workers before the
    update (in model.fit, train_on_batch, apply_gradients eagerly or in tf.function).

    Horovod's arguments and meanings; backward_passes_per_step > 1 sums that many local
    gradients (divided by their number if average_aggregated_gradients) and allreduces and
    applies once. Returns the optimizer it was given, now distributed (its class becomes a
    subclass of the original with the same name, so saved models load without hvdscale).
    """
    if gradient_predivide_factor != 1.0 and rocm_built():
        raise ValueError("gradient_predivide_factor not supported yet with ROCm")
    if op != Average and op != Sum:
        raise ValueError("op currently only supports Average and Sum")
    if num_groups != 0 and groups is None:
        groups = num_groups
    if groups is not None and not (isinstance(groups, list) or groups > 0):
        raise ValueError("groups should be a non-negative integer or a list of list of variables.")
    if int(backward_passes_per_step) < 1:
        raise ValueError(f"backward_passes_per_step must be >= 1, got {backward_passes_per_step}")
    settings = _opt.make_settings(
        name=name, device_dense=device_dense, device_sparse=device_sparse,
        compression=compression, sparse_as_dense=sparse_as_dense,
        gradient_predivide_factor=gradient_predivide_factor, op=op,
        backward_passes_per_step=backward_passes_per_step,
        average_aggregated_gradients=average_aggregated_gradients, groups=groups,
        process_set=process_set, scale_local_gradients=scale_local_gradients)
    return _opt.wrap(optimizer, settings)


def PartialDistributedOptimizer(optimizer, name=None, device_dense="", device_sparse="",
                                compression=Compression.none, sparse_as_dense=False,
                                gradient_predivide_factor=1.0, op=Average,
                                backward_passes_per_step=1, average_aggregated_gradients=False,
                                groups=None, process_set=global_process_set, local_layers=None,
                                scale_local_gradients=True):
    """DistributedOptimizer whose `local_layers` keep their gradients on each worker (not
    allreduced; divided by the worker count when scale_local_gradients), as horovod.keras's."""
    optimizer = DistributedOptimizer(
        optimizer, name=name, device_dense=device_dense, device_sparse=device_sparse,
        compression=compression, sparse_as_dense=sparse_as_dense,
        gradient_predivide_factor=gradient_predivide_factor, op=op,
        backward_passes_per_step=backward_passes_per_step,
        average_aggregated_gradients=average_aggregated_gradients, groups=groups,
        process_set=process_set, scale_local_gradients=scale_local_gradients)
    for layer in local_layers or ():
        for variable in layer.trainable_weights:
            optimizer.register_local_var(variable)
    return optimizer


def broadcast_variables(variables, root_rank, process_set=global_process_set, inplace=False):
    """Give every worker root_rank's values of these Keras (or TF) variables."""
    return _hvd.broadcast_variables([_opt.tf_variable(v) for v in variables], root_rank,
                                    process_set=process_set, inplace=inplace)


def broadcast_global_variables(root_rank):
    """Horovod's TF1-era call has no meaning under eager Keras 3: name the variables."""
    raise NotImplementedError("broadcast_global_variables needs TF1 global collections; use "
                              "broadcast_variables(model.variables, root_rank) or "
                              "callbacks.BroadcastGlobalVariablesCallback")


def allreduce(value, name=None, average=None, prescale_factor=1.0, postscale_factor=1.0,
              op=None, compression=Compression.none):
    """Reduce a tensor-compatible value over all workers (Average unless op says otherwise)."""
    return _hvd.allreduce(tf.constant(value, name=name), average=average,
                          prescale_factor=prescale_factor, postscale_factor=postscale_factor,
                          op=op, compression=compression, name=name)


def allgather(value, name=None):
    """Concatenate a tensor-compatible value from all workers along the first dimension."""
    return _hvd.allgather(tf.constant(value, name=name), name=name)


def broadcast(value, root_rank, name=None):
    """root_rank's value of a tensor-compatible value, on every worker."""
    return _hvd.broadcast(tf.constant(value, name=name), root_rank, name=name)


def reducescatter(value, name=None, op=Average):
    return _hvd.reducescatter(tf.constant(value, name=name), op=op, name=name)


def load_model(filepath, custom_optimizers=None, custom_objects=None,
               compression=Compression.none, legacy_opts=False):
    """Load a saved Keras model (`.keras`) with its optimizer wrapped in DistributedOptimizer
    and its optimizer state restored.

    custom_optimizers: optimizer classes the file may name besides Keras's own (hvdscale's
    LARS/LAMB are known already); custom_objects: as in keras.models.load_model.
    """
    if legacy_opts:
        raise ValueError("legacy_opts: Keras 3 has no legacy optimizers (tf_keras has)")
    objects = {"LARS": LARS, "LAMB": LAMB}
    for cls in custom_optimizers or ():
        objects[cls.__name__] = cls
    objects.update(custom_objects or {})
    model = keras.models.load_model(filepath, custom_objects=objects)
    if getattr(model, "optimizer", None) is not None \
            and not isinstance(model.optimizer, _opt.DistributedMixin):
        DistributedOptimizer(model.optimizer, compression=compression)
    return model


from hvdscale.tensorflow.keras import callbacks, elastic  # noqa: E402  (need the names above)

__all__ = ["init", "shutdown", "is_initialized", "size", "rank", "local_rank", "local_size",
           "cross_size", "cross_rank", "mpi_enabled", "mpi_built", "gloo_enabled", "gloo_built",
           "Average", "Sum", "Adasum", "Compression", "ProcessSet", "global_process_set",
           "add_process_set", "remove_process_set", "DistributedOptimizer",
           "PartialDistributedOptimizer",
           "broadcast_variables", "allreduce", "allgather", "broadcast", "reducescatter",
           "load_model", "callbacks", "elastic", "LARS", "LAMB", "start_timeline",
           "stop_timeline", "mpi_threads_supported", "nccl_built", "ddl_built", "ccl_built",
           "cuda_built", "rocm_built", "broadcast_global_variables"]
