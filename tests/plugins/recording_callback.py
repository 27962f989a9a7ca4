"""A user's callback for tests/test_callbacks.py: records every hook call it sees to a JSON file
named by HVDSCALE_TEST_CALLBACK_LOG and carries a counter across checkpoints."""
import json
import os

from hvdscale.engine.callbacks import Callback


class Recorder(Callback):
    name = "recorder"

    def __init__(self, cfg):
        self.path = os.environ["HVDSCALE_TEST_CALLBACK_LOG"]
        self.events = []
        self.steps_seen = 0          # carried across resume through state_dict
        self.restored = None

    def _log(self, *event):
        self.events.append(list(event))

    def on_run_begin(self, engine):
        self._log("begin", engine.step, self.restored)

    def on_step_end(self, engine):
        self.steps_seen += 1
        self._log("step", engine.step)

    def on_stats(self, engine, stats):
        self._log("stats", engine.step, stats["steps"])

    def on_evaluate(self, engine, record):
        self._log("evaluate", record["step"], record["test_accuracy"])

    def on_checkpoint(self, engine, step):
        self._log("checkpoint", step)

    def on_run_end(self, engine, ending, summary):
        self._log("end", ending, None if summary is None else summary["steps"])
        with open(self.path, "w") as fh:
            json.dump(self.events, fh)

    def state_dict(self):
        return {"steps_seen": self.steps_seen}

    def load_state_dict(self, state):
        self.restored = state["steps_seen"]
        self.steps_seen = state["steps_seen"]


def make(cfg):
    return Recorder(cfg)


def not_a_callback(cfg):
    return object()
