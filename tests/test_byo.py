"""Bring your own model and data: `model.name` / `data.kind` as "package.module:factory".

The worked example (examples/byo) trains under `horovodrun -np 2` in both frameworks; every
kind of bad entry point is refused with one line naming it and exit code 2 (in-process through
the CLI's main, one plain process, which is where the checks live; test_bad_input covers the
all-ranks behaviour of such errors under horovodrun)."""
import json
import os
from pathlib import Path

import pytest

from conftest import REPO, horovodrun, tool

BYO = REPO / "examples" / "byo"
PLUGINS = Path(__file__).resolve().parent / "plugins"
RECIPE = BYO / "recipe.yaml"
QUIET = ["--set", "log.progress=false", "--set", "log.tensorboard=false"]


@pytest.fixture
def on_path(monkeypatch):
    for folder in (BYO, PLUGINS):
        monkeypatch.syspath_prepend(str(folder))


def hvdscale_train(args, capsys):
    """`hvdscale train ARGS` in this process: (exit code, stderr lines)."""
    from hvdscale.cli import main
    code = main(["train", *map(str, args)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return code, err


BAD_ENTRY_POINTS = {
    "module_missing": (["--set", "model.name=no_such_module:build"],
                       "model.name 'no_such_module:build': no module named 'no_such_module'"),
    "attribute_missing": (["--set", "model.name=byo_models:make"],
                          "model.name 'byo_models:make': byo_models has no attribute 'make'"),
    "not_callable": (["--set", "model.name=bad_factories:NOT_CALLABLE"],
                     "NOT_CALLABLE is a int, not a callable factory"),
    "factory_raises": (["--set", "model.name=bad_factories:raises"],
                       "model.name 'bad_factories:raises': the factory failed (RuntimeError: "
                       "cannot reach the weights server)"),
    "wrong_type": (["--set", "model.name=bad_factories:returns_string"],
                   "model.name 'bad_factories:returns_string': returned str, expected a "
                   "torch.nn.Module"),
    "wrong_output": (["--set", "model.name=bad_factories:wrong_classes"],
                     "returns [2, 3] for a batch of 2, expected logits [2, 4]"),
    "wrong_input": (["--set", "model.name=bad_factories:wrong_input"],
                    "the model fails on images of shape [2, 1, 16, 16]"),
    "data_module_missing": (["--set", "data.kind=no_such_data:load"],
                            "data.kind 'no_such_data:load': no module named 'no_such_data'"),
    "data_not_a_pair": (["--set", "data.kind=bad_factories:not_a_pair"],
                        "data.kind 'bad_factories:not_a_pair': expected ((x_train, y_train), "
                        "(x_test, y_test)), got ndarray"),
    "data_wrong_shape": (["--set", "data.kind=bad_factories:wrong_shape"],
                         "train images have shape (64, 16, 16, 3), expected [N, 16, 16, 1]"),
    "data_labels": (["--set", "data.kind=bad_factories:labels_out_of_range"],
                    "train labels span 0..6, outside 0..3 (data.num_classes 4)"),
}


@pytest.mark.parametrize("case", sorted(BAD_ENTRY_POINTS))
def test_bad_entry_point_is_one_line_and_exit_2(case, on_path, capsys, tmp_path):
    extra, words = BAD_ENTRY_POINTS[case]
    code, err = hvdscale_train([RECIPE, "--no-horovod", *QUIET, *extra,
                                "--out", tmp_path / "run"], capsys)
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("hvdscale train: error: "), err
    assert words in err[0], err[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.multiproc
@pytest.mark.parametrize("framework", ["torch", "tensorflow"])
def test_byo_recipe_trains_under_horovodrun(framework, tmp_path):
    out = tmp_path / "run"
    pythonpath = os.pathsep.join([str(BYO), str(REPO), os.environ.get("PYTHONPATH", "")])
    proc = horovodrun(2, tool("hvdscale"), "train", RECIPE, "--set", f"framework={framework}",
                      *QUIET, "--out", out, timeout=240, PYTHONPATH=pythonpath)
    assert "model byo_models:build, data byo_data:load" in proc.stdout + proc.stderr
    summary = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert summary["workers"] == 2 and summary["framework"] == framework
    assert summary["steps"] == 2048 // 64
    # the patterns are easy: a real model on real batches learns them within the epoch
    assert summary["final_test_accuracy"] > 0.9, summary


@pytest.mark.multiproc
def test_bad_entry_point_is_refused_by_every_rank(tmp_path):
    """Under horovodrun -np 2 both ranks stop with the same line and exit 2, no rank waits."""
    from test_bad_input import refused_by_every_rank
    pythonpath = os.pathsep.join([str(BYO), str(PLUGINS), str(REPO),
                                  os.environ.get("PYTHONPATH", "")])
    proc = horovodrun(2, tool("hvdscale"), "train", RECIPE, *QUIET,
                      "--set", "model.name=bad_factories:wrong_classes", "--out", tmp_path / "run",
                      check=False, timeout=120, PYTHONPATH=pythonpath)
    refused_by_every_rank(proc, "model.name 'bad_factories:wrong_classes': the model returns "
                                "[2, 3] for a batch of 2, expected logits [2, 4]")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
