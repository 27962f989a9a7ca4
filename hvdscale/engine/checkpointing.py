"""A run's checkpoints: the newest one loaded on --resume, one written every checkpoint period
and when the run ends (hvdscale/engine/checkpoint.py is the store on disk).

The sidecar holds the loop position and what the run measured (`Engine.state_dict()`), the
callbacks' state (`callbacks`), the recipe (resume.CONFIG_KEY) and what a resume must match
(framework, global batch, steps per epoch; elastic: the per-rank batch). Rank 0 writes and
tells every rank how it went in one broadcast, so a write that fails (disk full, read-only)
stops every rank together (`checkpoint.on_error: stop`) or none of them (`warn`). A backend
without CheckpointSupport (hvdscale/engine/backend.py) writes none and refuses --resume.
"""
from typing import Any, Optional

from hvdscale.engine.backend import CheckpointSupport
from hvdscale.engine.checkpoint import CheckpointStore, CheckpointWriteError
from hvdscale.engine.resume import CONFIG_KEY, check_resume
from hvdscale.errors import ConfigError


class CheckpointError(RuntimeError):
    """A checkpoint could not be written and `checkpoint.on_error` is stop (every rank
    raises it together, after rank 0 told them)."""


class Checkpointing:
    def __init__(self, engine: Any, resume: bool):
        cfg = engine.cfg
        self.store = CheckpointStore(engine.out / "checkpoints", keep=cfg.checkpoint.keep)
        self.resume, self.on_error = resume, cfg.checkpoint.on_error
        self.supported = isinstance(engine.backend, CheckpointSupport)
        self.recipe_global_batch = engine.global_batch   # batch.adaptive may change the run's
        self.last_step: Optional[int] = None             # the newest checkpoint's step

    def due(self, engine, ending) -> bool:
        """Whether this step boundary writes one: at the end of a session, and every period."""
        periodic = engine.ckpt_every and engine.step % engine.ckpt_every == 0
        return bool(ending or periodic) and self.last_step != engine.step and self.supported

    # ------------------------------------------------------------------ resume
    def restore(self, engine) -> bool:
        """Load the newest checkpoint when resuming (rank 0 reads, every rank gets the same
        bytes; elastic: every rank reads it, as no collective may run before Horovod's elastic
        sync, which then gives every rank, newcomers included, rank 0's state anyway)."""
        if not self.resume:
            return False
        if not self.supported:
            raise ConfigError(f"the {engine.backend.framework} backend writes no checkpoints "
                              f"to resume from", setting="checkpoint")
        elastic, found = bool(engine.elastic), None
        if engine.comm.is_root or elastic:
            # an unreadable checkpoint is sent to every rank as its message, so that all
            # ranks refuse it together instead of the others waiting in the broadcast
            try:
                hit = self.store.latest()
                if hit is not None:
                    found = (hit[0], hit[1].read_bytes())
            except (ConfigError, OSError) as err:
                found = ("error", str(err))
        if not elastic:
            found = engine.comm.broadcast_object(found)
        if found is not None and found[0] == "error":
            raise ConfigError(found[1], setting="checkpoint")
        if found is None:
            engine.echo(f"resume: no checkpoint in {self.store.dir}, starting from step 0")
            return False
        meta, data = found
        self._check(engine, meta)
        changed = check_resume(meta, engine.cfg.to_dict())     # refuses what cannot change
        try:
            engine.backend.load_state_bytes(data)
            engine.backend.apply_optimizer_settings()   # the recipe's, not the state dict's
        except ConfigError as err:
            raise ConfigError(f"{self.store.dir / meta['state_file']}: {err}",
                              setting="checkpoint") from None
        engine.load_state_dict(meta)
        engine.callbacks.load_state_dict(meta.get("callbacks", {}))
        self.last_step = engine.step
        engine.echo(f"resumed from {self.store.dir / meta['state_file']} at step {engine.step}")
        if changed:
            engine.echo(changed)
        return True

    def _check(self, engine, meta) -> None:
        """What a resume must match: the framework; the global batch and steps per epoch
        (elastic: the world may differ, the per-rank recipe batch may not)."""
        framework = engine.backend.framework
        if meta.get("framework") != framework:
            raise ConfigError(f"checkpoint step {meta['step']} was written by "
                              f"{meta.get('framework')}, this run is {framework}",
                              setting="checkpoint")
        if engine.elastic:
            per_step = meta.get("recipe_per_rank_batch")
            if per_step is not None and per_step != engine.per_step:
                raise ConfigError(f"checkpoint step {meta['step']} has "
                                  f"{per_step} examples per rank and step in its recipe, "
                                  f"this run {engine.per_step}", setting="checkpoint")
            return
        batch = meta.get("recipe_global_batch", meta.get("global_batch"))
        if batch != self.recipe_global_batch or \
                meta.get("steps_per_epoch") != engine.steps_per_epoch:
            raise ConfigError(f"checkpoint has global batch {batch} and "
                              f"{meta.get('steps_per_epoch')} steps/epoch, this run "
                              f"{self.recipe_global_batch} and {engine.steps_per_epoch}",
                              setting="checkpoint")

    # ------------------------------------------------------------------ save
    def save(self, engine) -> bool:
        """Write a checkpoint of this step on rank 0; True when written. Raises
        CheckpointError on every rank when it failed and on_error is stop."""
        if not self.supported:
            return False
        engine.stats.collect(engine)      # never save a step whose non-finite flag is unread
        engine.backend.sync_statistics()
        failure = self._write(engine) if engine.comm.is_root else None
        failure = engine.comm.broadcast_object(failure)
        if failure is None:
            self.last_step = engine.step
            engine.callbacks.checkpoint(engine, engine.step)
            return True
        if self.on_error == "stop":
            raise CheckpointError(f"{failure} (checkpoint.on_error = stop)")
        engine.echo(f"warning: {failure}; training goes on (checkpoint.on_error = warn)")
        return False

    def _write(self, engine) -> Optional[str]:
        """Rank 0: write one checkpoint; returns None, or the one-line reason it failed."""
        cfg, step, per_epoch = engine.cfg, engine.step, engine.steps_per_epoch
        meta = {
            **engine.state_dict(),
            "framework": engine.backend.framework, "workers": engine.comm.size,
            "global_batch": engine.global_batch, "steps_per_epoch": per_epoch,
            "recipe_global_batch": self.recipe_global_batch,
            "epoch": step // per_epoch, "step_in_epoch": step % per_epoch,
            "seed": cfg.train.seed, "recipe": cfg.name,
            "recipe_per_rank_batch": cfg.batch.per_worker * cfg.batch.accumulation,
            "callbacks": engine.callbacks.state_dict(), CONFIG_KEY: cfg.to_dict(),
        }
        try:
            self.store.save(step, engine.backend.state_bytes(),
                            engine.backend.checkpoint_suffix, meta)
        except CheckpointWriteError as err:
            return str(err)
        return None
