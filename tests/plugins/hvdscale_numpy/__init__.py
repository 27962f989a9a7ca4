"""A third backend in NumPy: the worked example of docs/extending.md ("A new backend") and the
fast stand-in the Engine conformance tests (tests/test_engine_conformance.py) train with, so
that they need neither torch nor TensorFlow.

Select it with a recipe holding `plugins: [hvdscale_numpy]` and `framework: numpy` (this
directory on PYTHONPATH). It runs one process (no Horovod): `hvdscale train --no-horovod`.
Everything it registers is named by "package.module:attr" strings, so importing this package
loads nothing but the registry.
"""


def register() -> None:
    """This backend's one registration: trainer, keyword names, and its builders of the
    built-in optimizer `sgd` and model `mlp`."""
    from hvdscale.registry import BACKENDS, BackendInfo, register_backend
    if "numpy" in BACKENDS:          # imported again under another name: already there
        return
    register_backend(BackendInfo(
        "numpy", "NumPy on one CPU process (tests' fake backend; no Horovod)",
        trainer="hvdscale_numpy.trainer:NumpyTrainer", display="numpy", lr_name="lr",
        module="numpy", horovod=None, collectives=None,
        optimizers={"sgd": "hvdscale_numpy.nn:build_sgd"},
        models={"mlp": "hvdscale_numpy.nn:build_mlp"},
        model_check="hvdscale_numpy.nn:check_model"))


register()
