"""A recipe callback for the conformance tests (`callbacks: ["hvdscale_numpy.trace:Trace"]`):
it records, through the Backend protocol only (so it works for any backend), the LR the engine
hands each `train_step` of a session, and at the session's end writes OUT/trace-<n>.json (those
LRs, the steps the session began and ended at, its ending) and OUT/params-<n>.npz (the
backend's `parameters()` then), n counting the sessions of one output directory."""
import json

import numpy as np

from hvdscale.engine.callbacks import Callback


class Trace(Callback):
    def __init__(self, cfg):
        self.first_step, self.lrs = None, []

    def on_run_begin(self, engine):
        self.first_step = engine.step
        backend, step = engine.backend, engine.backend.train_step

        def recorded(batch, lr):
            self.lrs.append(float(lr))
            return step(batch, lr)
        backend.train_step = recorded        # this instance only; the engine calls it so

    def on_run_end(self, engine, ending, summary):
        n = len(list(engine.out.glob("trace-*.json")))
        record = {"ending": ending, "first_step": self.first_step, "last_step": engine.step,
                  "lrs": self.lrs}
        (engine.out / f"trace-{n}.json").write_text(json.dumps(record))
        np.savez(engine.out / f"params-{n}.npz", **engine.backend.parameters())
