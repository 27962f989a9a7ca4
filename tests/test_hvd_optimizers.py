"""Horovod interplay, with real `horovodrun -np 2`: the optimizers see the averaged gradient, so
2 workers with per-worker batch b (and ACCUMULATION backward passes each) update exactly like one
process with the whole global batch -- for SGD, LARS and LAMB, in torch and in TensorFlow."""
import subprocess
import sys

import numpy as np
import pytest

from conftest import WORKERS, horovodrun, job_env, REPO

pytestmark = pytest.mark.multiproc
WORKER = WORKERS / "optim_hvd.py"


def single_process(framework, optimizer, accumulation, out):
    proc = subprocess.run([sys.executable, str(WORKER), framework, optimizer, str(accumulation), str(out),
                           "--single"], env=job_env(), capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return list(np.load(out / "single.npz").values())


@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("optimizer", ["sgd", "lars", "lamb"])
@pytest.mark.parametrize("framework", ["torch", "tensorflow"])
def test_two_workers_update_like_one_process_with_the_global_batch(tmp_path, framework, optimizer, accumulation):
    horovodrun(2, sys.executable, WORKER, framework, optimizer, accumulation, tmp_path, timeout=180)
    rank0 = list(np.load(tmp_path / "rank0.npz").values())
    rank1 = list(np.load(tmp_path / "rank1.npz").values())
    want = single_process(framework, optimizer, accumulation, tmp_path)
    for a, b, w in zip(rank0, rank1, want):
        assert a.tobytes() == b.tobytes(), "ranks disagree after the distributed steps"
        np.testing.assert_allclose(a, w, rtol=2e-5, atol=2e-6)
