"""The registries (hvdscale/registry.py) and the one set of optimizer defaults
(hvdscale/core/optimizers.py): names, defaults and each framework's keywords come from one
place; config validation, --help, the docs table and both factories read it; a new optimizer
is one module plus one registration."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hvdscale import launch, registry
from hvdscale.config import config_from_dict
from hvdscale.core.optimizers import DEFAULTS, OPTIONS
from hvdscale.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
EXTENDING = REPO / "docs" / "extending.md"


def native_kwargs(framework, values):
    return registry.BACKENDS.get(framework).native_kwargs(values)


def test_docs_table_is_the_registry():
    text = EXTENDING.read_text()
    found = re.search(r"<!-- optimizer-table:begin -->\n(.*?)\n<!-- optimizer-table:end -->",
                      text, re.S)
    assert found, "docs/extending.md lost its optimizer table markers"
    assert found.group(1).strip() == registry.optimizer_table(), \
        "docs/extending.md's table differs from the registry: paste registry.optimizer_table()"


def test_every_optimizer_option_is_a_recipe_key_with_the_registry_default():
    for info in registry.OPTIMIZERS:
        cfg = config_from_dict({"optimizer": {"name": info.name}})
        for key, default in info.defaults.items():
            want = list(default) if isinstance(default, tuple) else default
            assert getattr(cfg.optimizer, key) == want, (info.name, key)
    # the factory-only options of before are settable from a recipe and checked
    cfg = config_from_dict({"optimizer": {"name": "lamb", "bias_correction": False,
                                          "clamp_value": 10, "max_trust_ratio": 5}})
    assert (cfg.optimizer.bias_correction, cfg.optimizer.clamp_value,
            cfg.optimizer.max_trust_ratio) == (False, 10.0, 5.0)
    assert config_from_dict({"optimizer": {"name": "sgd", "nesterov": True}}).optimizer.nesterov
    with pytest.raises(ConfigError, match=r"optimizer\.max_trust_ratio: must be > 0"):
        config_from_dict({"optimizer": {"max_trust_ratio": 0}})
    with pytest.raises(ConfigError, match=r"optimizer\.nesterov: expected true or false"):
        config_from_dict({"optimizer": {"name": "sgd", "nesterov": "yes"}})


def test_native_names_follow_each_ecosystem():
    values = {"betas": (0.8, 0.9), "eps": 1e-7, "weight_decay": 0.1}
    assert native_kwargs("torch", values) == {"betas": (0.8, 0.9), "eps": 1e-7,
                                              "weight_decay": 0.1}
    assert native_kwargs("tensorflow", values) == {"beta_1": 0.8, "beta_2": 0.9,
                                                   "epsilon": 1e-7, "weight_decay": 0.1}
    assert set(DEFAULTS) == set(registry.OPTIMIZERS.names()) >= {"sgd", "lars", "lamb", "adamw"}
    assert all(key in OPTIONS for d in DEFAULTS.values() for key in d)


def test_unknown_names_list_the_registry():
    with pytest.raises(ConfigError, match=r"optimizer\.name: 'adagrad' is not one of sgd, sgdw, "
                                          r"lars, lamb, adamw"):
        registry.OPTIMIZERS.get("adagrad")
    with pytest.raises(ConfigError, match=r"model\.name: 'vgg' is not one of cnn, .* or "
                                          r"package\.module:factory"):
        config_from_dict({"model": {"name": "vgg"}})
    with pytest.raises(ConfigError, match=r"data\.kind: 'cifar' is not one of fashion_mnist"):
        config_from_dict({"data": {"kind": "cifar"}})
    with pytest.raises(ValueError, match="already registered"):
        registry.register_optimizer(registry.OPTIMIZERS.get("sgd"))


def test_train_help_lists_the_registry(capsys):
    from hvdscale.cli import main
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for name in (*registry.OPTIMIZERS.names(), *registry.MODELS.names(),
                 *registry.DATA_KINDS.names(), "max_trust_ratio=null", "package.module:factory"):
        assert name in out, name


def test_a_registered_launcher_is_used_by_the_command_builder():
    info = registry.register_launcher(registry.LauncherInfo(
        "echo-launcher", "prints the worker command",
        lambda layout, plan, env: ["echo", f"np={plan.np}", *layout.command]))
    try:
        argv = launch.build_command(launch.Layout("echo-launcher", ("hvdscale", "train"), np=3),
                                    {})
        assert argv == ["echo", "np=3", "hvdscale", "train"]
    finally:
        registry.LAUNCHERS.unregister(info.name)
    with pytest.raises(ConfigError, match="unknown launcher 'echo-launcher'"):
        launch.build_command(launch.Layout("echo-launcher", ("x",), np=1), {})


def test_a_registered_launcher_missing_from_path_is_one_line(monkeypatch):
    """`hvdscale launch` names what to do from the launcher's own entry (a registered one
    with no hint gets the default), not from a table of the built-in names."""
    import argparse
    from hvdscale.commands import launch as launch_cmd
    from hvdscale.launch import machine
    info = registry.register_launcher(registry.LauncherInfo(
        "nosuch-launcher", "not installed anywhere",
        lambda layout, plan, env: ["nosuch-launcher", *layout.command]))
    try:
        parser = argparse.ArgumentParser()
        launch_cmd.add_arguments(parser)
        args = parser.parse_args(["--launcher", "nosuch-launcher", "--np", "1", "--", "true"])
        monkeypatch.setenv("PATH", "/nonexistent")
        for name in machine.RANK_VARIABLES:     # when run inside a launched job
            monkeypatch.delenv(name, raising=False)
        with pytest.raises(ConfigError, match="^nosuch-launcher not found on PATH: install it, "
                                              "or pick another --launcher$"):
            launch_cmd.run(args)
    finally:
        registry.LAUNCHERS.unregister(info.name)


def test_errors_module_stands_alone():
    source = (REPO / "hvdscale" / "errors.py").read_text()
    assert not re.search(r"^\s*(from|import)\s+hvdscale", source, re.M)
    from hvdscale.errors import ConfigError as CE, DataError, HvdscaleError
    assert issubclass(CE, ValueError) and issubclass(DataError, ValueError)
    assert issubclass(CE, HvdscaleError)


def test_engine_imports_no_framework():
    for path in (REPO / "hvdscale" / "engine").glob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(import|from)\s+(torch|tensorflow)\b", text, re.M), path


def test_toy_optimizer_plugin_trains_through_hvdscale_train(tmp_path):
    """docs/extending.md's example: examples/byo/sign_sgd.py, named in `plugins`."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.pathsep.join([str(REPO / "examples" / "byo"), str(REPO)]))
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "hvdscale", "train", "--no-horovod", "--out", str(out),
         "--set", "plugins=[sign_sgd]", "--set", "optimizer.name=signsgd",
         "--set", "optimizer.base_lr=0.002", "--set", "optimizer.momentum=0.8",
         "--set", "model.name=mlp", "--set", "data.train_limit=4096",
         "--set", "data.test_limit=500", "--set", "batch.per_worker=64",
         "--set", "train.max_steps=40", "--set", "lr.warmup_steps=2",
         "--set", "checkpoint.every_epochs=null", "--set", "log.progress=false",
         "--set", "log.tensorboard=false"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "optimizer signsgd (momentum 0.8, weight_decay 0.01)" in proc.stdout, proc.stdout
    summary = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert summary["optimizer"] == "signsgd" and summary["steps"] == 40
    assert summary["final_test_accuracy"] > 0.6, summary     # chance is 0.1


