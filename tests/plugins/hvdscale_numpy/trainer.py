"""NumpyTrainer: a backend (hvdscale/engine/backend.py) in plain NumPy, one process.

What every backend must do (`Backend`) is all here, for real: build (seeded), device_batches,
poisoned, train_step with micro-batch accumulation and the non-finite rule of
`faults.nonfinite`, read_stats, evaluate, sync_statistics (nothing to average: one rank).
Of the optional parts it adds `CheckpointSupport` (state_bytes/load_state_bytes as an .npz
without pickles, apply_optimizer_settings) and `AccumulationSupport` (set_accumulation); it
has no `ElasticSupport`, so the engine refuses --elastic with it. `parameters()` is for the
tests, not the engine.
"""
import io
from typing import Any, Dict, Iterable, Iterator, Tuple

import numpy as np

from hvdscale.core.scaling import micro_batch_sizes
from hvdscale.core.step import NonFiniteRule, step_stats
from hvdscale.engine.faults import poison_batch
from hvdscale.errors import ConfigError
from hvdscale_numpy.nn import cross_entropy


class NumpyTrainer:
    framework = "numpy"
    device_description = "cpu"

    def __init__(self, cfg: Any, comm: Any, threads: int, model_fn=None):
        """model_fn(cfg) -> model overrides the registry (as the other trainers allow);
        `threads` is NumPy's BLAS business (set by its environment), not changed here."""
        self.cfg, self.comm = cfg, comm
        self.optimizer_name = cfg.optimizer.name
        self.precision = cfg.train.precision
        self.nonfinite = NonFiniteRule(cfg.faults.nonfinite)     # the rule every backend keeps
        self.accumulation = cfg.batch.accumulation
        if self.precision != "fp32":
            raise ConfigError(f"train.precision {self.precision}: the numpy backend runs fp32 "
                              "only")
        if cfg.train.compile:
            raise ConfigError("train.compile: the numpy backend has nothing to compile")
        if comm.size != 1:
            raise ConfigError("framework numpy runs one process (it has no Horovod)")
        self._model_fn = model_fn
        self.model = self.optimizer = None
        self._new_stats()

    # ------------------------------------------------------------------ build
    def build(self) -> None:
        from hvdscale.registry import BACKENDS, OPTIMIZERS, build_model
        cfg = self.cfg
        self.model = self._model_fn(cfg) if self._model_fn is not None else build_model(cfg)
        opt = cfg.optimizer
        info = OPTIMIZERS.get(opt.name)
        options = BACKENDS.get(self.framework).native_kwargs(info.resolve_options(opt.option))
        self.optimizer = info.builder(self.framework)(
            list(self.model.params.items()), lr=opt.base_lr, exclude_1d=opt.exclude_1d,
            exclude=tuple(opt.exclude), **options)
        self._new_stats()

    # ------------------------------------------------------------------ data
    def device_batches(self, batches: Iterable[Tuple[Any, Any]]) -> Iterator[Tuple[Any, Any]]:
        """The host is the device: batches pass through (labels as int64 vectors)."""
        for x, y in batches:
            yield np.asarray(x, dtype=np.float32), np.asarray(y).reshape(-1).astype(np.int64)

    def poisoned(self, batch):
        x, y = batch
        return poison_batch(np.asarray(x)), y

    # ------------------------------------------------------------------ steps
    def _new_stats(self):
        self._loss_sum, self._examples, self._steps = 0.0, 0, 0
        self._bad_steps, self._first_bad = 0, None

    def train_step(self, batch, lr: float) -> None:
        x, y = next(self.device_batches([batch]))
        model, n = self.model, y.shape[0]
        smoothing = self.cfg.model.label_smoothing
        grads, step_loss, start = None, 0.0, 0
        for size in micro_batch_sizes(n, self.accumulation):
            xb, yb = x[start:start + size], y[start:start + size]
            start += size
            logits, cache = model.forward(xb)
            losses, dlogits = cross_entropy(logits, yb, smoothing)
            # each micro-batch adds its share of the step's mean gradient
            part = model.backward(cache, dlogits / n)
            grads = part if grads is None else {k: grads[k] + part[k] for k in grads}
            step_loss += float(losses.sum(dtype=np.float64))
        rule = self.nonfinite
        loss_ok = np.isfinite(step_loss)
        grads_ok = (np.bool_(all(np.isfinite(g).all() for g in grads.values()))
                    if rule.check_gradients else None)
        bad = bool(rule.bad(loss_ok, grads_ok))
        if not (rule.drops_updates and not grads_ok):     # skip: the update is dropped
            self.optimizer.step(model.params, grads, lr)
        if loss_ok:
            self._loss_sum += step_loss
            self._examples += n
        if bad:
            self._bad_steps += 1
            if self._first_bad is None:
                self._first_bad = self._steps
        self._steps += 1

    def read_stats(self) -> Dict[str, Any]:
        stats = step_stats(self._loss_sum, self._examples, self._bad_steps,
                           -1 if self._first_bad is None else self._first_bad, self._steps)
        self._new_stats()
        return stats

    def evaluate(self, batches) -> Tuple[int, int, float]:
        correct, count, loss_sum = 0, 0, 0.0
        for x, y in self.device_batches(batches):
            logits, _ = self.model.forward(x)
            losses, _ = cross_entropy(logits, y)
            loss_sum += float(losses.sum(dtype=np.float64))
            correct += int((logits.argmax(1) == y).sum())
            count += int(y.shape[0])
        return correct, count, loss_sum

    def sync_statistics(self) -> None:
        """No state drifts per rank: there is one rank and no BatchNorm."""

    # ------------------------------------------------------------------ AccumulationSupport
    def set_accumulation(self, passes: int) -> None:
        self.accumulation = passes

    # ------------------------------------------------------------------ CheckpointSupport
    checkpoint_suffix = ".npz"

    def state_bytes(self) -> bytes:
        arrays = {f"param/{k}": v for k, v in self.model.params.items()}
        arrays.update({f"momentum/{k}": v for k, v in self.optimizer.buffers.items()})
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()

    def load_state_bytes(self, data: bytes) -> None:
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except Exception as err:  # noqa: BLE001 - bad bytes raise many kinds in np.load
            raise ConfigError(f"checkpoint is not a readable .npz of arrays "
                              f"({type(err).__name__}: {err})", setting="checkpoint") from None
        targets = {f"param/{k}": v for k, v in self.model.params.items()}
        targets.update({f"momentum/{k}": v for k, v in self.optimizer.buffers.items()})
        if set(arrays) != set(targets):
            raise ConfigError(f"checkpoint holds {sorted(arrays)}, this model/optimizer "
                              f"{sorted(targets)}", setting="checkpoint")
        for key, target in targets.items():
            if arrays[key].shape != target.shape:
                raise ConfigError(f"checkpoint {key} has shape {arrays[key].shape}, this "
                                  f"model {target.shape}", setting="checkpoint")
        for key, target in targets.items():     # in place: the optimizer holds these arrays
            target[...] = arrays[key]

    def apply_optimizer_settings(self) -> None:
        """Nothing to do: the momentum and weight decay are attributes set from this run's
        recipe in build(), and a checkpoint holds arrays only (never hyper-parameters)."""

    # ------------------------------------------------------------------ for the tests
    def parameters(self) -> Dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self.model.params.items()}
