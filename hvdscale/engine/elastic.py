"""Elastic training (`hvdscale train --elastic`): a mode of the one Engine loop, both backends.

Horovod's elastic API does the membership work: `hvd.elastic.run` re-runs the training
function after a peer is lost (HorovodInternalError: the state is first restored to its last
commit) or after the host set changed (HostsUpdatedInterrupt at a commit), re-initialising
Horovod with the new world and broadcasting rank 0's state to everyone, newcomers included.

The engine talks to it through a small interface each backend implements (Backend protocol,
hvdscale/engine/backend.py):

    backend.elastic_state(**fields)  a horovod.common.elastic.State over the model and the
                                     optimizer (torch: hvd.elastic.TorchState; TensorFlow:
                                     an ObjectState over the Keras 3 variables) that also
                                     carries `fields` (here one dict: the loop position)
    backend.elastic_run(fn)          the framework's hvd.elastic.run(fn)
    backend.set_accumulation(n)      micro-batches per step after a world change

ElasticRun runs the Engine's step loop under that API: the backend's State carries model,
optimizer and the loop position (`Engine.state_dict()`); after a lost worker it is restored
to its last commit, after a host change it is synchronised from rank 0, and the loop goes on
in the new world. A commit every `elastic.commit_every` steps keeps that point in memory.

This module holds what is framework-neutral: ElasticRun, the batch policy when the world size
K changes (`elastic.policy`), and what --elastic accepts. The policies:
- `keep_global_batch` keeps G = K_ref * per_worker * accumulation by raising the per-rank
  gradient accumulation to G / (K * per_worker);
- `rescale_lr` keeps the per-worker batch and multiplies the LR by
  scale_lr(G_K) / scale_lr(G_ref) under `lr.scaling`.
The LR schedule and the length of the run belong to the reference world (the one the job
started with), as functions of the optimizer step, so they do not jump when K changes.
With batch.adaptive (keep_global_batch only) the batch callback then puts its decided global
batch back on top, at accumulation G / (K * per_worker) (hvdscale/engine/adaptive.py).
"""
import dataclasses

from hvdscale.core.scaling import scale_lr
from hvdscale.engine.backend import ElasticSupport
from hvdscale.engine.checkpoint import atomic_write
from hvdscale.engine.reporting import MetricsLog, NullLog
from hvdscale.errors import ConfigError
from hvdscale.registry import BACKENDS


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


def check_elastic(cfg, *, stop_after_steps=None, no_horovod=False):
    """What --elastic supports; one-line errors before Horovod starts. (--resume is fine:
    every rank reads the newest checkpoint, and rank 0's state is synchronised as usual.)"""
    if stop_after_steps is not None or no_horovod:
        raise ConfigError("--elastic runs under Horovod's elastic launcher: it does not "
                          "combine with --stop-after-steps or --no-horovod")
    if BACKENDS.get(cfg.framework).horovod is None:
        raise ConfigError(f"--elastic needs Horovod, which the {cfg.framework} backend does "
                          f"not use")
    if cfg.batch.adaptive.enabled and cfg.elastic.policy != "keep_global_batch":
        raise ConfigError(f"elastic.policy {cfg.elastic.policy} does not combine with "
                          f"batch.adaptive, which keeps its decided global batch when the "
                          f"world changes (use elastic.policy keep_global_batch)")
    if cfg.horovod.adasum:
        raise ConfigError("elastic training runs on Horovod's Gloo controller: horovod.adasum "
                          "(which needs MPI on CPUs) is not supported with --elastic")
    if cfg.horovod.groups and not BACKENDS.get(cfg.framework).elastic_groups:
        raise ConfigError(f"horovod.groups = {cfg.horovod.groups} is not supported with "
                          f"--elastic in {cfg.framework}: Horovod's grouped optimizer "
                          f"broadcasts the parameter order when it is built, which a worker "
                          f"joining a running job would wait on forever; use 0 or null")