def test_both_frameworks_build_every_optimizer_with_the_same_defaults():
    torch = pytest.importorskip("torch")
    keras = pytest.importorskip("keras")
    from hvdscale.tensorflow.optim import build_optimizer as keras_optimizer
    from hvdscale.torch.optim import build_optimizer as torch_optimizer
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    for info in registry.OPTIMIZERS:
        t = torch_optimizer(info.name, net, 0.1)
        k = keras_optimizer(info.name, 0.1)
        group = t.param_groups[0]          # the decayed group
        for key, default in info.defaults.items():
            for name, value in native_kwargs("torch", {key: default}).items():
                assert group[name] == value, (info.name, "torch", name)
            for name, value in native_kwargs("tensorflow", {key: default}).items():
                got = getattr(k, "layerwise_weight_decay", k.weight_decay) \
                    if name == "weight_decay" else getattr(k, name)
                assert (got or 0.0) == pytest.approx(value or 0.0), (info.name, "keras", name)
    assert isinstance(k, keras.optimizers.Optimizer)


def test_keras_sgd_and_adamw_keep_the_exclusion_rule_through_their_config():
    pytest.importorskip("keras")
    from hvdscale.tensorflow.optim import build_optimizer
    for name in ("sgd", "adamw"):
        opt = build_optimizer(name, 0.1, {"exclude_1d": False, "exclude": ["bias$"],
                                          "weight_decay": 0.1})
        copy = type(opt).from_config(opt.get_config())
        assert (copy._rule.exclude_1d, copy._rule.patterns) == (False, ("bias$",)), name


def test_an_option_registered_by_a_plugin_is_a_checked_recipe_key():
    from hvdscale.core import optimizers as core
    spec = core.register_option(core.OptionSpec("toy_power", float, "toy exponent",
                                                lambda v: v >= 1, "must be >= 1",
                                                native={"tensorflow": ("power",)}))
    info = registry.register_optimizer(registry.OptimizerInfo(
        "toy", "a toy", {"toy_power": 2.0, "weight_decay": 0.0}, {"torch": "x:y"}))
    try:
        cfg = config_from_dict({"optimizer": {"name": "toy", "toy_power": 3}})
        assert cfg.optimizer.toy_power == 3.0 and cfg.optimizer.weight_decay == 0.0
        assert cfg.to_dict()["optimizer"]["toy_power"] == 3.0
        assert config_from_dict({"optimizer": {"name": "toy"}}).optimizer.toy_power == 2.0
        with pytest.raises(ConfigError, match=r"optimizer\.toy_power: must be >= 1, got 0\.5"):
            config_from_dict({"optimizer": {"name": "toy", "toy_power": 0.5}})
        with pytest.raises(ConfigError, match="'toy' has no tensorflow version"):
            config_from_dict({"framework": "tensorflow", "optimizer": {"name": "toy"}})
        assert native_kwargs("tensorflow", {"toy_power": 3.0}) == {"power": 3.0}
        assert "| `toy` | `toy_power` | 2 | `toy_power` | `power` |" in registry.optimizer_table()
    finally:
        registry.OPTIMIZERS.unregister("toy")
        del core.OPTIONS[spec.key]
    with pytest.raises(ConfigError, match="unknown key 'toy_power' in optimizer"):
        config_from_dict({"optimizer": {"toy_power": 3}})
