"""What the engine needs from a framework adapter (hvdscale/torch/trainer.py,
hvdscale/tensorflow/trainer.py). The engine never imports torch or TensorFlow itself."""
from typing import Dict, Iterable, Protocol, Tuple

import numpy as np


class Backend(Protocol):
    framework: str            # "torch" | "tensorflow"
    optimizer_name: str       # what the summary prints, e.g. "lamb"
    checkpoint_suffix: str    # ".pt" | ".npz"

    def build(self) -> None:
        """Create model and optimizer and make every rank hold rank 0's initial state."""

    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float) -> float:
        """One optimizer step on this rank's batch (NHWC float32, int64 labels), split into
        `batch.accumulation` micro-batches; gradients averaged over ranks by Horovod.
        Returns this rank's mean training loss."""

    def evaluate(self, batches: Iterable[Tuple[np.ndarray, np.ndarray]]) -> Tuple[int, int, float]:
        """(correct, count, summed loss) over this rank's share of the test set."""

    def sync_statistics(self) -> None:
        """Average non-trained state that drifts per rank (BatchNorm running statistics), so
        evaluation and checkpoints see one model."""

    def state_bytes(self) -> bytes:
        """Model + optimizer state serialised for a checkpoint (safe formats only)."""

    def load_state_bytes(self, data: bytes) -> None:
        """Restore what state_bytes wrote (called on every rank with the same bytes)."""

    def parameters(self) -> Dict[str, np.ndarray]:
        """Trainable parameters by name (tests compare them across ranks and runs)."""
