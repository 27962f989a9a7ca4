"""The loop's callback protocol (docs/architecture.md, "Callbacks"): a user's callback named in
the recipe sees every hook at the right steps, its state survives --resume, and a factory that
returns something else is refused in one line."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hvdscale.engine.callbacks import Callback, CallbackList

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = str(ROOT / "tests" / "plugins")
SMALL = ["--set", "data.train_limit=512", "--set", "data.test_limit=128",
         "--set", "batch.per_worker=64", "--set", "batch.reference=64",
         "--set", "train.threads=1", "--set", "log.progress=false",
         "--set", "log.tensorboard=false", "--set", "lr.warmup_steps=1",
         "--set", "train.epochs=2", "--set", "log.every_steps=3",
         "--set", "train.eval_every_steps=5", "--set", "checkpoint.every_steps=4",
         "--set", "callbacks=[recording_callback:make]"]


def train(tmp_path, *extra, log="events.json"):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([PLUGINS, str(ROOT)]),
               HVDSCALE_TEST_CALLBACK_LOG=str(tmp_path / log), TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, "-m", "hvdscale", "train", "--no-horovod", *SMALL,
                           "--out", str(tmp_path / "run"), *extra],
                          env=env, capture_output=True, text=True, timeout=300)


def test_a_recipe_callback_sees_every_hook_and_keeps_its_state_across_resume(tmp_path):
    # 512 / 64 = 8 steps per epoch, 16 steps: session one stops after 6 (checkpoint at 6)
    first = train(tmp_path, "--stop-after-steps", "6", log="first.json")
    assert first.returncode == 0, first.stderr
    events = json.loads((tmp_path / "first.json").read_text())
    assert events[0] == ["begin", 0, None]
    assert [e[1] for e in events if e[0] == "step"] == [1, 2, 3, 4, 5, 6]
    # statistics read every 3 steps and before each evaluation and checkpoint
    assert [e[1] for e in events if e[0] == "stats"] == [3, 4, 5, 6]
    assert [e[1] for e in events if e[0] == "evaluate"] == [5]
    assert [e[1] for e in events if e[0] == "checkpoint"] == [4, 6]
    assert events[-1] == ["end", "paused", None]
    meta = json.loads((tmp_path / "run" / "checkpoints" / "step-00000006.json").read_text())
    assert meta["callbacks"] == {"recorder": {"steps_seen": 6}}

    second = train(tmp_path, "--resume", log="second.json")
    assert second.returncode == 0, second.stderr
    events = json.loads((tmp_path / "second.json").read_text())
    assert events[0] == ["begin", 6, 6]       # state handed back before on_run_begin
    assert [e[1] for e in events if e[0] == "step"] == list(range(7, 17))
    assert [e[1] for e in events if e[0] == "evaluate"] == [10, 15, 16]
    assert events[-1] == ["end", "done", 16]
    # the evaluation record a callback gets is the line in metrics.jsonl
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["test_accuracy"] for r in lines if "test_accuracy" in r}
    assert all(evals[e[1]] == e[2] for e in events if e[0] == "evaluate")


def test_a_factory_that_returns_no_callback_is_one_line(tmp_path):
    run = train(tmp_path, "--set", "callbacks=[recording_callback:not_a_callback]")
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "callbacks 'recording_callback:not_a_callback'" in lines[0]
    assert "not a hvdscale.engine.callbacks.Callback" in lines[0]


def test_a_callback_that_is_not_importable_is_refused_at_load(tmp_path):
    run = train(tmp_path, "--set", "callbacks=[no_such_module_xyz:make]")
    assert run.returncode == 2
    assert "no module named 'no_such_module_xyz'" in run.stderr


def test_run_end_reaches_every_callback_and_raises_the_first_error():
    seen = []

    class Failing(Callback):
        def __init__(self, tag):
            self.tag = tag

        def on_run_end(self, engine, ending, summary):
            seen.append(self.tag)
            raise RuntimeError(self.tag)

    with pytest.raises(RuntimeError, match="^a$"):
        CallbackList([Failing("a"), Failing("b")]).run_end(None, "error", None)
    assert seen == ["a", "b"]


def test_state_needs_a_name():
    class Nameless(Callback):
        def state_dict(self):
            return {"x": 1}

    with pytest.raises(ValueError, match="needs a name"):
        CallbackList([Nameless()]).state_dict()
