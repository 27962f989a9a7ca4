"""The framework-neutral training driver: loop, LR per step, sharded evaluation, timing,
metrics.jsonl / TensorBoard, progress bar, atomic checkpoints, target tracking and summary."""
from hvdscale.engine.loop import Engine, RunResult  # noqa: F401
