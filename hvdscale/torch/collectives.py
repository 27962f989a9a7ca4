"""How hvdscale.comm reduces NumPy values through horovod.torch (the backend's `collectives`)."""
from typing import Any, Callable, Optional

import numpy as np
import torch


def host_allreduce(hvd: Any, array: np.ndarray, op: Any, name: str) -> np.ndarray:
    return hvd.allreduce(torch.from_numpy(np.ascontiguousarray(array)), op=op,
                         name=name).numpy()


def host_allreduce_async(hvd: Any, array: np.ndarray, op: Any,
                         name: str) -> Optional[Callable[[], np.ndarray]]:
    """Start the reduction and return the fetch that waits for it (the caller goes on)."""
    handle = hvd.allreduce_async(torch.from_numpy(np.ascontiguousarray(array)), op=op,
                                 name=name)
    return lambda: hvd.synchronize(handle).numpy()
