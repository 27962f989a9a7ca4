"""TensorFlow (Keras 3) adapter for the engine (the Backend protocol in
hvdscale/engine/backend.py).

horovod.tensorflow.keras does not work with Keras 3, so the step is our own tf.function:
a GradientTape wrapped in Horovod's DistributedGradientTape. With batch.accumulation > 1 the
local gradients of the micro-batches are summed into accumulators and allreduced once per
step (DistributedGradientTape has no backward_passes_per_step).

Precision: the Keras 3 mixed policy (mixed_bfloat16 / mixed_float16) computes layers in 16
bits on fp32 variables; fp16 adds Keras's LossScaleOptimizer (the tape differentiates the
scaled loss, the optimizer unscales, checks and skips overflows itself). Nothing in a step is
read from the device: the loss sum, example count and non-finite count live in tf.Variables
that `read_stats()` fetches at the engine's log interval. `faults.nonfinite: skip` is decided
inside the step function (tf.cond on the averaged gradients), so it costs no host read either.
"""
import io
import itertools
import zipfile

import numpy as np
import tensorflow as tf

from hvdscale.comm import gradient_groups
from hvdscale.core.scaling import micro_batch_sizes
from hvdscale.core.step import (NonFiniteRule, average_running_statistics,
                                check_step_settings, step_stats, with_accumulation)
from hvdscale.errors import ConfigError
from hvdscale.tensorflow.optim import build_optimizer
from hvdscale.tensorflow.quiet import list_gpus


def configure_threads(threads):
    """Intra-op threads per worker; must run before TensorFlow executes its first op."""
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(min(2, threads))
    except RuntimeError:
        pass   # the runtime was already started (e.g. a second trainer in one process)


def softmax_cross_entropy(logits, labels, label_smoothing=0.0):
    """Mean cross-entropy from logits with integer labels; label smoothing as in PyTorch:
    (1 - eps) * NLL + eps * mean over classes of -log p. The NLL is TensorFlow's fused kernel
    (its gradient comes out of the forward pass) rather than a log-softmax and a gather."""
    nll = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    if label_smoothing:
        nll = ((1.0 - label_smoothing) * nll
               - label_smoothing * tf.reduce_mean(tf.nn.log_softmax(logits), axis=-1))
    return tf.reduce_mean(nll)


def broadcast_from_root(hvd, variables):
    """Give every rank rank 0's values (eagerly, one collective per variable)."""
    for i, var in enumerate(variables):
        var.assign(hvd.broadcast(tf.convert_to_tensor(var), root_rank=0,
                                 name=f"hvdscale.init.{i}"))


