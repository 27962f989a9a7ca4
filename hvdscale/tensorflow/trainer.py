"""TensorFlow (Keras 3) adapter for the engine (the Backend protocol in
hvdscale/engine/backend.py).

horovod.tensorflow.keras does not work with Keras 3, so the step is our own tf.function:
a GradientTape wrapped in Horovod's DistributedGradientTape. With batch.accumulation > 1 the
local gradients of the micro-batches are summed into accumulators and allreduced once per
step (DistributedGradientTape has no backward_passes_per_step).
"""
import io
import zipfile

import numpy as np
import tensorflow as tf

from hvdscale.errors import ConfigError
from hvdscale.tensorflow.optim import build_optimizer


def configure_threads(threads):
    """Intra-op threads per worker; must run before TensorFlow executes its first op."""
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(min(2, threads))
    except RuntimeError:
        pass   # the runtime was already started (e.g. a second trainer in one process)


def softmax_cross_entropy(logits, labels, label_smoothing=0.0):
    """Mean cross-entropy from logits with integer labels; label smoothing as in PyTorch:
    (1 - eps) * NLL + eps * mean over classes of -log p."""
    logp = tf.nn.log_softmax(logits)
    nll = -tf.gather(logp, labels, batch_dims=1)
    if label_smoothing:
        nll = (1.0 - label_smoothing) * nll - label_smoothing * tf.reduce_mean(logp, axis=-1)
    return tf.reduce_mean(nll)


def broadcast_from_root(hvd, variables):
    """Give every rank rank 0's values (eagerly, one collective per variable)."""
    for i, var in enumerate(variables):
        var.assign(hvd.broadcast(tf.convert_to_tensor(var), root_rank=0,
                                 name=f"hvdscale.init.{i}"))


