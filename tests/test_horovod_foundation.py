"""The install works: Horovod collectives and one distributed step, for torch and TF, over
Gloo (horovodrun --gloo), MPI (horovodrun --mpi) and plain mpirun, with real processes."""
import json
import sys

import numpy as np
import pytest

from conftest import WORKERS, horovodrun, mpirun, run_job, tool

pytestmark = pytest.mark.multiproc
WORKER = WORKERS / "hvd_foundation.py"
SIZE = 2


def _single_process_reference(steps=3, lr=0.1):
    """One process, full batch: what K workers with the averaged gradient must reproduce."""
    sys.path.insert(0, str(WORKERS))
    import hvd_foundation as w
    x, y = w.problem()
    wt, b = (a.astype(np.float64) for a in w.initial_weights(0))  # rank 0's init is broadcast
    x, y = x.astype(np.float64), y.astype(np.float64)
    n_sub = len(x) // SIZE
    for _ in range(steps):
        # mean over ranks of each rank's mean-squared-error gradient (equal shard sizes)
        err = x @ wt + b - y
        gw = 2 * x.T @ err / (n_sub * w.N_OUT) / SIZE
        gb = 2 * err.sum(0) / (n_sub * w.N_OUT) / SIZE
        wt, b = wt - lr * gw, b - lr * gb
    return wt, b


def _load(out):
    ranks = []
    for r in range(SIZE):
        meta = json.loads((out / f"rank{r}.json").read_text())
        arrays = dict(np.load(out / f"rank{r}.npz"))
        ranks.append((meta, arrays))
    return ranks


def _check(ranks, controller, with_mpi4py=False):
    (m0, a0), (m1, a1) = ranks
    for r, (meta, arr) in enumerate(ranks):
        assert meta["rank"] == r and meta["size"] == SIZE
        assert meta[controller] is True, f"rank {r} did not run on {controller}: {meta}"
        base_sum = sum(np.arange(4) + k for k in range(SIZE))
        np.testing.assert_array_equal(arr["allreduce_sum"], base_sum)
        np.testing.assert_allclose(arr["allreduce_avg"], base_sum / SIZE)
        # allgather concatenates variable first dimensions in rank order: rank k gives k+1 rows
        expected_rows = np.concatenate([np.full((k + 1, 2), float(k)) for k in range(SIZE)])
        np.testing.assert_array_equal(arr["allgather"], expected_rows)
        np.testing.assert_array_equal(arr["broadcast"], [1.0])
        if with_mpi4py:
            assert meta["mpi4py_rank"] == r
            assert meta["mpi4py_sum"] == SIZE * (SIZE + 1) // 2
    # after the distributed steps the parameters are bitwise equal on both ranks ...
    assert a0["w"].tobytes() == a1["w"].tobytes()
    assert a0["b"].tobytes() == a1["b"].tobytes()
    # ... and equal to one process stepping on the union of the data
    w_ref, b_ref = _single_process_reference()
    np.testing.assert_allclose(a0["w"], w_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a0["b"], b_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("framework", ["torch", "tensorflow"])
@pytest.mark.parametrize("controller", ["gloo", "mpi"])
def test_horovodrun_collectives_and_step(tmp_path, framework, controller):
    horovodrun(SIZE, sys.executable, WORKER, framework, tmp_path, controller=controller)
    _check(_load(tmp_path), controller)


@pytest.mark.parametrize("framework", ["torch", "tensorflow"])
def test_plain_mpirun_with_mpi4py(tmp_path, framework):
    mpirun(SIZE, sys.executable, WORKER, framework, tmp_path, "--with-mpi4py")
    _check(_load(tmp_path), "mpi", with_mpi4py=True)


def test_check_build_lists_both_frameworks_and_controllers():
    out = run_job([tool("horovodrun"), "--check-build"]).stdout
    for item in ("PyTorch", "TensorFlow", "Gloo", "MPI"):
        assert f"[X] {item}" in out, out


def test_doctor_reports_a_ready_node():
    proc = run_job([tool("hvdscale"), "doctor", "--json"], check=False)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0, report
    assert report["verdict"].startswith("OK")
    assert report["horovod"] == "0.28.1"
    assert report["horovod_build"]["gloo"] and report["horovod_build"]["mpi"]
    assert report["horovod_build"]["torch"] and report["horovod_build"]["tensorflow"]
    # what plain horovodrun runs when both are built (its own rule: MPI first)
    assert report["launch_controller"] == "mpi"
    assert report["cpu"]["cores"] >= 1 and isinstance(report["cpu"]["native_bf16"], list)
    # TensorFlow's C++ start-up lines are filtered (hvdscale/tensorflow/quiet.py)
    assert "absl::InitializeLog" not in proc.stderr and "cuda drivers" not in proc.stderr, \
        proc.stderr


def test_doctor_verdict_fails_when_a_requirement_is_missing():
    # NCCL cannot be built into a CPU-only install: insisting on it must give a non-zero verdict.
    proc = run_job([tool("hvdscale"), "doctor", "--require", "torch,nccl"], check=False)
    assert proc.returncode == 1
    assert proc.stdout.strip().splitlines()[-1] == "NOT READY: missing: nccl"
