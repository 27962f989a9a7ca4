"""A deliberately broken variant of the fake backend, registered as framework
`numpy_forgetful`: its load_state_bytes restores the parameters but leaves the momentum
buffers at zero. tests/test_engine_conformance.py uses it as the positive control of the
resume check (the check must catch it)."""
import numpy as np

from hvdscale.registry import BACKENDS, BackendInfo, register_backend
from hvdscale_numpy.trainer import NumpyTrainer


class ForgetfulTrainer(NumpyTrainer):
    framework = "numpy_forgetful"

    def load_state_bytes(self, data: bytes) -> None:
        super().load_state_bytes(data)
        for buf in self.optimizer.buffers.values():
            buf[...] = np.zeros_like(buf)


if "numpy_forgetful" not in BACKENDS:
    register_backend(BackendInfo(
        "numpy_forgetful", "the numpy fake with a resume bug (momentum lost)",
        trainer="hvdscale_numpy.forgetful:ForgetfulTrainer", display="numpy_forgetful",
        lr_name="lr", module="numpy",
        optimizers={"sgd": "hvdscale_numpy.nn:build_sgd"},
        models={"mlp": "hvdscale_numpy.nn:build_mlp"},
        model_check="hvdscale_numpy.nn:check_model"))