class TensorFlowTrainer:
    framework = "tensorflow"
    checkpoint_suffix = ".npz"

    def __init__(self, cfg, comm, threads, model_fn=None):
        """model_fn(cfg) -> keras.Model overrides the model zoo (tests use tiny models)."""
        self.cfg, self.comm = cfg, comm
        self.optimizer_name = cfg.optimizer.name
        configure_threads(threads)
        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            gpu = gpus[comm.local_rank % len(gpus)]
            tf.config.set_visible_devices(gpu, "GPU")
            tf.config.experimental.set_memory_growth(gpu, True)
        self._gpu = bool(gpus)
        self._model_fn = model_fn
        self.model = self.optimizer = None
        if cfg.horovod.adasum and comm.distributed and comm.controller != "mpi" and not gpus:
            raise ConfigError("horovod.adasum on CPU needs Horovod's MPI controller "
                              "(horovodrun --mpi or mpirun), this job runs on "
                              f"{comm.controller}")

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
        self.model = self._build_model()
        self.optimizer = build_optimizer(self.cfg.optimizer.name,
                                              self.cfg.optimizer.base_lr, self.cfg.optimizer)
        self.variables = list(self.model.trainable_variables)
        # the tf.Variables under Keras 3's wrappers: DistributedGradientTape needs .ref()
        self._sources = [getattr(v, "value", v) for v in self.variables]
        self.optimizer.build(self.variables)
        hvd = self.comm.hvd
        if hvd is not None:
            # hvd.broadcast_variables wants tf.Variables; Keras 3 variables are wrappers
            broadcast_from_root(hvd, list(self.model.variables) + list(self.optimizer.variables))
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
        self._step = tf.function(self._single_step)
        self._accumulate = tf.function(self._accumulate_fn)
        self._apply = tf.function(self._apply_accumulated)
        # the same two steps, also returning squared gradient norms for the noise scale
        self._accumulate_probe = tf.function(lambda x, y, w: self._accumulate_fn(x, y, w, True))
        self._apply_probe = tf.function(lambda: self._apply_accumulated(True))
        self._logits = tf.function(lambda x: self.model(x, training=False),
                                   reduce_retracing=True)

    # ------------------------------------------------------------------ steps
    def _loss(self, x, y):
        logits = self.model(x, training=True)
        return softmax_cross_entropy(logits, y, self.cfg.model.label_smoothing)

    def _single_step(self, x, y):
        with tf.GradientTape() as tape:
            loss = self._loss(x, y)
        if self.comm.hvd is not None:
            tape = self.comm.hvd.DistributedGradientTape(tape, compression=self._compression,
                                                         op=self._op)
        grads = tape.gradient(loss, self._sources)
        # after backward, before the update: hook point for gradient checks (fault policies)
        self.optimizer.apply_gradients(zip(grads, self.variables))
        return loss

    def _accumulate_fn(self, x, y, weight, probe=False):
        with tf.GradientTape() as tape:
            loss = self._loss(x, y)
        grads = tape.gradient(loss, self.variables)
        for acc, g in zip(self._accumulators, grads):
            acc.assign_add(g * weight)
        if probe:    # this worker's micro-batch gradient, before any allreduce
            from hvdscale.study.gns_tf import sq_norm
            return loss, sq_norm(grads)
        return loss

    def _apply_accumulated(self, probe=False):
        grads = [acc.read_value() for acc in self._accumulators]
        if self.comm.hvd is not None:
            grads = self.comm.hvd.grouped_allreduce(grads, op=self._op,
                                                    compression=self._compression)
        big = None
        if probe:    # the averaged gradient, before the optimizer sees it
            from hvdscale.study.gns_tf import sq_norm
            big = sq_norm(grads)
        # after backward, before the update: hook point for gradient checks (fault policies)
        self.optimizer.apply_gradients(zip(grads, self.variables))
        for acc in self._accumulators:
            acc.assign(tf.zeros_like(acc))
        return big

    def train_step(self, x, y, lr):
        self.optimizer.learning_rate = lr
        accum = self.cfg.batch.accumulation
        noise = self.noise_scale
        pieces = noise.micro_batches(accum) if noise is not None else accum
        due = noise is not None and noise.due_now
        if pieces == 1:
            return float(self._step(tf.constant(x), tf.constant(y)))
        total, local = 0.0, []
        for xb, yb in zip(np.array_split(x, pieces), np.array_split(y, pieces)):
            weight = len(yb) / len(y)   # each micro-batch's share of the step's mean gradient
            args = (tf.constant(xb), tf.constant(yb), tf.constant(weight, tf.float32))
            if due:
                loss, sq = self._accumulate_probe(*args)
                local.append(float(sq))
            else:
                loss = self._accumulate(*args)
            total += weight * float(loss)
        if due:
            noise.record(local, float(self._apply_probe()))
        else:
            self._apply()
        return total

    def extra_metrics(self):
        """Fields for the metrics log beyond the engine's own (the noise scale's reading)."""
        return dict(self.noise_scale.last or {}) if self.noise_scale is not None else {}

    def evaluate(self, batches):
        correct, count, loss_sum = 0, 0, 0.0
        for x, y in batches:
            logits = self._logits(tf.constant(x)).numpy().astype(np.float64)
            shifted = logits - logits.max(axis=1, keepdims=True)
            logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
            loss_sum += float(-logp[np.arange(len(y)), y].sum())
            correct += int((logits.argmax(axis=1) == y).sum())
            count += len(y)
        return correct, count, loss_sum

    def sync_statistics(self):
        if not self.comm.distributed:
            return
        # Keras 3 variables report their dtype as a string ("float32")
        stats = [v for v in self.model.non_trainable_variables if "float" in str(v.dtype)]
        values = [np.asarray(v.numpy()) for v in stats]
        for var, old, avg in zip(stats, values, self.comm.allreduce_many(values)):
            var.assign(avg.astype(old.dtype))

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
        except (ValueError, OSError, KeyError, EOFError, zipfile.BadZipFile) as err:
            raise ConfigError(f"--resume: checkpoint is unreadable ({type(err).__name__}: "
                              f"{err})") from None

    def _load_npz(self, data):
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            for group, variables in self._state_variables().items():
                names = list(npz[f"{group}__names"])
                if len(names) != len(variables):
                    raise ConfigError(f"--resume: checkpoint has {len(names)} {group} variables, "
                                      f"this run {len(variables)}")
                for i, v in enumerate(variables):
                    value = npz[f"{group}__{i:05d}"]
                    if tuple(value.shape) != tuple(v.shape):
                        raise ConfigError(f"--resume: checkpoint {group} variable {names[i]} has "
                                          f"shape {value.shape}, this run {tuple(v.shape)}")
                    v.assign(value)

    def parameters(self):
        return {v.path: v.numpy().copy() for v in self.model.trainable_variables}
