"""A callback for tests/test_adaptive_train.py: records this rank's own noise-scale reading
(backend.extra_metrics(), before batch.adaptive broadcasts rank 0's) and the global batch in
force, every 10 steps, to HVDSCALE_TEST_READINGS_DIR/rank<r>.json."""
import json
import os
from pathlib import Path

from hvdscale.engine.callbacks import Callback


class RankReadings(Callback):
    def __init__(self, cfg):
        self.rows = []

    def on_step_end(self, engine):
        if engine.step % 10 == 0:
            self.rows.append([engine.step, engine.global_batch,
                              dict(engine.backend.extra_metrics())])

    def on_run_end(self, engine, ending, summary):
        path = Path(os.environ["HVDSCALE_TEST_READINGS_DIR"]) / f"rank{engine.comm.rank}.json"
        path.write_text(json.dumps(self.rows))


def make(cfg):
    return RankReadings(cfg)
