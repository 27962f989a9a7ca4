"""`hvdscale bench`: synthetic data of the recipe's shape, tau_ref stored and read back,
scaling efficiency from it; the last printed line is JSON."""
import json
import os

import pytest

from hvdscale.cli import main

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ARGS = ["--no-horovod", "--steps", "3", "--warmup-steps", "1", "--set", "batch.per_worker=16",
        "--set", "train.threads=1"]


def last_json(text):
    return json.loads(text.strip().splitlines()[-1])


def test_bench_saves_and_uses_tau_ref(tmp_path, capsys):
    ref = tmp_path / "ref.json"
    assert main(["bench", *ARGS, "--save-ref", str(ref)]) == 0
    first = last_json(capsys.readouterr().out)
    assert first["workers"] == 1 and first["per_worker_batch"] == 16 and first["steps"] == 3
    assert first["images_per_sec"] == pytest.approx(16 * 3 / (first["time_per_step_s"] * 3))
    stored = json.loads(ref.read_text())
    assert stored["tau_ref"] == pytest.approx(first["images_per_sec_per_worker"])

    assert main(["bench", *ARGS, "--tau-ref", str(ref)]) == 0
    out = capsys.readouterr().out
    second = last_json(out)
    assert second["tau_ref"] == pytest.approx(stored["tau_ref"])
    assert second["scaling_efficiency"] == pytest.approx(
        second["images_per_sec"] / (1 * stored["tau_ref"]))
    assert "scaling eff." in out


def test_bench_rejects_bad_arguments(tmp_path, capsys):
    assert main(["bench", *ARGS, "--steps", "0"]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err
    bad = tmp_path / "ref.json"
    bad.write_text("{\"images\": 3}")
    assert main(["bench", *ARGS, "--tau-ref", str(bad)]) == 2
    assert "no numeric 'tau_ref'" in capsys.readouterr().err
    assert main(["bench", *ARGS, "--tau-ref", "-5"]) == 2
    assert "positive images/s" in capsys.readouterr().err
