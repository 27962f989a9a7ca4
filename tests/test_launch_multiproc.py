"""Real runs of the commands `hvdscale launch` builds: two processes under mpirun and under
horovodrun (Gloo and MPI), with the thread count and forwarded variables checked inside the
workers, a Horovod allreduce across them, and `hvdscale train` itself once it exists."""
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import BIN, REPO, WORKERS, tool

pytestmark = pytest.mark.multiproc
PROBE = WORKERS / "launch_probe.py"
CLI = [sys.executable, "-c", "import sys; from hvdscale.cli import main; sys.exit(main())"]


def launch_env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # let the rule decide
    env.update({"PYTHONPATH": str(REPO), "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
                "TF_CPP_MIN_LOG_LEVEL": "2", "HOROVOD_HVDSCALE_PROBE": "forwarded"})
    env.update(extra)
    return env


def hvdscale_launch(*args, timeout=180):
    proc = subprocess.run([*CLI, "launch", *args], env=launch_env(), capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, (f"hvdscale launch {' '.join(args)} exited {proc.returncode}\n"
                                  f"--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-3000:]}")
    return proc


def ranks(out, size=2):
    seen = [json.loads((out / f"rank{r}.json").read_text()) for r in range(size)]
    assert [s["rank"] for s in seen] == list(range(size))
    assert all(s["size"] == size for s in seen)
    assert len({s["pid"] for s in seen}) == size          # two real processes
    return seen


def test_mpirun_runs_two_workers_with_the_thread_rule_and_forwarded_variables(tmp_path):
    # 8 "cores" per node / 2 workers = 4 threads each, set on the mpirun line
    hvdscale_launch("--launcher", "mpirun", "--np", "2", "--cores-per-node", "8", "--",
                    sys.executable, str(PROBE), str(tmp_path), timeout=60)
    for seen in ranks(tmp_path):
        assert seen["omp_num_threads"] == "4"
        assert seen["probe"] == "forwarded"


def _needs_horovod():
    tool("horovodrun")
    try:
        import horovod.torch  # noqa: F401
    except ImportError as err:
        pytest.skip(f"Horovod's torch extension does not import here: {err}")


def test_mpirun_horovod_allreduce(tmp_path):
    _needs_horovod()
    hvdscale_launch("--launcher", "mpirun", "--np", "2", "--cores-per-node", "4", "--",
                    sys.executable, str(PROBE), str(tmp_path), "--horovod")
    for seen in ranks(tmp_path):
        assert seen["allreduce_sum"] == 3.0                 # 1 + 2 over the two ranks
        assert seen["omp_num_threads"] == "2" and seen["torch_threads"] == 2
        assert seen["probe"] == "forwarded"


@pytest.mark.parametrize("controller", ["gloo", "mpi"])
def test_horovodrun_horovod_allreduce(tmp_path, controller):
    _needs_horovod()
    hvdscale_launch("--launcher", "horovodrun", "--controller", controller, "--np", "2",
                    "--cores-per-node", "4", "--", sys.executable, str(PROBE), str(tmp_path),
                    "--horovod")
    for seen in ranks(tmp_path):
        assert seen["allreduce_sum"] == 3.0
        assert seen["omp_num_threads"] == "2" and seen["torch_threads"] == 2
        assert seen["probe"] == "forwarded"


def _train_or_skip():
    _needs_horovod()
    if not (REPO / "hvdscale" / "commands" / "train.py").exists():
        pytest.skip("hvdscale train is not written yet (hvdscale/commands/train.py)")
    recipe = REPO / "pipelines" / "fashion_mnist_lamb.yaml"
    if not recipe.exists():
        pytest.skip("pipelines/fashion_mnist_lamb.yaml is not there yet")
    return recipe


def _summary(out):
    lines = (out / "metrics.jsonl").read_text().splitlines()
    summary = json.loads(lines[-1])
    assert summary.get("event") == "summary", lines[-1]
    return summary


@pytest.mark.parametrize("launcher, extra", [("mpirun", []), ("horovodrun", ["--controller", "gloo"])])
def test_launch_runs_hvdscale_train_on_two_workers(tmp_path, launcher, extra):
    recipe = _train_or_skip()
    out = tmp_path / "run"
    hvdscale_launch("--launcher", launcher, *extra, "--np", "2", "--",
                    "hvdscale", "train", str(recipe), "--out", str(out),
                    "--set", "train.max_steps=4", "--set", "train.eval_every_steps=4",
                    "--set", "lr.warmup=none",
                    "--set", "log.progress=false", "--set", "log.tensorboard=false", timeout=300)
    import yaml
    per_worker = yaml.safe_load(recipe.read_text())["batch"]["per_worker"]
    summary = _summary(out)
    assert summary["workers"] == 2
    assert summary["global_batch"] == 2 * per_worker


def test_elastic_job_grows_when_the_hosts_file_does(tmp_path):
    """horovodrun --elastic with launchers/hosts/discover_hosts.sh: one worker starts, the
    hosts file is replaced with one that has two slots, and the job carries on with two."""
    _needs_horovod()
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("localhost:1\n")
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen([*CLI, "launch", "--launcher", "horovodrun", "--controller", "gloo",
                             "--elastic", "--hostfile", str(hosts), "--np", "1", "--min-np", "1",
                             "--max-np", "2", "--cores-per-node", "2",
                             # without a NIC Horovod's elastic driver waits for two hosts
                             "--network-interface", "lo", "--",
                             sys.executable, str(WORKERS / "elastic_probe.py"), str(out), "2"],
                            env=launch_env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while not (out / "started").exists():
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "the first worker never started"
            time.sleep(0.5)
        grown = tmp_path / "hosts.new"
        grown.write_text("localhost:2\n")
        grown.replace(hosts)                        # one step, as docs/cluster.md says
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, output[-3000:]
    seen = ranks(out)
    assert all(s["world"] == 2 for s in seen)
    assert seen[0]["steps_before_growing"] >= 1 and seen[0]["sizes_seen"] == [1]
