"""launchers/gpu_check.sh --simulate: the GPU check's stages run on a CPU, offline, on a copy
of the tree, up to the first stage that needs CUDA; summary.json says how far they got.
(Marker gpu_simulate: `make test` leaves it out; `make test-gpu-simulate` runs it.)"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.gpu_simulate
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def tree_copy(dest):
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        if (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    return dest


def small_bundle(dest):
    """What launchers/gpu_prepare.sh puts there, less what the simulation does not open."""
    if not FASHION_MNIST.is_dir():
        pytest.skip("no Fashion-MNIST (Debian's dataset-fashion-mnist)")
    (dest / "fashion-mnist").mkdir(parents=True)
    for f in FASHION_MNIST.glob("*-ubyte*"):
        (dest / "fashion-mnist" / f.name).symlink_to(f)
    return dest


def test_simulation_runs_up_to_the_first_cuda_stage_offline(tmp_path):
    tree = tree_copy(tmp_path / "tree")
    bundle = small_bundle(tmp_path / "bundle")
    out = tmp_path / "out"
    offline = ["unshare", "-n"] if shutil.which("unshare") and subprocess.run(
        ["unshare", "-n", "true"]).returncode == 0 else []
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HVDSCALE_PYTHON": sys.executable,
           "HVDSCALE_GPU_BUNDLE": str(bundle)}
    proc = subprocess.run(offline + ["bash", str(tree / "launchers/gpu_check.sh"), "--simulate",
                                     str(out)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    summary = json.loads((out / "summary.json").read_text())
    status = {s["name"]: s["status"] for s in summary["stages"]}
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert summary["mode"] == "simulate" and summary["stopped_at"] == "allreduce"
    assert list(status)[:4] == ["host", "bundle", "horovod", "allreduce"]
    assert status["host"] == status["bundle"] == "ok"
    assert status["horovod"] in ("ok", "skipped")          # the installed one, if any
    assert status["allreduce"] == "needs_cuda"
    assert set(list(status.values())[4:]) == {"not_reached"}
    host = summary["host"]
    assert host["cuda_available"] is False and host["python"] == sys.version.split()[0]
    bundle_result = next(s["result"] for s in summary["stages"] if s["name"] == "bundle")
    assert bundle_result["fashion_mnist"]["x_train"] == [60000, 28, 28]
    # what the GPU run must fit: its stage limits, and at most 8 files coming back
    assert summary["limits_total_s"] == sum(s["limit_s"] for s in summary["stages"]) <= 540
    assert sorted(p.name for p in out.iterdir()) == ["check.log", "summary.json"]
    assert "======== bundle" in (out / "check.log").read_text()


def test_a_failing_stage_is_recorded_and_the_run_goes_on(tmp_path):
    """A bundle without Fashion-MNIST: that stage fails with its reason, later ones still run,
    and the exit status says something failed."""
    tree = tree_copy(tmp_path / "tree")
    (tmp_path / "bundle").mkdir()
    out = tmp_path / "out"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HVDSCALE_PYTHON": sys.executable,
           "HVDSCALE_GPU_BUNDLE": str(tmp_path / "bundle")}
    proc = subprocess.run(["bash", str(tree / "launchers/gpu_check.sh"), "--simulate", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    stages = {s["name"]: s for s in json.loads((out / "summary.json").read_text())["stages"]}
    assert proc.returncode == 1
    assert stages["bundle"]["status"] == "failed" and "Fashion-MNIST" in stages["bundle"]["reason"]
    assert stages["host"]["status"] == "ok" and stages["allreduce"]["status"] == "needs_cuda"


@pytest.mark.parametrize("stage", ["sync_free", "throughput"])
def test_measuring_stages_run_their_code_paths_on_a_cpu(stage):
    """--smoke: the CUDA stages' Python on the CPU, tiny (a typo must not cost a GPU call)."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/gpu_check_stages.py"), stage,
                           "--smoke", "--model", "resnet20", "--batch", "2", "--steps", "1",
                           "--warmup", "1", "--repeats", "1"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if stage == "sync_free":
        assert {result[o] for o in ("lamb", "lars", "sgd")} == {"passed"}
    else:
        for key in ("device_ours", "device_peer", "host_ours", "host_peer"):
            assert result[key]["median"] > 0 and len(result[key]["runs"]) == 1
