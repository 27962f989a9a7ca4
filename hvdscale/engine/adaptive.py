"""batch.adaptive: the global batch grows during training from the online noise scale
(the rule: hvdscale/core/adaptive_batch.py; the user's view: docs/training.md).

Every `every_steps` steps the callback reads the smoothed noise estimate the backend keeps
(`extra_metrics()`: b_simple = tr(Sigma)/|G|^2, gns_g2, gns_trace, gns_samples), asks the rule
for the next global batch and applies it:
  - the batch grows through gradient accumulation at the recipe's per-worker micro-batch
    (`backend.set_accumulation`), so it works at any worker count, one included; the
    training source is rebuilt for the new per-rank batch and the loop restarts its epoch
    iterator at the same example position;
  - the learning rate is the recipe's schedule run in *examples seen* (so warm-up and decay
    end where they would have at the recipe's batch, whenever the batch changed), times the
    gain of `batch.adaptive.rule` at scale s = B / B_0;
  - the run keeps its example budget: it ends when the recipe's steps x B_0 examples are seen.

The estimate is equal on every rank in principle (its inputs are allreduced), but rank 0's
reading is broadcast before each decision so that the ranks can never disagree and hang.

--elastic: B_0 is the reference world's batch (the one the job started with), and a world of
K workers keeps the decided global batch G: the micro-batch stays, the accumulation becomes
G / (per_worker x K), and a G that does not split so is refused in one line. The decisions
(segments: lr gain included) and the noise estimator's state ride in each elastic commit, so
after a reset every rank, a newcomer too, goes on from the committed ones (on_world).
"""
import dataclasses
import math
from typing import Any, Dict, List, Optional

from hvdscale.core.adaptive_batch import BatchRule, lr_gain
from hvdscale.engine.callbacks import Callback
from hvdscale.engine.tensorboard import TensorBoardCallback
from hvdscale.errors import ConfigError


class ExamplesSchedule:
    """lr(step) = base(examples seen before `step` / B_0) x the gain in force at `step`.

    segments: [start_step, start_examples, global_batch, gain] rows, the first at step 0; a
    fractional position between two steps of B_0 is interpolated linearly.
    """

    def __init__(self, base, reference_batch: int, segments: List[list]):
        self.base, self.reference_batch, self.segments = base, reference_batch, segments

    def examples_before(self, step: int) -> int:
        start, examples, batch, _ = self._segment(step)
        return examples + (step - start) * batch

    def _segment(self, step):
        for row in reversed(self.segments):
            if row[0] <= step:
                return row
        return self.segments[0]

    def __call__(self, step: int) -> float:
        gain = self._segment(step)[3]
        whole, part = divmod(self.examples_before(step), self.reference_batch)
        lr = self.base(whole)
        if part:
            lr += (self.base(whole + 1) - lr) * part / self.reference_batch
        return lr * gain


