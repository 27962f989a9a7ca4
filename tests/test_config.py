"""Recipe validation: every bad input is one clear ConfigError, found before any framework
import, and the CLI turns it into one line on stderr with exit code 2."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hvdscale.config import (DEFAULT_RECIPE, apply_overrides, config_from_dict, load_config,
                             parse_override)
from hvdscale.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "pipelines").glob("*.yaml"))


@pytest.mark.parametrize("raw, message", [
    ({"batch": {"per_worker": 0}}, "batch.per_worker: must be > 0"),
    ({"batch": {"accumulation": -2}}, "batch.accumulation: must be > 0"),
    ({"optimizer": {"base_lr": -0.1}}, "optimizer.base_lr: must be > 0"),
    ({"optimizer": {"name": "adam"}}, "optimizer.name: 'adam' is not one of sgd, sgdw, lars, lamb, adamw"),
    ({"optimizer": {"betas": [0.9]}}, "optimizer.betas: expected two numbers"),
    ({"optimizer": {"betas": [0.9, 1.0]}}, "optimizer.betas: must be two numbers in [0, 1)"),
    ({"train": {"epochs": 2}, "lr": {"warmup_epochs": 3}}, 
     "lr.warmup_epochs (3) is longer than training (train.epochs = 2)"),
    ({"train": {"max_steps": 10}, "lr": {"warmup_steps": 50}},
     "lr.warmup_steps (50) is longer than training"),
    ({"train": {"target_accuracy": 1.5}}, "train.target_accuracy: must be in (0, 1]"),
    ({"train": {"target_accuracy": 0}}, "train.target_accuracy: must be in (0, 1]"),
    ({"train": {"epochs": "three"}}, "train.epochs: expected a number, got 'three'"),
    ({"train": {"max_steps": 2.5}}, "train.max_steps: expected an integer"),
    ({"log": {"progress": "yes"}}, "log.progress: expected true or false"),
    ({"framework": "jax"}, "framework: 'jax' is not one of torch, tensorflow"),
    ({"optimiser": {}}, "unknown key 'optimiser'"),
    ({"model": {"name": "cnn", "depth": 3}}, "unknown key 'depth' in model"),
    ({"data": {"image_size": 32}}, "fashion_mnist is 28x28 with 10 classes"),
    ({"lr": {"decay": "multistep"}}, "lr.decay multistep needs lr.milestones"),
    ({"lr": {"decay": "multistep", "milestones": [1, 5]}, "train": {"epochs": 3}},
     "lr.milestones: 5 is not before the end of training"),
    ({"lr": {"milestones": [3, 1]}}, "lr.milestones: must be increasing positive epochs"),
    ({"model": {"label_smoothing": 1.0}}, "model.label_smoothing: must be in [0, 1)"),
    ({"batch": {"per_worker": True}}, "batch.per_worker: expected a number, got True"),
    ({"train": {"seed": float("nan")}}, "train.seed: must be finite"),
])
def test_bad_values_are_one_line_config_errors(raw, message):
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_defaults_and_types():
    cfg = config_from_dict({"optimizer": {"base_lr": "1e-3"}, "train": {"epochs": 2}})
    assert cfg.optimizer.base_lr == pytest.approx(1e-3)    # YAML's 1e-3-is-a-string quirk
    assert isinstance(cfg.train.epochs, float) and cfg.batch.per_worker == 128
    assert cfg.in_channels == 1
    assert config_from_dict({"data": {"kind": "synthetic", "image_size": 32}}).in_channels == 3


def test_overrides_are_yaml_values_on_dotted_keys():
    raw = apply_overrides({"optimizer": {"name": "sgd"}},
                          ["framework=tensorflow", "optimizer.betas=[0.8, 0.99]",
                           "train.max_steps=null", "horovod.fp16_compression=true"])
    cfg = config_from_dict(raw)
    assert cfg.framework == "tensorflow" and cfg.optimizer.name == "sgd"
    assert cfg.optimizer.betas == [0.8, 0.99] and cfg.train.max_steps is None
    assert cfg.horovod.fp16_compression is True
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_override("framework")
    with pytest.raises(ConfigError, match="unknown section 'trian'"):
        apply_overrides({}, ["trian.epochs=3"])
    with pytest.raises(ConfigError, match="unknown key 'epoch' in train"):
        load_config(DEFAULT_RECIPE, ["train.epoch=3"])


def test_load_config_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("batch: {per_worker: 0}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: batch\.per_worker: must be > 0"):
        load_config(bad)
    with pytest.raises(ConfigError, match="recipe not found"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("batch: {per_worker: 4\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_shipped_recipes_validate(recipe):
    cfg = load_config(recipe)
    assert cfg.name
    assert load_config(recipe, ["framework=tensorflow"]).framework == "tensorflow"


def test_cli_rejects_bad_recipe_with_exit_2_before_importing_frameworks(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(textwrap.dedent("""\
        name: bad
        batch: {per_worker: 0}
    """))
    probe = ("import sys; from hvdscale.cli import main; rc = main(sys.argv[1:]); "
             "print('loaded:', sorted(m for m in ('torch', 'tensorflow', 'horovod') "
             "if m in sys.modules)); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", probe, "train", str(bad)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"hvdscale train: error: {bad}: batch.per_worker: must be > 0, got 0"]
    assert "loaded: []" in proc.stdout
