"""One study run through hvdscale's own Engine (issue 21, "one loop"): the step semantics of
`hvdscale train` -- the recipe's lr scaling rule, warm-up and decay (hvdscale.engine.lr from
hvdscale.core.schedules), evaluation cadence, the target tracker, the non-finite policy, the
online noise scale -- with the study's extras as an Engine callback instead of a second loop:

- the step where the validation accuracy crosses the target, interpolated between the two
  evaluations around it (hvdscale.core.metrics.interpolated_crossing);
- an optional stop a fraction of those steps after the target (`continue_after_target`), with
  snapshots of the weights every `snapshot_every` steps (the noise window, docs/study.md);
- divergence: a non-finite step (faults.nonfinite abort), a mean training loss above
  DIVERGED_LOSS, or a validation accuracy back at chance after the warm-up;
- the accuracy on the untouched test set at the end of the run.

Single process, in memory: one process whose batch is the global batch makes the same updates
as K Horovod workers averaging K shares of it (tests/test_hvd_optimizers.py).
"""
import copy
import math
import tempfile
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

from hvdscale.core.metrics import interpolated_crossing
from hvdscale.engine.callbacks import Callback

DIVERGED_LOSS = 10.0       # an untrained 10-class model has ln 10 = 2.3
STUCK_ACCURACY = 0.15      # back at chance (0.1) on 10 classes
CHANCE = 0.1


@dataclass
class StudyRun:
    status: str = "censored"                 # reached | censored | diverged
    steps_to_target: Optional[float] = None  # interpolated between validation evaluations
    steps_run: int = 0
    evals: List[tuple] = field(default_factory=list)   # (step, val accuracy, train loss, lr)
    test_accuracy: Optional[float] = None    # whole test set at the end (CHANCE if diverged)
    online_noise: List[tuple] = field(default_factory=list)   # (step, b_simple) at evals
    snapshots: List[dict] = field(default_factory=list)       # {"step", "model", "optimizer"}
    diverged_at: Optional[int] = None
    wall_s: float = 0.0

    @property
    def reached(self):
        return self.status == "reached"


class StudyCallback(Callback):
    """The study's measurements on top of the Engine's loop (module docstring)."""

    name = ""     # no state across a resume: study runs are never resumed

    def __init__(self, result: StudyRun, target: float, test_source, *,
                 continue_after_target: Optional[float] = None, snapshot_every: int = 0):
        self.result, self.target, self.test_source = result, target, test_source
        self.continue_after_target = continue_after_target
        self.snapshot_every = snapshot_every
        self._prev = None

    def on_run_begin(self, engine):
        self._prev = None

    def on_step_end(self, engine):
        r = self.result
        r.steps_run = engine.step
        if self.snapshot_every and engine.step % self.snapshot_every == 0:
            r.snapshots.append({"step": engine.step,
                                "model": copy.deepcopy(engine.backend.model.state_dict()),
                                "optimizer": copy.deepcopy(engine.backend.optimizer.state_dict())})
        if r.steps_to_target is not None and self.continue_after_target is not None and \
                engine.step >= r.steps_to_target * (1 + self.continue_after_target):
            engine.request_stop()

    def on_stats(self, engine, stats):
        if stats["examples"] and stats["loss_sum"] / stats["examples"] > DIVERGED_LOSS:
            self._diverged(engine)

    def on_evaluate(self, engine, record):
        r = self.result
        cur = (record["step"], record["test_accuracy"])   # the engine's eval set: validation
        r.evals.append((cur[0], cur[1], record["train_loss"], record["lr"]))
        if record.get("b_simple") is not None:
            r.online_noise.append((cur[0], record["b_simple"]))
        if r.steps_to_target is None and cur[1] >= self.target:
            r.status = "reached"     # at the first evaluation already: no earlier point to use
            r.steps_to_target = float(cur[0]) if self._prev is None else \
                interpolated_crossing(self._prev, cur, self.target)
            if self.continue_after_target == 0:
                engine.request_stop()
        elif r.steps_to_target is None and cur[1] <= STUCK_ACCURACY and \
                engine.step >= engine.lr.warmup_steps + 0.1 * engine.total_steps:
            self._diverged(engine)
        self._prev = cur

    def on_run_end(self, engine, ending, summary):
        r = self.result
        if r.status == "diverged" or ending == "error":
            r.test_accuracy = CHANCE
            return
        correct, count, _ = engine.backend.evaluate(self.test_source.batches())
        r.test_accuracy = correct / max(1, count)

    def _diverged(self, engine):
        r = self.result
        if r.steps_to_target is None:
            r.status = "diverged"
        r.diverged_at = engine.step
        engine.request_stop()


def run_with_engine(cfg, train, validation, test, *, continue_after_target: Optional[float] = None,
                    snapshot_every: int = 0, out_dir=None, model_fn=None,
                    callbacks: Sequence[Callback] = ()) -> StudyRun:
    """Train `cfg` (a hvdscale Config: batch.per_worker is the global batch, the schedule,
    budget, evaluation cadence and target are the recipe's) on in-memory ArrayDatasets with the
    Engine in this process. The Engine evaluates on `validation`; `test` is scored once at the
    end. continue_after_target: None trains the whole budget; 0 stops at the evaluation that
    reaches the target; w > 0 stops w x the steps to target after it."""
    from hvdscale.comm import Comm
    from hvdscale.data import array_batches
    from hvdscale.engine.faults import NonFiniteLossError
    from hvdscale.engine.loop import Engine
    from hvdscale.torch.trainer import TorchTrainer

    start = time.perf_counter()
    comm = Comm(cfg.framework)                 # one process, no Horovod
    trainer = TorchTrainer(cfg, comm, threads=cfg.train.threads or 1, model_fn=model_fn)
    # the sources `hvdscale train` builds from arrays: rank 0 of 1, the validation set as the
    # engine's evaluation set, the test set kept apart for the end
    train_source, val_source = array_batches(cfg, 0, 1, train, validation)
    _, test_source = array_batches(cfg, 0, 1, train, test)
    result = StudyRun()
    target = cfg.train.target_accuracy if cfg.train.target_accuracy is not None else math.inf
    study = StudyCallback(result, target, test_source,
                          continue_after_target=continue_after_target,
                          snapshot_every=snapshot_every)
    with tempfile.TemporaryDirectory(prefix="hvdscale-study-") as tmp:
        # sources: a callback that changes the batch (batch.adaptive) rebuilds the training
        # source from these arrays
        engine = Engine(cfg, comm, trainer, train_source, val_source, out_dir or tmp,
                        echo=lambda *a, **k: None, callbacks=[study, *callbacks],
                        sources=lambda c, rank, size: array_batches(c, rank, size, train,
                                                                    validation))
        try:
            engine.run()
        except NonFiniteLossError:
            result.status = "diverged" if result.steps_to_target is None else result.status
            result.diverged_at = engine.step
            result.test_accuracy = CHANCE
    result.wall_s = time.perf_counter() - start
    return result
