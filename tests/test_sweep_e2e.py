"""`hvdscale sweep` end to end on real Fashion-MNIST (a 3000-image subset, a low target, two
batch sizes, two settings): tuning, fresh seeds, probe, fit, results.json schema, report and
plots; bad input is one line with exit 2."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, job_env

pytest.importorskip("torch")
DATA = Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="Debian's dataset-fashion-mnist missing")

KEYS = {"setting", "optimizer", "seeds", "lr_grid", "b_crit", "b_crit_fits", "b_noise",
        "predicted_over_measured", "b_ref", "b_max", "positive_control_batch", "accuracy_pct",
        "drop_pp"}


def _sweep(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "hvdscale.cli", "sweep", *map(str, args)],
                          env=job_env(), capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)


def test_tiny_study_end_to_end(tmp_path):
    out = tmp_path / "study"
    proc = _sweep("pipelines/sweep_sgd.yaml", "pipelines/sweep_lars.yaml",
                  "--batch-sizes", "16,64,256", "--target", "0.6", "--seeds", "1,2",
                  "--train-limit", "3000", "--eval-examples", "500", "--expected-epochs", "0.3",
                  "--accuracy-epochs", "0.3", "--probe", "16x16", "--bootstrap", "20",
                  "--max-extend", "1", "--noise-every", "4", "--threads", "1", "--jobs", "2",
                  "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    headline = json.loads(proc.stdout.strip().splitlines()[-1])
    payload = json.loads((out / "results.json").read_text())
    assert headline["runs"] == len(payload["runs"])
    assert payload["meta"]["command"].startswith("hvdscale sweep pipelines/sweep_sgd.yaml")
    for s in payload["settings_results"]:
        assert KEYS <= set(s)
        assert s["seeds"] == 2
        assert all(len(v) >= 3 for v in s["lr_grid"].values())
        assert set(s["b_crit"]) == {"estimate", "ci_low", "ci_high"}
        noise = s["b_noise"]
        assert noise["estimate"] > 0 and noise["ci_low"] <= noise["estimate"] <= noise["ci_high"]
        assert noise["snapshots"] >= 3
        fits = s["b_crit_fits"]
        assert {"all", "without_smallest"} <= set(fits)
        assert s["b_crit"]["ci_low"] <= fits["all"]["ci_low"] <= fits["all"]["ci_high"] \
            <= s["b_crit"]["ci_high"]
        assert s["b_ref"] == 16 and s["b_max"] in (16, 64, 256)
        assert set(s["drop_pp"]) == {"64", "256"}
        for probe in s["probes"]:      # window probes lie within +-25 % of the seed's target
            assert all(abs(w["offset"]) <= 0.25 for w in probe["window"])
        assert s["probes"][0]["over_training"]
    assert all("b_noise_layerwise_at_target" not in s for s in payload["settings_results"])
    small = [r for r in payload["runs"] if r["batch_size"] == 16 and r["role"] == "measure"]
    assert all(r["status"] == "reached" for r in small)
    for r in small:   # the crossing lies between the two evaluations around the target
        i = next(k for k, (_, acc, _) in enumerate(r["evals"]) if acc >= 0.6)
        assert r["evals"][i - 1][0] < r["steps_to_target"] <= r["evals"][i][0]
        assert r["accuracy_at_budget"] is not None
    for name in ("report.md", "steps_vs_batch.png", "tradeoff.png", "accuracy_vs_batch.png",
                 "noise_scale.png"):
        assert (out / name).stat().st_size > 0
    assert "predicted / measured" in (out / "report.md").read_text()


@pytest.mark.parametrize("args, needle", [
    (["pipelines/sweep_sgd.yaml", "--target", "0.8"], "--batch-sizes is required"),
    (["pipelines/sweep_sgd.yaml", "--batch-sizes", "32,64", "--target", "0.8", "--seeds", "0,1"],
     "fresh seeds"),
    (["nope.yaml", "--batch-sizes", "32,64", "--target", "0.8"], "recipe not found"),
])
def test_bad_input_is_one_line(args, needle):
    proc = _sweep(*args, timeout=60)
    assert proc.returncode == 2
    assert needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
