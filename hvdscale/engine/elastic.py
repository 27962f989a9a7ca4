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

This module holds what is framework-neutral: the batch policy when the world size K changes
(`elastic.policy`), and what --elastic accepts. The policies:
- `keep_global_batch` keeps G = K_ref * per_worker * accumulation by raising the per-rank
  gradient accumulation to G / (K * per_worker);
- `rescale_lr` keeps the per-worker batch and multiplies the LR by
  scale_lr(G_K) / scale_lr(G_ref) under `lr.scaling`.
The LR schedule and the length of the run belong to the reference world (the one the job
started with), as functions of the optimizer step, so they do not jump when K changes.
With batch.adaptive (keep_global_batch only) the batch callback then puts its decided global
batch back on top, at accumulation G / (K * per_worker) (hvdscale/engine/adaptive.py).
"""
from hvdscale.core.scaling import scale_lr
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
