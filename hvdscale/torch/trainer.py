"""PyTorch adapter for the engine (the Backend protocol in hvdscale/engine/backend.py).

Horovod's DistributedOptimizer averages gradients (or combines them with Adasum), optionally
in fp16 on the wire, and with backward_passes_per_step = batch.accumulation it allreduces once
per optimizer step however many micro-batches feed it.

The step never reads a device value from the host (unless `faults.nonfinite: skip` asks for
one flag per step, or the noise-scale estimate is due): the loss sum, the example count and
the non-finite count are added up in device tensors that `read_stats()` fetches in one read
at the engine's log interval. The order of one step, as Horovod wants it with AMP:

    forward under autocast -> backward (of the scaled loss for fp16) -> optimizer.synchronize()
    (averaged gradients) -> GradScaler.unscale_ -> non-finite flag and noise-scale norms from
    the averaged, unscaled gradients -> `with optimizer.skip_synchronize(): step`
"""
import contextlib
import io

import numpy as np
import torch
# torch.optim.Optimizer() imports torch._dynamo the first time one is built (5-7 s on the busy
# 2-core host); importing it here, with the framework, keeps those seconds out of the engine's
# start, where the run is already waiting to act on a preemption signal at its first step
import torch._dynamo  # noqa: F401
import torch.nn.functional as F

from hvdscale.comm import gradient_groups
from hvdscale.core.scaling import micro_batch_sizes
from hvdscale.core.step import (NonFiniteRule, average_running_statistics,
                                check_step_settings, step_stats, with_accumulation)
from hvdscale.errors import ConfigError
from hvdscale.torch.optim import build_optimizer

AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class TorchTrainer:
    framework = "torch"
    checkpoint_suffix = ".pt"
    elastic = False            # the engine sets it for --elastic, before build()

    def __init__(self, cfg, comm, threads, model_fn=None):
        """model_fn(cfg) -> nn.Module overrides the model zoo (tests use tiny models)."""
        self.cfg, self.comm = cfg, comm
        self.optimizer_name = cfg.optimizer.name
        torch.set_num_threads(threads)
        self.device = torch.device("cpu")
        if torch.cuda.is_available():
            self.device = torch.device("cuda", comm.local_rank % torch.cuda.device_count())
            torch.cuda.set_device(self.device)
            # fixed input shapes: cuDNN times its convolution algorithms once and keeps the
            # fastest (plain PyTorch training loops set this too)
            torch.backends.cudnn.benchmark = True
        self._model_fn = model_fn
        self.model = self.optimizer = self.scaler = None
        self.precision = cfg.train.precision
        check_step_settings(cfg, comm, gpu=self.device.type == "cuda", compile_refusal=(
            "torch.compile is not offered: on the CPU it was measured on it took minutes to "
            "compile the demo CNN for ~12 % per step, slower end to end "
            "(benchmarks/RESULTS.md)"))
        self.nonfinite = NonFiniteRule(cfg.faults.nonfinite, loss_scaled=self.precision == "fp16")
        self.channels_last = False       # decided in build(): a convolutional model
        self._new_stats()

    @property
    def allreduce_groups(self):
        if getattr(self, "elastic", False):
            # Horovod's grouping broadcasts the parameter order when the optimizer is built:
            # a worker joining a running elastic job would wait there for ranks that built
            # theirs long ago (check_elastic refuses horovod.groups >= 1 with --elastic)
            return 0
        return gradient_groups(self.cfg.horovod.groups, gpu=self.device.type == "cuda")

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
        model = self._build_model().to(self.device)
        # NHWC activations suit cuDNN's tensor-core convolutions and oneDNN's on CPUs (30-35 %
        # less CPU per step for cnn/resnet8 here): the input decides the convolutions' memory
        # format. The parameters stay contiguous, because Horovod allreduces only contiguous
        # gradients (a channels_last model fails in hvd.allreduce)
        self.channels_last = any(isinstance(m, torch.nn.Conv2d) for m in model.modules())
        self.model = model
        opt = build_optimizer(self.cfg.optimizer.name, self.model,
                              self.cfg.optimizer.base_lr, self.cfg.optimizer)
        hvd = self.comm.hvd
        if hvd is not None:
            # Fresh optimizers are identical on every rank (same hyper-parameters, empty
            # state), so only the model is broadcast here; a resume ships rank 0's full state.
            if not getattr(self, "elastic", False):   # elastic: the State's sync does it
                hvd.broadcast_parameters(self.model.state_dict(), root_rank=0)
            opt = hvd.DistributedOptimizer(
                opt, named_parameters=self.model.named_parameters(),
                compression=hvd.Compression.fp16 if self.cfg.horovod.fp16_compression
                else hvd.Compression.none,
                backward_passes_per_step=self.cfg.batch.accumulation,
                op=hvd.Adasum if self.cfg.horovod.adasum else hvd.Average,
                groups=self.allreduce_groups or None)
        self.optimizer = opt
        # fp16 needs loss scaling; bf16 has fp32's exponent range and needs none
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        # Horovod's optimizer can average now and step later (skip_synchronize); Adasum
        # combines inside step() only
        self._separate_sync = hasattr(opt, "skip_synchronize") and not self.cfg.horovod.adasum
        # online gradient noise scale (hvdscale/study/gns_torch.py); None when switched off
        self.noise_scale = None
        if self.cfg.noise_scale.every:
            from hvdscale.study.gns_torch import TorchNoiseScale
            self.noise_scale = TorchNoiseScale(self.cfg.noise_scale, self.cfg.batch, self.comm,
                                               self.model)
        self._new_stats()

    # ------------------------------------------------------------------ data
    def _as_tensors(self, batch):
        """(images, labels) as CPU or device tensors, without copying NumPy data: an NHWC
        array becomes an NCHW view with channels_last strides; NCHW arrays are taken too."""
        x, y = batch
        if isinstance(x, np.ndarray):
            nhwc = x.ndim == 4 and x.shape[-1] == self.cfg.in_channels
            x = torch.from_numpy(x)
            if nhwc:
                x = x.permute(0, 3, 1, 2)
        if isinstance(y, np.ndarray):
            y = torch.from_numpy(y)
        return x, y.reshape(-1).long()

    def _on_device(self, x, y, non_blocking=False):
        x = x.to(self.device, non_blocking=non_blocking)
        y = y.to(self.device, non_blocking=non_blocking)
        if self.channels_last and x.dim() == 4 and x.stride(1) != 1:
            # NCHW memory (an NCHW array, DALI's CHW output): one copy into NHWC memory; with
            # one channel .contiguous() would keep NCHW strides, so copy explicitly
            x = torch.empty_like(x, memory_format=torch.channels_last).copy_(x)
        return x, y

    def device_batches(self, batches):
        """This worker's batches as tensors on its device. On CUDA, host batches are pinned
        and copied on a side stream one batch ahead (the copy of batch i+1 overlaps step i);
        batches that are already there (DALI's torch iterator) are used as they are."""
        if self.device.type != "cuda":
            for batch in batches:
                yield self._on_device(*self._as_tensors(batch))
            return
        stream = torch.cuda.Stream(self.device)

        def start_copy(batch):
            x, y = self._as_tensors(batch)
            if x.device == self.device and y.device == self.device:
                return self._on_device(x, y), None
            if x.device.type == "cpu":
                x, y = x.pin_memory(), y.pin_memory()
            with torch.cuda.stream(stream):
                x, y = self._on_device(x, y, non_blocking=True)
                done = torch.cuda.Event()
                done.record(stream)
            return (x, y), done

        pending = None
        for batch in batches:
            upcoming = start_copy(batch)
            if pending is not None:
                yield self._ready(*pending)
            pending = upcoming
        if pending is not None:
            yield self._ready(*pending)

    def _ready(self, tensors, done):
        if done is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(done)
            for t in tensors:      # memory made on the side stream, used on this one
                t.record_stream(current)
        return tensors

    def poisoned(self, batch):
        x, y = batch
        return torch.full_like(x, float("nan")), y

    # ------------------------------------------------------------------ steps
    def _new_stats(self):
        dev = getattr(self, "device", torch.device("cpu"))
        zero = lambda dtype: torch.zeros((), dtype=dtype, device=dev)
        self._loss_sum = zero(torch.float64)
        self._examples = zero(torch.int64)
        self._bad_steps = zero(torch.int64)
        self._first_bad = torch.full((), -1, dtype=torch.int64, device=dev)
        self._step_index = zero(torch.int64)      # steps since the last read, on the device
        self._steps = 0

    def _autocast(self):
        dtype = AMP_DTYPES[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def train_step(self, batch, lr):
        x, y = batch
        if not isinstance(x, torch.Tensor) or x.device != self.device:
            x, y = self._on_device(*self._as_tensors(batch))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        self.optimizer.zero_grad()
        skip = self.nonfinite.drops_updates
        # a dropped update must leave BatchNorm's running statistics as they were, too
        saved = self._float_buffers(clone=True) if skip else None
        noise, scaler = self.noise_scale, self.scaler
        pieces = noise.micro_batches(self.cfg.batch.accumulation) if noise is not None \
            else self.cfg.batch.accumulation
        n = y.shape[0]
        sizes = micro_batch_sizes(n, pieces)
        step_loss = None
        for xb, yb in zip(torch.split(x, sizes), torch.split(y, sizes)):
            with self._autocast():
                logits = self.model(xb)
            loss = F.cross_entropy(logits.float(), yb,
                                   label_smoothing=self.cfg.model.label_smoothing)
            # each micro-batch contributes its share of the step's mean gradient
            weighted = loss * (yb.shape[0] / n)
            (scaler.scale(weighted) if scaler is not None else weighted).backward()
            part = loss.detach().double() * yb.shape[0]
            step_loss = part if step_loss is None else step_loss + part
        if self._separate_sync:
            self.optimizer.synchronize()          # the averaged gradients, from here on
        if scaler is not None:
            scaler.unscale_(self.optimizer)       # the guard, the noise scale and LARS/LAMB
        grads_ok = self._grads_finite() if self.nonfinite.check_gradients else None
        if skip and not bool(grads_ok):           # the one host read `skip` costs per step
            self.optimizer.zero_grad()            # the same on every rank: no update
            with torch.no_grad():
                for buf, old in zip(self._float_buffers(), saved):
                    buf.copy_(old)
            if scaler is not None:
                scaler.update()
            self._count(step_loss, n, grads_ok)
            return
        sync = self.optimizer.skip_synchronize() if self._separate_sync \
            else contextlib.nullcontext()
        with sync:
            if noise is not None and noise.due:
                # the probe saw the local gradients of the (loss-scaled) micro-batch losses
                grad_scale = float(scaler.get_scale()) if scaler is not None else 1.0
                scales = [s / n * grad_scale for s in sizes]
                if self._separate_sync or not hasattr(self.optimizer, "synchronize"):
                    noise.measure(scales)
                    self._optimizer_step()
                else:                # Adasum: the combined gradient exists only in step()
                    noise.step(self.optimizer, scales)
            else:
                self._optimizer_step()
        self._count(step_loss, n, grads_ok)

    def _optimizer_step(self):
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    @torch.no_grad()
    def _count(self, step_loss, n, grads_ok):
        """Add this step to the device-side statistics (no host read)."""
        loss_ok = torch.isfinite(step_loss)
        self._loss_sum += torch.where(loss_ok, step_loss, torch.zeros_like(step_loss))
        self._examples += loss_ok.long() * n
        bad = self.nonfinite.bad(loss_ok, grads_ok)
        self._bad_steps += bad.long()
        self._first_bad.copy_(torch.where(bad & (self._first_bad < 0), self._step_index,
                                          self._first_bad))
        self._step_index += 1
        self._steps += 1

    def read_stats(self):
        """The one host read of the step statistics since the last call; resets them."""
        values = torch.stack([self._loss_sum, self._examples.double(),
                              self._bad_steps.double(), self._first_bad.double()]).tolist()
        steps = self._steps
        self._new_stats()
        return step_stats(*values, steps)

    def _float_buffers(self, clone=False):
        bufs = [b for b in self.model.buffers() if b.is_floating_point()]
        return [b.detach().clone() for b in bufs] if clone else bufs

    @torch.no_grad()
    def _grads_finite(self):
        """A device bool: every gradient finite (one norm per tensor, then one reduction).
        An overflow in fp16 is GradScaler's business (it skips that step), not a fault."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return torch.ones((), dtype=torch.bool, device=self.device)
        return torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum())

    def extra_metrics(self):
        """Fields for the metrics log beyond the engine's own (the noise scale's reading)."""
        return dict(self.noise_scale.last or {}) if self.noise_scale is not None else {}

    @torch.no_grad()
    def evaluate(self, batches):
        self.model.eval()
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        count = 0
        for x, y in self.device_batches(batches):
            with self._autocast():
                logits = self.model(x)
            logits = logits.float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
            correct += (logits.argmax(1) == y).sum()
            count += y.shape[0]
        return int(correct), count, float(loss_sum)     # one read per evaluation

    @torch.no_grad()
    def sync_statistics(self):
        bufs = self._float_buffers()
        averaged = average_running_statistics(
            self.comm, lambda: [b.detach().cpu().numpy() for b in bufs])
        for buf, avg in zip(bufs, averaged or ()):
            buf.copy_(torch.from_numpy(avg).to(device=buf.device, dtype=buf.dtype))

    # ------------------------------------------------------------------ state
    def state_bytes(self):
        buf = io.BytesIO()
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "torch_rng": torch.get_rng_state()}
        if self.scaler is not None:
            state["grad_scaler"] = self.scaler.state_dict()
        torch.save(state, buf)
        return buf.getvalue()

    def load_state_bytes(self, data):
        try:   # weights_only: tensors and plain containers, never arbitrary objects
            state = torch.load(io.BytesIO(data), map_location=self.device, weights_only=True)
        except Exception as err:  # noqa: BLE001 - bad bytes raise many kinds in torch.load
            first = str(err).splitlines()[0] if str(err) else ""
            raise ConfigError(f"checkpoint is unreadable or holds more than plain "
                              f"tensors ({type(err).__name__}: {first})",
                              setting="checkpoint") from None
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scaler is not None and "grad_scaler" in state:
                self.scaler.load_state_dict(state["grad_scaler"])
        except (RuntimeError, KeyError, ValueError) as err:
            raise ConfigError(f"checkpoint does not fit this model/optimizer "
                              f"({str(err).splitlines()[0]})", setting="checkpoint") from None
        torch.set_rng_state(state["torch_rng"].cpu())

    def apply_optimizer_settings(self):
        """torch's Optimizer.load_state_dict brings back the checkpoint's param-group
        hyper-parameters: set this recipe's again, taken from a fresh optimizer built the
        way build() does (no state, so cheap); the LR is set every step anyway."""
        c = self.cfg.optimizer
        fresh = build_optimizer(c.name, self.model, c.base_lr, c)
        groups = self.optimizer.param_groups
        if [len(g["params"]) for g in fresh.param_groups] != [len(g["params"]) for g in groups]:
            raise ConfigError("the checkpoint's optimizer parameter groups do not fit this "
                              "recipe's", setting="checkpoint")
        for group, new in zip(groups, fresh.param_groups):
            group.update({k: v for k, v in new.items() if k not in ("params", "lr")})

    def parameters(self):
        return {n: p.detach().cpu().numpy().copy() for n, p in self.model.named_parameters()}

    # ------------------------------------------------------------------ elastic (engine)
    def elastic_state(self, **fields):
        """Horovod's TorchState over the model and the (Distributed)optimizer, carrying
        `fields` as synchronised attributes (hvdscale/engine/elastic.py)."""
        # Order matters: on a newcomer (empty optimizer state) Horovod's
        # broadcast_optimizer_state first takes one zero-gradient step to create the state,
        # which moves weight-decayed parameters. TorchState(model=, optimizer=) syncs the
        # model first, so a newcomer would keep those moved weights; synced in this order,
        # the model broadcast comes last and every rank holds rank 0's parameters.
        return self.comm.hvd.elastic.TorchState(synced_optimizer=self.optimizer,
                                                synced_model=self.model, **fields)

    def elastic_run(self, fn):
        return self.comm.hvd.elastic.run(fn)

    def set_accumulation(self, passes):
        """Micro-batches per optimizer step after the world changed (elastic.policy
        keep_global_batch): the step splits the batch, Horovod allreduces after `passes`."""
        with_accumulation(self, passes)
        if hasattr(self.optimizer, "set_backward_passes_per_step"):
            self.optimizer.set_backward_passes_per_step(passes)
