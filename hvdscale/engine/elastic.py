"""`hvdscale train --elastic` (PyTorch): training that survives workers leaving and joining.

Horovod's elastic API does the membership work: `hvd.elastic.run` re-runs the training
function after a peer is lost (HorovodInternalError: the state is first restored to its last
commit) or after the host set changed (HostsUpdatedInterrupt at a commit), re-initialising
Horovod with the new world and broadcasting rank 0's state to everyone, newcomers included.

This module adds what a training run needs on top:
- the state committed every `elastic.commit_every` steps: model, optimizer, step, examples
  seen, the reference world size and the skipped-step count (hvd.elastic.TorchState);
  rank 0 writes the newest committed step to OUT/last_commit;
- the batch policy when the world size K changes (`elastic.policy`, logged as an event):
  `keep_global_batch` keeps G = K_ref * per_worker * accumulation by raising the per-rank
  gradient accumulation to G / (K * per_worker); `rescale_lr` keeps the per-worker batch and
  multiplies the LR by scale_lr(G_K) / scale_lr(G_ref) under `lr.scaling`;
- gradients averaged with one grouped allreduce per step under fixed names (Horovod matches
  collectives by name, and a worker that joins late must use the same names as the others),
  which also makes NaN/inf agreed: an average containing a rank's NaN is NaN everywhere;
- a sharded evaluation and a summary at the end, events in OUT/metrics.jsonl.

The LR schedule is the recipe's, planned for the reference global batch, as a function of
the optimizer step, so it does not jump when K changes.
"""
import json
import math
import os
import time
from pathlib import Path

import numpy as np

from hvdscale.core.scaling import scale_lr
from hvdscale.errors import ConfigError, NonFiniteLossError


def batch_plan(policy, reference_workers, workers, per_worker, accumulation, reference_batch,
               scaling):
    """(accumulation, global batch, LR multiplier) for `workers` ranks under `policy`."""
    reference_global = reference_workers * per_worker * accumulation
    if policy == "keep_global_batch":
        if reference_global % (workers * per_worker):
            raise ConfigError(f"elastic.policy keep_global_batch: global batch "
                              f"{reference_global} cannot be split over {workers} workers of "
                              f"{per_worker} (use elastic.policy rescale_lr)")
        return reference_global // (workers * per_worker), reference_global, 1.0
    if policy == "rescale_lr":
        global_batch = workers * per_worker * accumulation
        multiplier = (scale_lr(1.0, reference_batch, global_batch, rule=scaling)
                      / scale_lr(1.0, reference_batch, reference_global, rule=scaling))
        return accumulation, global_batch, multiplier
    raise ConfigError(f"elastic.policy {policy!r} is not one of keep_global_batch, rescale_lr")


