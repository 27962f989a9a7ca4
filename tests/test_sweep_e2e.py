"""`hvdscale sweep` end to end on real Fashion-MNIST (1024 training, 500 validation and 500 test
images, one epoch, two batch sizes, two optimizers): both protocols, fresh seeds,
probe, fit, results.json schema (issue 21), report and plots; bad input is one line with
exit 2."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, job_env

pytest.importorskip("torch")
DATA = Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="Debian's dataset-fashion-mnist missing")

TOP = {"design", "runs", "summary", "positive_control", "noise"}
RUN = {"optimizer", "protocol", "role", "batch", "lr", "seed", "val_accuracy", "test_accuracy",
       "steps", "diverged"}


def _sweep(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "hvdscale.cli", "sweep", *map(str, args)],
                          env=job_env(), capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)


def test_tiny_study_end_to_end(tmp_path):
    out = tmp_path / "study"
    proc = _sweep("pipelines/sweep_sgd.yaml", "pipelines/sweep_lars.yaml",
                  "--batch-sizes", "32,128", "--target", "0.5", "--epochs", "1",
                  "--seeds", "1,2", "--train-limit", "1024", "--test-limit", "500",
                  "--validation", "500", "--ref-lr-factors", "1,2", "--probe", "16x16",
                  "--snapshots", "8", "--bootstrap", "20", "--jobs", "2", "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    headline = json.loads(proc.stdout.strip().splitlines()[-1])
    payload = json.loads((out / "results.json").read_text())
    assert TOP <= set(payload) and headline["runs"] == len(payload["runs"])
    d = payload["design"]
    assert (d["model"], d["train"], d["validation"], d["test"]) == ("mlp4", 1024, 500, 500)
    assert d["command"].startswith("hvdscale sweep pipelines/sweep_sgd.yaml")
    assert all(RUN <= set(r) for r in payload["runs"])
    # every run ran its epoch budget unless it diverged; test accuracy read at the end
    for r in payload["runs"]:
        assert r["diverged"] or r["steps"] == 1024 // r["batch"]
        assert 0 <= r["test_accuracy"] <= 1
    for opt in ("sgd", "lars"):
        for protocol in ("scaled", "tuned"):
            s = payload["summary"][opt][protocol]
            assert s["b_ref"] == 32 and s["b_max"] in (32, 128)
            assert set(s["drop_pp"]) == {"128"}
            for b, values in s["test_accuracy_values"].items():     # traces to the runs
                mine = [r["test_accuracy"] for r in payload["runs"] if r["optimizer"] == opt
                        and r["role"] == "measure" and r["batch"] == int(b) and
                        (r["protocol"] == protocol or b == "32")]
                assert sorted(values) == sorted(mine) and len(values) == 2
        n = payload["noise"][opt]
        assert set(n["b_crit"]) == {"estimate", "ci_low", "ci_high"}
        assert n["probes"][0]["over_training"] and n["probes"][0]["online_trace"]
    for name in ("report.md", "steps_vs_batch.png", "accuracy_vs_batch.png", "noise_scale.png"):
        assert (out / name).stat().st_size > 0
    text = (out / "report.md").read_text()
    assert "Positive control" in text and "lars, scaled: b_max" in text
    assert set(payload["limit"]["lars"]) == {"scaled", "tuned"}


def test_plan_prints_the_runs_and_a_timed_estimate(tmp_path):
    proc = _sweep("pipelines/sweep_sgd.yaml", "pipelines/sweep_lamb.yaml", "--batch-sizes",
                  "32,128", "--target", "0.8", "--epochs", "3", "--seeds", "1,2,3",
                  "--train-limit", "1024", "--validation", "500", "--probe", "16x16",
                  "--plan", "--out",
                  tmp_path / "never")
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads(proc.stdout.strip().splitlines()[-1])
    # per optimizer: settle (3 lrs; x 2 beta2 for LAMB) + at most 3 grid extensions, scaled
    # 2 x 3 seeds, tuned 4 + at most 3 extensions + 3
    assert plan["runs"] == (3 + 3 + 6 + 10) + (6 + 3 + 6 + 10)
    assert plan["runs_by_kind"]["sgd_linear_warmup tuned/tune (grid extensions, at most)"] == 3
    assert set(plan["per_step_s"]) == {"32", "128"} and all(
        v > 0 for v in plan["per_step_s"].values())
    assert plan["wall_s_estimate"] > 0 and "load_start" in plan
    assert not (tmp_path / "never").exists()        # --plan trains nothing else, writes nothing


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


def test_report_only_refuses_an_old_results_file(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps({"meta": {}, "settings_results": [],
                                                       "runs": []}))
    proc = _sweep("--report-only", "--out", tmp_path, timeout=60)
    assert proc.returncode == 2
    assert "layout from before issue 21" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