class AdaptiveBatch(Callback):
    """Grows the global batch from the noise scale (batch.adaptive); see the module text."""

    name = "adaptive_batch"

    def __init__(self, cfg: Any, workers: int):
        a, b = cfg.batch.adaptive, cfg.batch
        self.cfg, self.settings, self.workers = cfg, a, workers
        self.granularity = b.per_worker * workers
        self.start_batch = self.granularity * b.accumulation
        # the checks that need the worker count (one line, the same on every rank)
        if self.start_batch > a.max_global:
            raise ConfigError(f"batch.adaptive.max_global ({a.max_global}) is below the "
                              f"global batch the run starts from ({self.start_batch} = "
                              f"{workers} x {b.per_worker} x {b.accumulation})")
        if a.max_global % self.granularity:
            raise ConfigError(f"batch.adaptive.max_global ({a.max_global}) is not a multiple "
                              f"of per_worker x workers = {b.per_worker} x {workers}")
        self.rule = BatchRule(min_global=self.start_batch, max_global=a.max_global,
                              granularity=self.granularity, threshold=a.threshold,
                              min_samples=a.min_samples, shrink=a.shrink)
        self.segments: List[list] = [[0, 0, self.start_batch, 1.0]]
        self.budget = None              # examples the run trains on (the recipe's plan)
        self._restored: Optional[Dict[str, Any]] = None
        self._noise = None

    def _enter_world(self, reference_workers: int, workers: int) -> None:
        """Elastic: B_0 of the reference world; the rule's step is per_worker x K now, its
        bounds B_0 and max_global rounded onto that step (the decided batch must split)."""
        b, a = self.cfg.batch, self.settings
        self.workers = workers
        self.start_batch = reference_workers * b.per_worker * b.accumulation
        g = self.granularity = b.per_worker * workers
        decided = self.segments[-1][2] if self._restored is None \
            else self._restored["segments"][-1][2]
        if decided % g:
            raise ConfigError(f"batch.adaptive with --elastic: the decided global batch "
                              f"{decided} cannot be split over {workers} workers of "
                              f"batch.per_worker {b.per_worker} (accumulation "
                              f"{decided} / {g} is not whole)")
        self.rule = BatchRule(min_global=-(-self.start_batch // g) * g,
                              max_global=max(decided, a.max_global // g * g), granularity=g,
                              threshold=a.threshold, min_samples=a.min_samples,
                              shrink=a.shrink)

    # ------------------------------------------------------------------ hooks
    def on_run_begin(self, engine) -> None:
        if engine.elastic:
            return          # on_world sets the run up once the elastic world is known
        self._begin(engine)

    def on_world(self, engine) -> None:
        """Elastic: the engine has (re)entered a world and re-planned it at the reference
        world's batch; put the committed decisions back on top, at the new worker count."""
        self._enter_world(engine.elastic.reference_workers, engine.comm.size)
        self._begin(engine)

    def _begin(self, engine) -> None:
        self.budget = engine.total_steps * self.start_batch
        engine.lr = dataclasses.replace(
            engine.lr, schedule=ExamplesSchedule(engine.lr.schedule, self.start_batch,
                                                 self.segments))
        noise = getattr(engine.backend, "noise_scale", None)
        if self._restored is not None:
            self.segments[:] = [list(row) for row in self._restored["segments"]]
            if noise is not None and self._restored.get("noise") is not None:
                noise.load_state_dict(self._restored["noise"])
            self._restored = None
        self._apply(engine, self.segments[-1][2])
        if engine.global_batch != self.start_batch and not engine.elastic:
            engine.echo(f"adaptive batch: resumed at global batch {engine.global_batch} "
                        f"(accumulation {engine.per_step // self.cfg.batch.per_worker}), "
                        f"lr x{self.segments[-1][3]:.3g}, {engine.total_steps} steps in all")

    def on_step_end(self, engine) -> None:
        if engine.step % self.settings.every_steps or engine.step >= engine.total_steps:
            return
        reading = engine.comm.broadcast_object(dict(engine.backend.extra_metrics()))
        b_noise, samples = reading.get("b_simple"), int(reading.get("gns_samples") or 0)
        current, gain = self.segments[-1][2], self.segments[-1][3]
        decision = self.rule.decide(current, b_noise, samples)
        batch = decision.global_batch
        new_gain = self._gain(batch, reading)
        if batch == current and math.isclose(new_gain, gain, rel_tol=1e-9):
            return
        self.segments.append([engine.step, engine.examples, batch, new_gain])
        self._apply(engine, batch)
        event = {"event": "batch", "step": engine.step, "global_batch": batch,
                 "accumulation": batch // self.granularity, "lr_gain": new_gain,
                 "lr": engine.lr.schedule(engine.step), "b_noise": b_noise,
                 "samples": samples, "predicted_saving": decision.saving,
                 "reason": decision.reason}
        engine._log.write(event)
        for callback in engine.callbacks:
            if isinstance(callback, TensorBoardCallback):
                for tag in ("global_batch", "accumulation", "lr_gain", "b_noise"):
                    if event[tag] is not None:
                        callback.scalar(f"adaptive/{tag}", event[tag], engine.step)
        if batch != current:
            engine.echo(f"adaptive batch: step {engine.step}: global batch {current} -> "
                        f"{batch} (B_noise {b_noise:.0f} from {samples} samples; "
                        f"{decision.reason}), lr x{new_gain:.3g}")

    def state_dict(self) -> Dict[str, Any]:
        if self._restored is not None:      # loaded, not applied yet (elastic: before on_world)
            return self._restored
        noise = self._noise
        return {"segments": [list(row) for row in self.segments],
                "noise": dict(noise.state_dict()) if noise is not None else None}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._restored = state          # applied in on_run_begin, when the engine is at hand

    # ------------------------------------------------------------------ helpers
    def _gain(self, batch: int, reading: Dict[str, Any]) -> float:
        scale = batch / self.start_batch
        if self.settings.rule != "adascale":
            return lr_gain(self.settings.rule, scale)
        g2, trace = reading.get("gns_g2"), reading.get("gns_trace")
        if g2 is None or trace is None:
            return 1.0
        return lr_gain("adascale", scale, g2=g2, trace=trace,
                       reference_batch=self.start_batch)

    def _apply(self, engine, batch: int) -> None:
        """Put the engine on global batch `batch`: accumulation, per-rank batches, the
        source, the event periods and the number of steps left in the example budget."""
        self._noise = getattr(engine.backend, "noise_scale", None)
        b = self.cfg.batch
        accumulation = batch // self.granularity
        if batch == engine.global_batch and accumulation == engine.per_step // b.per_worker:
            self._set_length(engine)
            return
        engine.backend.set_accumulation(accumulation)
        engine.per_step = b.per_worker * accumulation
        engine.global_batch = batch
        sized = dataclasses.replace(self.cfg, batch=dataclasses.replace(
            b, accumulation=accumulation))
        sources = engine.sources
        if sources is None:
            from hvdscale.data import build_sources as sources
        engine.batches, _ = sources(sized, engine.comm.rank, engine.comm.size)
        per_epoch = engine.batches.steps_per_epoch
        t, ck = self.cfg.train, self.cfg.checkpoint
        if t.eval_every_steps is None and t.eval_every_epochs is not None:
            engine.eval_every = max(1, int(round(t.eval_every_epochs * per_epoch)))
        if ck.every_steps is None and ck.every_epochs is not None:
            engine.ckpt_every = max(1, int(round(ck.every_epochs * per_epoch)))
        self._set_length(engine)

    def _set_length(self, engine) -> None:
        left = max(0, self.budget - engine.examples)
        engine.total_steps = engine.step + math.ceil(left / engine.global_batch)
