"""How hvdscale.comm reduces NumPy values through horovod.tensorflow (the backend's
`collectives`)."""
from typing import Any, Callable, Optional

import numpy as np
import tensorflow as tf


def host_allreduce(hvd: Any, array: np.ndarray, op: Any, name: str) -> np.ndarray:
    return hvd.allreduce(tf.constant(array), op=op, name=name).numpy()


def host_allreduce_async(hvd: Any, array: np.ndarray, op: Any,
                         name: str) -> Optional[Callable[[], np.ndarray]]:
    """None: horovod.tensorflow has no eager async call, and eager Horovod ops issued from a
    helper thread at the same time as the main thread's were seen to mix up their names, so
    the collective runs (blocking) when the caller waits for it."""
    return None
