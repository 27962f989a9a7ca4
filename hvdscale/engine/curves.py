"""Training curves on disk: OUT/steps.jsonl, one line per statistics read (`log.every_steps`,
and before every evaluation and checkpoint), so `hvdscale report` can draw loss, lr and
throughput without TensorBoard.

A line: {"step", "epoch", "workers", "global_batch", "loss", "lr",
"images_per_sec", "elapsed_s"}. `loss` is the mean training loss over every rank's examples
since the previous line (one small allreduce, at the same step on every rank); `lr` is the
rate of the last step; `images_per_sec` counts training steps only (evaluation, checkpoints
and the session's first step are excluded, as in the summary) since the previous line.
metrics.jsonl keeps its contract (evaluations, events, the summary last).
OUT/recipe.json holds the recipe as the run resolved it (with its --set overrides), which
tells the report what differs between two runs.
"""
import json

from hvdscale.engine.callbacks import Callback
from hvdscale.engine.checkpoint import atomic_write
from hvdscale.engine.reporting import MetricsLog

STEPS_FILE = "steps.jsonl"
RECIPE_FILE = "recipe.json"


class StepCurvesCallback(Callback):
    def __init__(self):
        self._log = None
        self._timed = (0, 0.0)      # (timed steps, timed seconds) at the previous line
        self._counted = (0, 0)      # (step, examples seen) after the last step

    def on_run_begin(self, engine):
        self._timed = (engine.clock.timed_steps, engine.clock.timed_time)
        self._counted = (engine.step, engine.examples)
        if engine.comm.is_root:
            # a resumed run goes on with its file; a fresh one starts it again
            self._log = MetricsLog(engine.out / STEPS_FILE, append=engine.step > 0)
            try:
                atomic_write(engine.out / RECIPE_FILE, (json.dumps(
                    engine.cfg.to_dict(), indent=1, default=str) + "\n").encode())
            except OSError as err:     # the report then labels runs less well; no reason to stop
                engine.echo(f"warning: cannot write {engine.out / RECIPE_FILE}: {err}")

    def on_step_end(self, engine):
        self._counted = (engine.step, engine.examples)

    on_world = on_step_end       # elastic: the position may have rolled back to a commit

    def _examples(self, engine):
        """Examples seen up to engine.step: the epoch is counted in examples, as the batch
        may change (batch.adaptive, elastic); a read inside a step comes before the engine
        counted that step's examples."""
        step, examples = self._counted
        return examples + (engine.step - step) * engine.global_batch

    def on_stats(self, engine, stats):
        # the loss over every rank comes with the engine's statistics read; only rank 0 writes
        loss_sum, examples = stats["loss_sum_all"], stats["examples_all"]
        steps = engine.clock.timed_steps - self._timed[0]
        seconds = engine.clock.timed_time - self._timed[1]
        self._timed = (engine.clock.timed_steps, engine.clock.timed_time)
        if not engine.comm.is_root:
            return
        if self._log is None:        # elastic: this rank became rank 0
            self._log = MetricsLog(engine.out / STEPS_FILE, append=True)
        self._log.write({
            "step": engine.step, "epoch": round(self._examples(engine) / engine.epoch_examples,
                                                4),
            "workers": engine.comm.size,
            "global_batch": engine.global_batch,
            "loss": float(loss_sum / examples) if examples else None,
            "lr": engine.lr.schedule(engine.step - 1),
            "images_per_sec": steps * engine.global_batch / seconds
            if steps > 0 and seconds > 0 else None,
            "elapsed_s": engine.clock.train_time,
        })

    def on_run_end(self, engine, ending, summary):
        if self._log is not None:
            self._log.close()
            self._log = None
