"""PyTorch adapter for the engine (the Backend protocol in hvdscale/engine/backend.py).

Horovod's DistributedOptimizer averages gradients (or combines them with Adasum), optionally
in fp16 on the wire, and with backward_passes_per_step = batch.accumulation it allreduces once
per optimizer step however many micro-batches feed it.
"""
import contextlib
import io

import numpy as np
import torch
import torch.nn.functional as F

from hvdscale.errors import ConfigError
from hvdscale.torch.optim import build_optimizer


class TorchTrainer:
    framework = "torch"
    checkpoint_suffix = ".pt"

    def __init__(self, cfg, comm, threads, model_fn=None):
        """model_fn(cfg) -> nn.Module overrides the model zoo (tests use tiny models)."""
        self.cfg, self.comm = cfg, comm
        self.optimizer_name = cfg.optimizer.name
        torch.set_num_threads(threads)
        self.device = torch.device("cpu")
        if torch.cuda.is_available():
            self.device = torch.device("cuda", comm.local_rank % torch.cuda.device_count())
            torch.cuda.set_device(self.device)
        self._model_fn = model_fn
        self.model = self.optimizer = None
        # set by the engine: (loss, grads_finite) -> apply the update?  A collective call
        # (hvdscale/engine/faults.py NonFiniteGuard)
        self.update_guard = None
        hv = cfg.horovod
        if hv.adasum and comm.distributed and comm.controller != "mpi" \
                and self.device.type == "cpu":
            raise ConfigError("horovod.adasum on CPU needs Horovod's MPI controller "
                              "(horovodrun --mpi or mpirun), this job runs on "
                              f"{comm.controller}")

    @property
    def device_description(self):
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return "cpu"

    # ------------------------------------------------------------------ build
    def _build_model(self):
        c = self.cfg
        if self._model_fn is not None:
            return self._model_fn(c)
        from hvdscale.registry import build_model   # the zoo or model.name "pkg.mod:factory"
        return build_model(c)

    def build(self):
        torch.manual_seed(self.cfg.train.seed)
        self.model = self._build_model().to(self.device)
        opt = build_optimizer(self.cfg.optimizer.name, self.model,
                                   self.cfg.optimizer.base_lr, self.cfg.optimizer)
        hvd = self.comm.hvd
        if hvd is not None:
            # Fresh optimizers are identical on every rank (same hyper-parameters, empty
            # state), so only the model is broadcast here; a resume ships rank 0's full state.
            hvd.broadcast_parameters(self.model.state_dict(), root_rank=0)
            opt = hvd.DistributedOptimizer(
                opt, named_parameters=self.model.named_parameters(),
                compression=hvd.Compression.fp16 if self.cfg.horovod.fp16_compression
                else hvd.Compression.none,
                backward_passes_per_step=self.cfg.batch.accumulation,
                op=hvd.Adasum if self.cfg.horovod.adasum else hvd.Average)
        self.optimizer = opt
        # online gradient noise scale (hvdscale/study/gns_torch.py); None when switched off
        self.noise_scale = None
        if self.cfg.noise_scale.every:
            from hvdscale.study.gns_torch import TorchNoiseScale
            self.noise_scale = TorchNoiseScale(self.cfg.noise_scale, self.cfg.batch, self.comm,
                                               self.model)

    # ------------------------------------------------------------------ steps
    def _tensor(self, x):
        # NHWC arrays from the data layer -> NCHW tensors for torch convolutions
        return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().to(self.device)

    def train_step(self, x, y, lr):
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        self.optimizer.zero_grad()
        # a vetoed step must leave BatchNorm's running statistics as they were, too
        saved = self._float_buffers(clone=True) if self.update_guard is not None else None
        accum = self.cfg.batch.accumulation
        noise = self.noise_scale
        pieces = noise.micro_batches(accum) if noise is not None else accum
        xs, ys = np.array_split(x, pieces), np.array_split(y, pieces)
        total = 0.0
        for xb, yb in zip(xs, ys):
            logits = self.model(self._tensor(xb))
            loss = F.cross_entropy(logits, torch.from_numpy(yb).to(self.device),
                                   label_smoothing=self.cfg.model.label_smoothing)
            # each micro-batch contributes its share of the step's mean gradient
            (loss * (len(yb) / len(y))).backward()
            total += loss.item() * len(yb) / len(y)
        # after backward, before the update: the engine's fault policy may veto the update
        synced = self._synchronize_for_guard()
        if self.update_guard is not None and not self.update_guard(total, self._grads_finite()):
            self.optimizer.zero_grad()       # the same on every rank: no update this step
            with torch.no_grad():
                for buf, old in zip(self._float_buffers(), saved):
                    buf.copy_(old)
            return total
        with self.optimizer.skip_synchronize() if synced else contextlib.nullcontext():
            if noise is not None:
                noise.step(self.optimizer, [len(yb) / len(y) for yb in ys], synchronized=synced)
            else:
                self.optimizer.step()
        return total

    def _synchronize_for_guard(self):
        """Average the gradients now (Horovod) so the guard judges what the update would use;
        Adasum combines inside step() and has no separate synchronize."""
        if self.update_guard is None or not hasattr(self.optimizer, "skip_synchronize") \
                or self.cfg.horovod.adasum:
            return False
        self.optimizer.synchronize()
        return True

    def _float_buffers(self, clone=False):
        bufs = [b for b in self.model.buffers() if b.is_floating_point()]
        return [b.detach().clone() for b in bufs] if clone else bufs

    @torch.no_grad()
    def _grads_finite(self):
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return True
        return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())

    def extra_metrics(self):
        """Fields for the metrics log beyond the engine's own (the noise scale's reading)."""
        return dict(self.noise_scale.last or {}) if self.noise_scale is not None else {}

    @torch.no_grad()
    def evaluate(self, batches):
        self.model.eval()
        correct, count, loss_sum = 0, 0, 0.0
        for x, y in batches:
            logits = self.model(self._tensor(x))
            target = torch.from_numpy(y).to(self.device)
            loss_sum += F.cross_entropy(logits, target, reduction="sum").item()
            correct += int((logits.argmax(1) == target).sum())
            count += len(y)
        return correct, count, loss_sum

    @torch.no_grad()
    def sync_statistics(self):
        if not self.comm.distributed:
            return
        bufs = [b for b in self.model.buffers() if b.is_floating_point()]
        averaged = self.comm.allreduce_many([b.detach().cpu().numpy() for b in bufs])
        for buf, avg in zip(bufs, averaged):
            buf.copy_(torch.from_numpy(avg).to(device=buf.device, dtype=buf.dtype))

    # ------------------------------------------------------------------ state
    def state_bytes(self):
        buf = io.BytesIO()
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "torch_rng": torch.get_rng_state()}, buf)
        return buf.getvalue()

    def load_state_bytes(self, data):
        try:   # weights_only: tensors and plain containers, never arbitrary objects
            state = torch.load(io.BytesIO(data), map_location=self.device, weights_only=True)
        except Exception as err:  # noqa: BLE001 - bad bytes raise many kinds in torch.load
            first = str(err).splitlines()[0] if str(err) else ""
            raise ConfigError(f"--resume: checkpoint is unreadable or holds more than plain "
                              f"tensors ({type(err).__name__}: {first})") from None
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, KeyError, ValueError) as err:
            raise ConfigError(f"--resume: checkpoint does not fit this model/optimizer "
                              f"({str(err).splitlines()[0]})") from None
        torch.set_rng_state(state["torch_rng"])

    def parameters(self):
        return {n: p.detach().cpu().numpy().copy() for n, p in self.model.named_parameters()}
