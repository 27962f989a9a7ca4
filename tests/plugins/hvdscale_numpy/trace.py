"""A recipe callback for the conformance tests (`callbacks: ["hvdscale_numpy.trace:Trace"]`):
at the end of every session it writes what the backend saw, so a test can compare runs
without opening the trainer: OUT/trace-<n>.json (the LR passed to each step of this session,
the steps it began and ended at, the ending) and OUT/params-<n>.npz (the parameters then),
n counting the sessions of one output directory."""
import json

import numpy as np

from hvdscale.engine.callbacks import Callback


class Trace(Callback):
    def __init__(self, cfg):
        self.first_step = None

    def on_run_begin(self, engine):
        self.first_step = engine.step

    def on_run_end(self, engine, ending, summary):
        n = len(list(engine.out.glob("trace-*.json")))
        record = {"ending": ending, "first_step": self.first_step, "last_step": engine.step,
                  "lrs": engine.backend.lrs_applied}
        (engine.out / f"trace-{n}.json").write_text(json.dumps(record))
        np.savez(engine.out / f"params-{n}.npz", **engine.backend.parameters())
