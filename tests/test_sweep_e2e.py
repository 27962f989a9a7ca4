"""`hvdscale sweep` end to end on real Fashion-MNIST (a 4096-image subset, tiny budgets): the
runs train, the report, table, plots and the closing JSON line come out, bad input is one line."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, job_env

pytest.importorskip("torch")
DATA = Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="Debian's dataset-fashion-mnist missing")

SMALL = ["--target", "0.55", "--epochs", "0.5", "--min-steps", "4", "--train-limit", "4096",
         "--eval-examples", "512", "--noise-every", "2", "--no-progress",
         "--set", "lr.warmup_epochs=0.1"]


def _sweep(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "hvdscale.cli", "sweep", *map(str, args)],
                          env=job_env(), capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)


def _check_outputs(proc, out, batches):
    assert proc.returncode == 0, proc.stderr[-3000:]
    headline = json.loads(proc.stdout.strip().splitlines()[-1])
    assert headline["runs"] == len(batches) and headline["failed"] == 0
    results = json.loads((out / "results.json").read_text())
    runs = {r["batch_size"]: r for r in results["runs"]}
    assert sorted(runs) == batches
    small = runs[batches[0]]
    # the smallest batch learns past the (low) target and logs the online noise scale
    assert small["status"] == "ok" and small["steps_to_target"] is not None
    assert small["best_accuracy"] >= 0.55 and small["b_simple_trace"]
    assert results["command"].startswith("hvdscale sweep")
    text = (out / "report.md").read_text()
    assert "exceed perfect scaling" in text and "sgd_linear_warmup" in text
    for batch in batches:
        assert any(line.startswith(f"| {batch} | sgd_linear_warmup") for line in text.splitlines())
    for png in ("steps_vs_batch.png", "accuracy_vs_batch.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    return runs


def test_small_sweep_end_to_end(tmp_path):
    out = tmp_path / "sweep"
    proc = _sweep(REPO / "pipelines" / "sweep_sgd.yaml", "--batch-sizes", "128,1024",
                  "--max-per-worker", "256", "--out", out, *SMALL)
    runs = _check_outputs(proc, out, [128, 1024])
    big = runs[1024]
    assert (big["per_worker"], big["accumulation"]) == (256, 4)     # accumulation beyond 256
    assert big["steps_run"] == 4                                    # the step floor binds
    log = (out / "runs" / "sgd_linear_warmup_b1024_s42" / "metrics.jsonl").read_text()
    assert '"global_batch": 1024' in log
    # --report-only rebuilds the report from results.json without training
    (out / "report.md").unlink()
    again = _sweep("--report-only", "--out", out, "--no-progress")
    assert again.returncode == 0 and (out / "report.md").is_file()


@pytest.mark.parametrize("args,fragment", [
    (["--batch-sizes", "64,128"], "--target is required"),
    (["--batch-sizes", "64", "--target", "0.8"], "at least two batch sizes"),
    (["--batch-sizes", "64,128", "--target", "85"], "--target must be an accuracy"),
    (["--batch-sizes", "64,99", "--target", "0.8", "--np", "2"], "does not split evenly"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, fragment):
    proc = _sweep(REPO / "pipelines" / "sweep_sgd.yaml", *args, "--out", tmp_path, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hvdscale sweep: error:") and fragment in lines[0]


def test_missing_recipe_is_named(tmp_path):
    proc = _sweep(tmp_path / "nope.yaml", "--batch-sizes", "64,128", "--target", "0.8",
                  "--out", tmp_path, timeout=60)
    assert proc.returncode == 2 and "recipe not found" in proc.stderr


@pytest.mark.multiproc
def test_two_worker_sweep_runs_each_point_under_horovodrun(tmp_path):
    horovodrun_path = Path(sys.executable).parent / "horovodrun"
    if not horovodrun_path.exists():
        pytest.skip("horovodrun is not installed next to the interpreter")
    out = tmp_path / "sweep"
    proc = _sweep(REPO / "pipelines" / "sweep_sgd.yaml", "--batch-sizes", "128,512", "--np", "2",
                  "--out", out, *SMALL, timeout=300)
    runs = _check_outputs(proc, out, [128, 512])
    assert all(r["workers"] == 2 for r in runs.values())
    log = (out / "runs" / "sgd_linear_warmup_b128_s42" / "metrics.jsonl").read_text()
    assert '"workers": 2' in log and "b_simple" in log