class ElasticRun:
    """The elastic mode of one Engine (`engine.elastic`; None in other runs)."""

    def __init__(self, engine):
        if engine.sources is None:
            raise ValueError("an elastic Engine needs sources(cfg, rank, size)")
        if not isinstance(engine.backend, ElasticSupport):
            raise ConfigError(f"--elastic: the {engine.backend.framework} backend does not "
                              f"support elastic runs")
        engine.backend.elastic = True               # then build() runs no collective
        self.reference_workers = engine.comm.size   # the world the schedule is planned for
        self.lr_scale = 1.0                         # the policy's LR factor in this world
        self.resets, self.last_commit, self._world, self._state = 0, None, None, None

    def run(self, engine, steps):
        """steps() -> ending: the loop, run (again) by Horovod's elastic driver."""
        state = engine.backend.elastic_state(loop=self._committed(engine))
        state.register_reset_callbacks([lambda: self._after_reset(engine)])
        self._state = state

        def session(state):
            self._enter_world(engine, state.loop)
            return steps()
        return engine.backend.elastic_run(session)(state)

    def _enter_world(self, engine, loop):
        """(Re)start on the world Horovod has now: the loop position from the committed state
        (rank 0's), the batch policy for this size, this rank's data, and the LR plan of the
        reference world (scaled by the policy's factor)."""
        engine.comm.refresh()
        engine.load_state_dict(loop)
        cfg, b, k = engine.cfg, engine.cfg.batch, engine.comm.size
        accumulation, engine.global_batch, self.lr_scale = batch_plan(
            cfg.elastic.policy, self.reference_workers, k, b.per_worker, b.accumulation,
            b.reference, cfg.lr.scaling)
        engine.per_step = b.per_worker * accumulation
        engine.backend.set_accumulation(accumulation)
        sized = dataclasses.replace(cfg, batch=dataclasses.replace(b, accumulation=accumulation))
        engine.batches, engine.eval_source = engine.sources(sized, engine.comm.rank, k)
        reference_global = self.reference_workers * b.per_worker * b.accumulation
        engine._plan(reference_global, max(1, engine.batches.num_examples // reference_global))
        if self.lr_scale != 1.0:
            base, scale = engine.lr.schedule, self.lr_scale
            engine.lr = dataclasses.replace(engine.lr, schedule=lambda step: base(step) * scale)
        if engine.comm.is_root and isinstance(engine._log, NullLog):   # rank 0 was lost
            engine._log = MetricsLog(engine.out / "metrics.jsonl", append=True)
        engine.callbacks.load_state_dict(loop.get("callbacks", {}))   # the committed state
        engine.callbacks.world(engine)     # e.g. batch.adaptive puts back its decided batch
        accumulation = engine.per_step // b.per_worker
        if k != self._world:
            engine._log.write({"event": "workers", "step": engine.step, "workers": k,
                               "policy": cfg.elastic.policy, "global_batch": engine.global_batch,
                               "per_rank_batch": engine.per_step, "accumulation": accumulation,
                               "lr_scale": self.lr_scale, "resets": self.resets,
                               "last_commit": self.last_commit})
            engine.echo(f"elastic: step {engine.step}: {k} worker(s), {cfg.elastic.policy}: "
                        f"global batch {engine.global_batch} = {k} x {b.per_worker} x "
                        f"{accumulation}, lr x{self.lr_scale:.4g}")
            self._world = k

    @staticmethod
    def _committed(engine):
        """What a commit keeps: the loop position and the callbacks' state."""
        return dict(engine.state_dict(), callbacks=engine.callbacks.state_dict())

    def _after_reset(self, engine):
        """Horovod was re-initialised (a worker lost or hosts changed)."""
        self.resets += 1
        engine.comm.refresh()
        engine.preemption.watch.forget_pending()
        engine.stats.forget(engine.backend)     # statistics of steps that were rolled back

    def after_step(self, engine):
        """Every elastic.commit_every steps: keep model, optimizer and loop position in memory
        (the point a lost worker rolls back to); rank 0 writes the step to OUT/last_commit for
        operators; then Horovod raises HostsUpdatedInterrupt here if hosts were added or
        removed."""
        if engine.step % engine.cfg.elastic.commit_every:
            return
        engine.stats.collect(engine)     # never commit a step whose non-finite flag is unread
        self._state.loop = self._committed(engine)
        self._state.save()
        self.last_commit = engine.step
        if engine.comm.is_root:
            try:
                atomic_write(engine.out / "last_commit", f"{engine.step}\n".encode())
            except OSError:
                pass
        self._state.check_host_updates()

    def summary(self, cfg):
        return dict(elastic=True, policy=cfg.elastic.policy, resets=self.resets,
                    reference_workers=self.reference_workers)