class TensorFlowTrainer:
    framework = "tensorflow"
    checkpoint_suffix = ".npz"
    elastic = False            # the engine sets it for --elastic, before build()

    def __init__(self, cfg, comm, threads, model_fn=None):
        """model_fn(cfg) -> keras.Model overrides the model zoo (tests use tiny models)."""
        self.cfg, self.comm = cfg, comm
        self.optimizer_name = cfg.optimizer.name
        configure_threads(threads)
        gpus = list_gpus()
        if gpus:
            gpu = gpus[comm.local_rank % len(gpus)]
            tf.config.set_visible_devices(gpu, "GPU")
            tf.config.experimental.set_memory_growth(gpu, True)
        self._gpu = bool(gpus)
        self._model_fn = model_fn
        self.model = self.optimizer = None
        self.precision = cfg.train.precision
        check_step_settings(cfg, comm, gpu=bool(gpus), compile_refusal=(
            "XLA (jit_compile) cannot compile the step around Horovod's allreduce and was not "
            "faster on CPU"))
        self.nonfinite = NonFiniteRule(cfg.faults.nonfinite, loss_scaled=self.precision == "fp16")

    @property
    def device_description(self):
        if self._gpu:
            details = tf.config.experimental.get_device_details(
                tf.config.get_visible_devices("GPU")[0])
            return details.get("device_name", "gpu")
        return "cpu"

    # ------------------------------------------------------------------ build
    def _build_model(self):
        c = self.cfg
        if self._model_fn is not None:
            return self._model_fn(c)
        from hvdscale.registry import build_model   # the zoo or model.name "pkg.mod:factory"
        return build_model(c)

    def build(self):
        import keras
        keras.utils.set_random_seed(self.cfg.train.seed)
        policy = {"fp32": "float32", "bf16": "mixed_bfloat16",
                  "fp16": "mixed_float16"}[self.precision]
        previous = keras.config.dtype_policy()
        keras.config.set_dtype_policy(policy)   # layers take it when they are created
        try:
            self.model = self._build_model()
        finally:
            keras.config.set_dtype_policy(previous)
        inner = build_optimizer(self.cfg.optimizer.name, self.cfg.optimizer.base_lr,
                                self.cfg.optimizer)
        self._fp16 = self.precision == "fp16"
        self.optimizer = keras.optimizers.LossScaleOptimizer(inner) if self._fp16 else inner
        self.variables = list(self.model.trainable_variables)
        # the tf.Variables under Keras 3's wrappers: DistributedGradientTape needs .ref()
        self._sources = [getattr(v, "value", v) for v in self.variables]
        self.optimizer.build(self.variables)
        hvd = self.comm.hvd
        if hvd is not None:
            # hvd.broadcast_variables wants tf.Variables; Keras 3 variables are wrappers.
            # Elastic: the State's sync does it. One worker: nothing to send (each eager
            # broadcast still waited a 50 ms cycle there: 1.2 s of start-up for the CNN).
            if self.comm.distributed and not getattr(self, "elastic", False):
                broadcast_from_root(hvd, list(self.model.variables)
                                    + list(self.optimizer.variables))
            self._compression = (hvd.Compression.fp16 if self.cfg.horovod.fp16_compression
                                 else hvd.Compression.none)
            self._op = hvd.Adasum if self.cfg.horovod.adasum else hvd.Average
        accum = self.cfg.batch.accumulation
        # online gradient noise scale (hvdscale/study/gns_tf.py); None when switched off
        self.noise_scale = None
        if self.cfg.noise_scale.every:
            from hvdscale.study.gns_tf import TFNoiseScale
            self.noise_scale = TFNoiseScale(self.cfg.noise_scale, self.cfg.batch, self.comm)
        if accum > 1 or self.noise_scale is not None:
            self._accumulators = [tf.Variable(tf.zeros_like(v), trainable=False)
                                  for v in self.variables]
            self._acc_loss = tf.Variable(0.0, dtype=tf.float64, trainable=False)
            self._acc_n = tf.Variable(0.0, dtype=tf.float64, trainable=False)
        # BatchNorm statistics to put back when `skip` drops a step
        self._stat_vars = [v for v in self.model.non_trainable_variables
                           if "float" in str(v.dtype)]
        self._stat_saved = [tf.Variable(tf.convert_to_tensor(v), trainable=False)
                            for v in self._stat_vars] if self.nonfinite.drops_updates else []
        self._make_stats()
        self._step = tf.function(self._single_step)
        self._snapshot = tf.function(self._snapshot_fn)
        self._accumulate = tf.function(self._accumulate_fn)
        self._apply = tf.function(self._apply_accumulated)
        # the same two steps, also returning squared gradient norms for the noise scale
        self._accumulate_probe = tf.function(lambda x, y, w: self._accumulate_fn(x, y, w, True))
        self._apply_probe = tf.function(lambda: self._apply_accumulated(True))
        self._eval_batch = tf.function(self._eval_batch_fn, reduce_retracing=True)

    def _make_stats(self):
        var = lambda value, dtype: tf.Variable(tf.constant(value, dtype), trainable=False)
        self._loss_sum, self._examples = var(0.0, tf.float64), var(0, tf.int64)
        self._bad_steps, self._first_bad = var(0, tf.int64), var(-1, tf.int64)
        self._step_index = var(0, tf.int64)
        self._steps = 0

    # ------------------------------------------------------------------ data
    def device_batches(self, batches):
        """This worker's batches as tensors on its device. NumPy batches go through tf.data
        on a GPU (read and copied to the GPU one batch ahead), on a CPU straight into
        tensors; TensorFlow
        tensors (DALI's TF dataset, the tf.data image loader) pass through as they are."""
        iterator = iter(batches)
        first = next(iterator, None)
        if first is None:
            return
        if not isinstance(first[0], np.ndarray):
            yield first
            yield from iterator
            return
        x0, y0 = first
        if x0.ndim == 4 and x0.shape[-1] != self.cfg.in_channels \
                and x0.shape[1] == self.cfg.in_channels:
            raise ValueError(f"TensorFlow trainer got an NCHW batch {x0.shape}: array sources "
                             f"must deliver NHWC")

        if not self._gpu:
            # the host is the device: tf.data's prefetch thread measured ~5 % slower per step
            # (scaling.py K=1) than converting each batch here
            for x, y in itertools.chain([first], iterator):
                yield tf.convert_to_tensor(x), tf.convert_to_tensor(y)
            return

        def generate():
            yield first
            yield from iterator

        spec = (tf.TensorSpec((None, *x0.shape[1:]), tf.as_dtype(x0.dtype)),
                tf.TensorSpec((None,), tf.as_dtype(y0.dtype)))
        dataset = tf.data.Dataset.from_generator(generate, output_signature=spec)
        yield from dataset.apply(tf.data.experimental.prefetch_to_device("/gpu:0", 1))

    @staticmethod
    def _as_tensors(batch):
        # labels are flattened inside the step functions: an eager reshape costs a dispatch
        x, y = batch
        return tf.convert_to_tensor(x), tf.convert_to_tensor(y)

    def poisoned(self, batch):
        x, y = self._as_tensors(batch)
        return tf.fill(tf.shape(x), tf.constant(float("nan"), x.dtype)), y

    # ------------------------------------------------------------------ steps
    def _loss(self, x, y):
        y = tf.reshape(y, [-1])
        logits = tf.cast(self.model(x, training=True), tf.float32)   # 16-bit under mixed
        return softmax_cross_entropy(logits, y, self.cfg.model.label_smoothing)

    def _scaled(self, loss):
        return self.optimizer.scale_loss(loss) if self._fp16 else loss

    def _grad_scale(self):
        return tf.cast(self.optimizer.dynamic_scale, tf.float32) if self._fp16 else 1.0

    def _snapshot_fn(self):
        for saved, var in zip(self._stat_saved, self._stat_vars):
            saved.assign(var)

    def _single_step(self, x, y, lr):
        # the learning rate goes in as an argument: an eager assign before each call cost
        # ~0.4 ms of a 30 ms CPU step (benchmarks/scaling.py, TensorFlow K=1)
        self.optimizer.learning_rate = lr
        if self._stat_saved:
            self._snapshot_fn()
        with tf.GradientTape() as tape:
            loss = self._loss(x, y)
            target = self._scaled(loss)
        if self.comm.hvd is not None:
            tape = self.comm.hvd.DistributedGradientTape(
                tape, compression=self._compression, op=self._op,
                groups=gradient_groups(self.cfg.horovod.groups, gpu=self._gpu) or None)
        grads = tape.gradient(target, self._sources)
        n = tf.cast(tf.shape(y)[0], tf.float64)
        self._update(grads, tf.cast(loss, tf.float64) * n, n)

    def _update(self, grads, loss_total, n):
        """The non-finite decision from the averaged gradients (the same on every rank),
        the update (dropped by `skip`), and the device-side statistics."""
        rule = self.nonfinite      # fp16: an overflow is LossScaleOptimizer's to skip
        loss_ok, grads_ok = tf.math.is_finite(loss_total), None
        if rule.check_gradients:
            grads_ok = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g))
                                      for g in grads if g is not None])

        def apply():
            self.optimizer.apply_gradients(zip(grads, self.variables))
            return tf.constant(True)

        def drop():
            for saved, var in zip(self._stat_saved, self._stat_vars):
                var.assign(saved)
            return tf.constant(False)

        if rule.drops_updates:
            tf.cond(grads_ok, apply, drop)
        else:
            apply()
        bad = rule.bad(loss_ok, grads_ok)
        self._loss_sum.assign_add(tf.where(loss_ok, loss_total, tf.zeros_like(loss_total)))
        self._examples.assign_add(tf.where(loss_ok, tf.cast(n, tf.int64), tf.constant(0, tf.int64)))
        self._bad_steps.assign_add(tf.cast(bad, tf.int64))
        self._first_bad.assign(tf.where(bad & (self._first_bad < 0), self._step_index,
                                        self._first_bad))
        self._step_index.assign_add(1)

    def _accumulate_fn(self, x, y, weight, probe=False):
        with tf.GradientTape() as tape:
            loss = self._loss(x, y)
            target = self._scaled(loss)
        grads = tape.gradient(target, self.variables)
        for acc, g in zip(self._accumulators, grads):
            acc.assign_add(g * weight)
        n = tf.cast(tf.shape(y)[0], tf.float64)
        self._acc_loss.assign_add(tf.cast(loss, tf.float64) * n)
        self._acc_n.assign_add(n)
        if probe:    # this worker's micro-batch gradient, before any allreduce
            from hvdscale.study.gns_tf import sq_norm
            return loss, sq_norm(grads, self._grad_scale())
        return loss

    def _apply_accumulated(self, probe=False):
        grads = [acc.read_value() for acc in self._accumulators]
        if self.comm.hvd is not None:
            grads = self.comm.hvd.grouped_allreduce(grads, op=self._op,
                                                    compression=self._compression)
        big = None
        if probe:    # the averaged gradient, before the optimizer sees it
            from hvdscale.study.gns_tf import sq_norm
            big = sq_norm(grads, self._grad_scale())
        self._update(grads, self._acc_loss.read_value(), self._acc_n.read_value())
        for acc in self._accumulators:
            acc.assign(tf.zeros_like(acc))
        self._acc_loss.assign(0.0)
        self._acc_n.assign(0.0)
        return big

    def train_step(self, batch, lr):
        x, y = self._as_tensors(batch)
        self._steps += 1
        accum = self.cfg.batch.accumulation
        noise = self.noise_scale
        pieces = noise.micro_batches(accum) if noise is not None else accum
        due = noise is not None and noise.due_now
        # a due noise step takes the accumulation path even with one piece (several workers,
        # no accumulation): only there is the local gradient seen before the allreduce
        if pieces == 1 and not due:
            self._step(x, y, tf.constant(lr, tf.float32))
            return
        self.optimizer.learning_rate = lr
        if self._stat_saved:
            self._snapshot()
        n = int(y.shape[0])
        sizes = micro_batch_sizes(n, pieces)
        local = []
        for xb, yb, size in zip(tf.split(x, sizes), tf.split(y, sizes), sizes):
            # each micro-batch's share of the step's mean gradient
            weight = tf.constant(size / n, tf.float32)
            if due:
                local.append(self._accumulate_probe(xb, yb, weight)[1])
            else:
                self._accumulate(xb, yb, weight)
        if due:      # the noise scale reads its norms on due steps only
            noise.record([float(v) for v in tf.stack(local).numpy()],
                         float(self._apply_probe()))
        else:
            self._apply()

    def read_stats(self):
        """The one host read of the step statistics since the last call; resets them."""
        values = tf.stack([self._loss_sum, tf.cast(self._examples, tf.float64),
                           tf.cast(self._bad_steps, tf.float64),
                           tf.cast(self._first_bad, tf.float64)]).numpy()
        steps = self._steps
        self._loss_sum.assign(0.0)
        for var in (self._examples, self._bad_steps, self._step_index):
            var.assign(0)
        self._first_bad.assign(-1)
        self._steps = 0
        return step_stats(*values, steps)

    def extra_metrics(self):
        """Fields for the metrics log beyond the engine's own (the noise scale's reading)."""
        return dict(self.noise_scale.last or {}) if self.noise_scale is not None else {}

    def _eval_batch_fn(self, x, y):
        logits = tf.cast(self.model(x, training=False), tf.float64)
        labels = tf.cast(y, tf.int64)
        logp = tf.nn.log_softmax(logits)
        loss_sum = -tf.reduce_sum(tf.gather(logp, labels, batch_dims=1))
        correct = tf.reduce_sum(tf.cast(tf.argmax(logits, axis=1) == labels, tf.int64))
        return correct, loss_sum

    def evaluate(self, batches):
        correct, loss_sum, count = 0, 0.0, 0
        for x, y in self.device_batches(batches):
            c, l = self._eval_batch(x, tf.reshape(y, [-1]))
            correct, loss_sum = correct + c, loss_sum + l      # tensors: no read yet
            count += int(y.shape[0])
        if count == 0:
            return 0, 0, 0.0
        return int(correct), count, float(loss_sum)     # one read per evaluation

    def sync_statistics(self):
        # Keras 3 variables report their dtype as a string ("float32")
        stats = [v for v in self.model.non_trainable_variables if "float" in str(v.dtype)]
        averaged = average_running_statistics(
            self.comm, lambda: [np.asarray(v.numpy()) for v in stats])
        for var, avg in zip(stats, averaged or ()):
            var.assign(avg)

    # ------------------------------------------------------------------ state
    def _state_variables(self):
        return {"model": list(self.model.weights), "optimizer": list(self.optimizer.variables)}

    def state_bytes(self):
        arrays = {}
        for group, variables in self._state_variables().items():
            arrays[f"{group}__names"] = np.array([v.path for v in variables], dtype=str)
            for i, v in enumerate(variables):
                arrays[f"{group}__{i:05d}"] = v.numpy()
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()

    def load_state_bytes(self, data):
        try:
            self._load_npz(data)
        except ConfigError:      # already says what does not fit (ConfigError is a ValueError)
            raise
        except (ValueError, OSError, KeyError, EOFError, zipfile.BadZipFile) as err:
            raise ConfigError(f"checkpoint is unreadable ({type(err).__name__}: {err})",
                              setting="checkpoint") from None

    def _load_npz(self, data):
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            for group, variables in self._state_variables().items():
                names = list(npz[f"{group}__names"])
                if len(names) != len(variables):
                    raise ConfigError(f"checkpoint has {len(names)} {group} variables, "
                                      f"this run {len(variables)}", setting="checkpoint")
                for i, v in enumerate(variables):
                    value = npz[f"{group}__{i:05d}"]
                    if tuple(value.shape) != tuple(v.shape):
                        raise ConfigError(f"checkpoint {group} variable {names[i]} has "
                                          f"shape {value.shape}, this run {tuple(v.shape)}",
                                          setting="checkpoint")
                    v.assign(value)

    def apply_optimizer_settings(self):
        """Keras keeps the hyper-parameters (beta_1, epsilon, weight decay, ...) as Python
        attributes that a checkpoint, which holds variables only, does not restore: build()
        set this recipe's, and they stay. Only the learning rate is a variable, and the
        engine sets it every step. Checked here so that a loader that did bring old values
        back would fail loudly instead of training with them."""
        c = self.cfg.optimizer
        inner = getattr(self.optimizer, "inner_optimizer", self.optimizer)
        fresh = build_optimizer(c.name, c.base_lr, c).get_config()
        mine = inner.get_config()
        stale = sorted(k for k, v in fresh.items()
                       if k not in ("learning_rate", "name") and mine.get(k) != v)
        if stale:
            raise ConfigError(f"optimizer settings {', '.join(stale)} differ from the recipe "
                              "after loading", setting="checkpoint")

    def parameters(self):
        return {v.path: v.numpy().copy() for v in self.model.trainable_variables}

    # ------------------------------------------------------------------ elastic (engine)
    def elastic_state(self, **fields):
        """A Horovod elastic State over the Keras 3 model and optimizer variables, carrying
        `fields` as synchronised attributes (hvdscale/engine/elastic.py): the drop-in's
        KerasState (hvdscale.tensorflow.keras.elastic), one implementation for both."""
        from hvdscale.tensorflow.keras.elastic import KerasState
        return KerasState(self.model, self.optimizer, **fields)

    def elastic_run(self, fn):
        """hvd.elastic.run for this trainer, with the drop-in's wider net for Horovod's
        TensorFlow errors (hvdscale.tensorflow.keras.elastic.run)."""
        from hvdscale.tensorflow.keras.elastic import run
        return run(fn)

    def set_accumulation(self, passes):
        """Micro-batches per optimizer step after the world changed (elastic.policy
        keep_global_batch); the accumulators are made on first need."""
        with_accumulation(self, passes)
        if passes > 1 and not hasattr(self, "_accumulators"):
            self._accumulators = [tf.Variable(tf.zeros_like(v), trainable=False)
                                  for v in self.variables]
            self._acc_loss = tf.Variable(0.0, dtype=tf.float64, trainable=False)
            self._acc_n = tf.Variable(0.0, dtype=tf.float64, trainable=False)
