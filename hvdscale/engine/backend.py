"""What the engine needs from a framework adapter (hvdscale/torch/trainer.py,
hvdscale/tensorflow/trainer.py, the NumPy fake in tests/plugins/hvdscale_numpy). The engine
never imports torch or TensorFlow itself.

`Backend` is what every backend must do. What a backend may add is one protocol each, which
the engine checks with isinstance once: `CheckpointSupport` (checkpoints, --resume,
preemption saves), `ElasticSupport` (`hvdscale train --elastic`), `AccumulationSupport`
(the micro-batches per step may change: elastic keep_global_batch, batch.adaptive) and
`MetricsSupport` (extra numbers in each evaluation record).

Protocol v2 (docs/architecture.md, "Engine protocol"): batches are opaque framework tensors
already on the worker's device, in the backend's layout; a step never reads the device from
the host; the engine asks for the step statistics at its log interval only.
"""
from typing import Any, Callable, Dict, Iterable, Protocol, Tuple, runtime_checkable

Batch = Any          # (images, labels) as framework tensors on this worker's device


class Backend(Protocol):
    framework: str            # the registered name: "torch" | "tensorflow" | a plugin's
    optimizer_name: str       # what the summary prints, e.g. "lamb"
    device_description: str   # "cpu" or the GPU's name
    precision: str            # "fp32" | "bf16" | "fp16" (train.precision)

    def build(self) -> None:
        """Create model and optimizer (master weights fp32), set the precision policy and
        make every rank hold rank 0's initial state."""

    def device_batches(self, batches: Iterable[Tuple[Any, Any]]) -> Iterable[Batch]:
        """Wrap a source's batches so they arrive on this worker's device in the backend's
        layout (pinned memory + non_blocking copies and one batch prefetched for torch,
        tf.data prefetch to the device for TF). Framework-native batches that are already
        there (DALI's torch iterator, DALI's TF dataset) pass through untouched."""

    def poisoned(self, batch: Batch) -> Batch:
        """The same batch with NaN images (faults.inject_nan_at_step, debug)."""

    def train_step(self, batch: Batch, lr: float) -> None:
        """One optimizer step on this rank's batch, split into `batch.accumulation`
        micro-batches, gradients averaged over ranks by Horovod. No host read of a device
        value: loss sum, example count and the non-finite flag accumulate on the device.
        The non-finite decision is taken from the *averaged* gradients (equal on every rank);
        `faults.nonfinite: skip` drops the update on every rank (TF: inside the step
        function; torch: one flag read per step), `abort` is reported by read_stats().
        Host (NumPy) batches are accepted too and converted."""

    def read_stats(self) -> Dict[str, float]:
        """The one host read, at the engine's log/progress/eval/checkpoint points: returns
        {"loss_sum": float, "examples": int, "steps": int, "nonfinite_steps": int,
         "first_nonfinite_step": int | None} accumulated since the last call (this rank),
        and resets the accumulators. first_nonfinite_step counts steps from that last call
        (0 = the first step after it)."""

    def evaluate(self, batches: Iterable[Tuple[Any, Any]]) -> Tuple[int, int, float]:
        """(correct, count, summed loss) over this rank's share of the test set; the batches
        go through device_batches() inside, and the totals are read once at the end."""

    def sync_statistics(self) -> None:
        """Average non-trained state that drifts per rank (BatchNorm running statistics), so
        evaluation and checkpoints see one model."""


@runtime_checkable
class CheckpointSupport(Protocol):
    checkpoint_suffix: str    # the state file's: ".pt" | ".npz"

    def state_bytes(self) -> bytes:
        """Model + optimizer state serialised for a checkpoint (safe formats only)."""

    def load_state_bytes(self, data: bytes) -> None:
        """Restore what state_bytes wrote (called on every rank with the same bytes)."""

    def apply_optimizer_settings(self) -> None:
        """After load_state_bytes on resume: the optimizer's hyper-parameters (weight decay,
        betas, momentum, ...) from this run's recipe, not from the loaded state
        (hvdscale/engine/resume.py lists what changed)."""


@runtime_checkable
class AccumulationSupport(Protocol):
    def set_accumulation(self, passes: int) -> None:
        """Micro-batches per optimizer step from now on."""


@runtime_checkable
class ElasticSupport(AccumulationSupport, Protocol):
    """`hvdscale train --elastic` (hvdscale/engine/elastic.py)."""
    elastic: bool             # set by the engine before build(): then build() runs no
    #                           collective (newcomers get rank 0's state from the State's sync)

    def elastic_state(self, **fields: Any) -> Any:
        """A horovod.common.elastic.State over model and optimizer (save = commit in memory,
        restore = back to the last commit, sync = rank 0's state to every rank) that also
        carries `fields` as synchronised attributes (the engine's loop position)."""

    def elastic_run(self, fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """The framework's hvd.elastic.run(fn): re-runs fn(state) after a lost peer (state
        restored) or a host change, with Horovod re-initialised for the new world."""


@runtime_checkable
class MetricsSupport(Protocol):
    def extra_metrics(self) -> Dict[str, Any]:
        """Host numbers merged into each evaluation record (e.g. the online noise scale:
        b_simple, gns_g2, gns_trace, gns_samples); read at evaluations only."""
