"""benchmarks/gpu_throughput.py --smoke runs its three paths (synthetic on the device, DALI,
the DataLoader + Pillow peer) on a CPU and ends with the JSON line launchers/gpu_check.sh keeps."""
import json
import subprocess
import sys

from conftest import REPO, job_env

KEYS = {"synthetic_img_s", "dali_img_s", "peer_img_s", "real_over_synthetic"}


def test_smoke_prints_the_throughput_keys(tmp_path):
    out = tmp_path / "throughput.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/gpu_throughput.py"), "--smoke",
                           "--threads", "1", "--out", str(out)], env=job_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert KEYS <= set(result) and result["smoke"] and result["model"] == "resnet20"
    assert result["synthetic_img_s"] > 0 and result["peer_img_s"] > 0
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        assert result["dali_img_s"] is None and "dali" in result["notes"]
    else:
        assert result["dali_img_s"] > 0
        assert result["real_over_synthetic"] == result["dali_img_s"] / result["synthetic_img_s"]
    assert json.loads(out.read_text()) == result
