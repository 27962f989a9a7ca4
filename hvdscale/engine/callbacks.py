"""The loop calls hooks; features are callbacks (docs/architecture.md, "Callbacks").

A callback sees the Engine (read it, do not change its loop position) at fixed points of a run.
Every hook runs on every rank, in the order the callbacks were given; a callback that writes
files or prints checks `engine.comm.is_root` itself, and one whose hook runs a collective must
run it on every rank. Hooks get host values only: a hook never reads a device tensor (that is
the statistics read's job, whose result `on_stats` receives).

    on_run_begin(engine)                  after build/resume, before the first step
    on_step_end(engine)                   after every optimizer step (engine.step is new)
    on_stats(engine, stats)               after each statistics read (log.every_steps, and
                                          before every evaluation and checkpoint)
    on_evaluate(engine, record)           after each evaluation: the metrics.jsonl record
    on_checkpoint(engine, step)           after a checkpoint was written
    on_run_end(engine, ending, summary)   always, last: ending is done | target | stopped |
                                          paused | preempted | error; summary is None unless
                                          done/target/stopped
    on_world(engine)                      elastic runs: the engine (re)entered a world (its
                                          first, or one after a reset or a size change), with
                                          the committed callback state loaded just before

A callback may end the run with engine.request_stop() (ending "stopped" after the current
step), deciding from values that are equal on every rank.

A callback that carries state across a resume returns it from state_dict() (JSON-able); the
engine stores it in the checkpoint's sidecar under callbacks[<callback.name>] and hands it to
load_state_dict() on resume, before on_run_begin. An elastic run also keeps that state in
each commit: after a reset every rank gets the committed state (rank 0's) through
load_state_dict(), then on_world().
"""
from typing import Any, Dict, Iterable, List, Optional


class Callback:
    """Base class: every hook does nothing. `name` keys the checkpointed state."""

    name: str = ""

    def on_run_begin(self, engine) -> None:
        pass

    def on_step_end(self, engine) -> None:
        pass

    def on_stats(self, engine, stats: Dict[str, Any]) -> None:
        pass

    def on_evaluate(self, engine, record: Dict[str, Any]) -> None:
        pass

    def on_checkpoint(self, engine, step: int) -> None:
        pass

    def on_run_end(self, engine, ending: str, summary: Optional[Dict[str, Any]]) -> None:
        pass

    def on_world(self, engine) -> None:
        pass

    def state_dict(self) -> Optional[Dict[str, Any]]:
        return None

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass


class CallbackList:
    """Calls one hook on every callback in order. on_run_end reaches every callback even when
    an earlier one raises (files get closed); the first error is raised after the rest ran."""

    def __init__(self, callbacks: Iterable[Callback] = ()):
        self.callbacks: List[Callback] = list(callbacks)

    def append(self, callback: Callback) -> None:
        self.callbacks.append(callback)

    def __iter__(self):
        return iter(self.callbacks)

    def run_begin(self, engine):
        for cb in self.callbacks:
            cb.on_run_begin(engine)

    def step_end(self, engine):
        for cb in self.callbacks:
            cb.on_step_end(engine)

    def stats(self, engine, stats):
        for cb in self.callbacks:
            cb.on_stats(engine, stats)

    def evaluate(self, engine, record):
        for cb in self.callbacks:
            cb.on_evaluate(engine, record)

    def checkpoint(self, engine, step):
        for cb in self.callbacks:
            cb.on_checkpoint(engine, step)

    def world(self, engine):
        for cb in self.callbacks:
            cb.on_world(engine)

    def run_end(self, engine, ending, summary):
        first_error = None
        for cb in self.callbacks:
            try:
                cb.on_run_end(engine, ending, summary)
            except Exception as err:  # noqa: BLE001 - re-raised below, after the others ran
                first_error = first_error or err
        if first_error is not None:
            raise first_error

    def state_dict(self) -> Dict[str, Any]:
        """{name: state} of the callbacks that carry state."""
        out = {}
        for cb in self.callbacks:
            state = cb.state_dict()
            if state is not None:
                if not cb.name:
                    raise ValueError(f"{type(cb).__name__}: a callback with state needs a name")
                out[cb.name] = state
        return out

    def load_state_dict(self, states: Dict[str, Any]) -> None:
        for cb in self.callbacks:
            if cb.name and cb.name in states:
                cb.load_state_dict(states[cb.name])