class ElasticTorchRun:
    """One worker's part of an elastic run. `run()` returns the summary (rank 0) or None."""

    def __init__(self, cfg, out_dir, threads=None, echo=print):
        import torch
        import horovod.torch as hvd
        from hvdscale.torch.models import build_model
        from hvdscale.torch.optim import build_optimizer
        self.torch, self.hvd, self.cfg = torch, hvd, cfg
        self.out = Path(out_dir)
        self._echo = echo
        hvd.init()
        torch.set_num_threads(threads or max(1, len(os.sched_getaffinity(0)) // hvd.local_size()))
        torch.manual_seed(cfg.train.seed)
        c = cfg
        self.model = build_model(c.model.name, c.data.num_classes, c.in_channels,
                                 c.data.image_size, zero_init_residual=c.model.zero_init_residual)
        # a plain optimizer: gradients are averaged here, once per step, by name
        self.optimizer = build_optimizer(c.optimizer.name, self.model, c.optimizer.base_lr,
                                         c.optimizer)
        self.state = hvd.elastic.TorchState(
            model=self.model, optimizer=self.optimizer, step=0, examples=0,
            reference_workers=hvd.size(), skipped=0)
        self.state.register_reset_callbacks([self._on_reset])
        self.last_commit = 0          # this process's view, to report what a restore kept
        self.resets = 0               # this process's count (state attributes are re-synced)
        self._workers = None

    # ------------------------------------------------------------------ helpers
    def echo(self, text):
        if self.hvd.rank() == 0:
            self._echo(text, flush=True)

    def log(self, record):
        if self.hvd.rank() == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.out / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(record) + "\n")

    def _on_reset(self):
        self.resets += 1

    def commit(self):
        # State.commit() is save() then check_host_updates(); split, so that last_commit is
        # right even when the host check interrupts (hvd.elastic.run then resets)
        self.state.save()
        self.last_commit = self.state.step
        if self.hvd.rank() == 0:      # progress for operators (and tests): OUT/last_commit
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "last_commit").write_text(f"{self.last_commit}\n")
        self.state.check_host_updates()

    # ------------------------------------------------------------------ the run
    def run(self):
        @self.hvd.elastic.run
        def train(state):
            return self._train(state)
        return train(self.state)

    def _train(self, state):
        from hvdscale.data import build_sources
        from hvdscale.engine.lr import plan_lr
        hvd, cfg, b = self.hvd, self.cfg, self.cfg.batch
        rank, workers = hvd.rank(), hvd.size()
        accumulation, global_batch, lr_scale = batch_plan(
            cfg.elastic.policy, state.reference_workers, workers, b.per_worker,
            b.accumulation, b.reference, cfg.lr.scaling)
        self._accumulation = accumulation
        per_rank = b.per_worker * accumulation
        sized = _with_accumulation(cfg, accumulation)
        train_source, eval_source = build_sources(sized, rank, workers)

        # the schedule and the length of the run belong to the reference world
        ref_global = state.reference_workers * b.per_worker * b.accumulation
        ref_steps_per_epoch = train_source.num_examples // ref_global
        total = int(round(cfg.train.epochs * ref_steps_per_epoch))
        if cfg.train.max_steps is not None:
            total = min(total, cfg.train.max_steps)
        total = max(1, total)
        lr = plan_lr(cfg, ref_global, ref_steps_per_epoch, total)

        if workers != self._workers:
            event = {"event": "workers", "step": state.step, "workers": workers,
                     "policy": cfg.elastic.policy, "global_batch": global_batch,
                     "per_rank_batch": per_rank, "accumulation": accumulation,
                     "lr_scale": lr_scale, "resets": self.resets,
                     "last_commit": self.last_commit}
            self.log(event)
            self.echo(f"elastic: step {state.step}: {workers} worker(s), "
                      f"{cfg.elastic.policy}: global batch {global_batch} = {workers} x "
                      f"{b.per_worker} x {accumulation}, lr x{lr_scale:.4g}")
            self._workers = workers

        steps_per_epoch = train_source.steps_per_epoch
        t0 = time.perf_counter()
        while state.step < total:
            epoch, within = divmod(state.examples, steps_per_epoch * global_batch)
            for x, y in train_source.epoch(epoch, within // global_batch):
                self._step(x, y, lr.schedule(state.step) * lr_scale, state)
                state.step += 1
                state.examples += global_batch
                if state.step % cfg.elastic.commit_every == 0 or state.step >= total:
                    self.commit()
                if state.step >= total:
                    break
        return self._finish(state, eval_source, global_batch, time.perf_counter() - t0)

    def _step(self, x, y, lr, state):
        torch, hvd = self.torch, self.hvd
        import torch.nn.functional as F
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        self.optimizer.zero_grad()
        buffers = [b for b in self.model.buffers() if b.is_floating_point()]
        saved = [b.detach().clone() for b in buffers]
        total = 0.0
        xs, ys = np.array_split(x, self._accumulation), np.array_split(y, self._accumulation)
        for xb, yb in zip(xs, ys):
            logits = self.model(torch.from_numpy(xb).permute(0, 3, 1, 2).contiguous())
            loss = F.cross_entropy(logits, torch.from_numpy(yb),
                                   label_smoothing=self.cfg.model.label_smoothing)
            (loss * (len(yb) / len(y))).backward()
            total += loss.item() * len(yb) / len(y)
        params = [p for p in self.model.parameters() if p.grad is not None]
        averaged = hvd.grouped_allreduce([p.grad for p in params], op=hvd.Average,
                                         name="hvdscale.elastic.grads")
        mean_loss = float(hvd.allreduce(torch.tensor([total], dtype=torch.float64),
                                        op=hvd.Average, name="hvdscale.elastic.loss")[0])
        finite = math.isfinite(mean_loss) and all(bool(torch.isfinite(g).all()) for g in averaged)
        if not finite:        # every rank sees the same averages, so all decide alike
            if self.cfg.faults.nonfinite == "abort":
                raise NonFiniteLossError(f"non-finite loss or gradient at step {state.step} "
                                         f"(faults.nonfinite = abort)")
            with torch.no_grad():
                for buf, old in zip(buffers, saved):
                    buf.copy_(old)
            state.skipped += 1
            self.echo(f"step {state.step}: non-finite loss or gradient, update skipped on "
                      f"every rank ({state.skipped} skipped so far)")
            return
        for p, g in zip(params, averaged):
            p.grad.copy_(g)
        self.optimizer.step()

    def _finish(self, state, eval_source, global_batch, seconds):
        torch, hvd = self.torch, self.hvd
        # one model for evaluation: rank 0's BatchNorm statistics (as the last sync would)
        hvd.broadcast_parameters(self.model.state_dict(), root_rank=0)
        self.model.eval()
        correct = count = 0
        with torch.no_grad():
            for x, y in eval_source.batches():
                logits = self.model(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous())
                correct += int((logits.argmax(1) == torch.from_numpy(y)).sum())
                count += len(y)
        totals = hvd.allreduce(torch.tensor([correct, count], dtype=torch.int64), op=hvd.Sum,
                               name="hvdscale.elastic.eval")
        accuracy = int(totals[0]) / max(1, int(totals[1]))
        summary = {"event": "summary", "elastic": True, "steps": state.step,
                   "workers": hvd.size(), "global_batch": global_batch,
                   "policy": self.cfg.elastic.policy, "resets": self.resets,
                   "skipped_steps": state.skipped, "final_test_accuracy": accuracy,
                   "test_examples": int(totals[1]), "optimizer": self.cfg.optimizer.name,
                   "session_train_s": seconds}
        self.log(summary)
        self.echo(f"elastic run done: {state.step} steps, {hvd.size()} worker(s) at the end, "
                  f"{self.resets} reset(s), test accuracy {accuracy:.4f}")
        return summary

    def parameters(self):
        return {n: p.detach().numpy().copy() for n, p in self.model.named_parameters()}


def _with_accumulation(cfg, accumulation):
    import dataclasses
    return dataclasses.replace(cfg, batch=dataclasses.replace(cfg.batch,
                                                              accumulation=accumulation))


def check_elastic(cfg, args):
    """What --elastic supports; one-line errors before Horovod starts."""
    if cfg.framework != "torch":
        raise ConfigError(f"--elastic is implemented for torch only, not {cfg.framework}")
    if args.resume or args.stop_after_steps is not None or args.no_horovod:
        raise ConfigError("--elastic keeps its state in memory (commits); it does not combine "
                          "with --resume, --stop-after-steps or --no-horovod")
    if cfg.horovod.adasum or cfg.horovod.fp16_compression:
        raise ConfigError("--elastic averages gradients itself: horovod.adasum and "
                          "horovod.fp16_compression are not supported with it")


def run_elastic(args):
    """`hvdscale train --elastic`: returns (exit code, the finished ElasticTorchRun)."""
    from hvdscale.config import load_config
    from hvdscale.data import check_data
    cfg = load_config(args.recipe, args.overrides)
    check_elastic(cfg, args)
    check_data(cfg.data)
    out = Path(args.out) if args.out else Path("runs") / f"{cfg.name}-torch-elastic"
    job = ElasticTorchRun(cfg, out, threads=cfg.train.threads)
    job.run()
    return 0, job
