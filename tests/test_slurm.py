"""The SLURM templates run exactly the srun line `hvdscale launch --launcher srun --dry-run`
prints for the same layout. The templates run under bash with an allocation's SLURM_*
variables and a stand-in `srun` on PATH that records its argv (no Slurm here; the thing under
test is our script). Also: bash -n and shellcheck on every shell script we ship."""
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO

SLURM = REPO / "launchers" / "slurm"
RECIPE_ARGS = ["pipelines/imagenet_resnet50_goyal.yaml", "--set", "train.max_steps=5",
               "--set", "name=two words"]


@pytest.fixture
def cluster(tmp_path):
    """A fake checkout with .venv/bin/hvdscale (this interpreter's hvdscale) and a bin/ with a
    recording srun and scontrol; returns a function that runs a script in a fake allocation."""
    home = tmp_path / "checkout"
    venv_bin = home / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    hvdscale = venv_bin / "hvdscale"
    hvdscale.write_text(f"#!/bin/sh\nPYTHONPATH={shlex.quote(str(REPO))} exec "
                        f"{shlex.quote(sys.executable)} -c "
                        "'import sys; from hvdscale.cli import main; sys.exit(main())' \"$@\"\n")
    hvdscale.chmod(0o755)
    (home / "launchers").symlink_to(REPO / "launchers")   # the templates source preemption.sh
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    record = tmp_path / "srun.argv"
    started = []                    # templates started in the background (start())
    srun = fake_bin / "srun"
    # One argument per NUL-terminated record, so spaces and newlines survive. With
    # FAKE_SRUN_WAIT=1 it waits for USR1/TERM like a running job step, records the signal,
    # creates FAKE_SRUN_MARKER if set (a rank's OUT/preempted.json) and exits FAKE_SRUN_EXIT.
    srun.write_text(f"#!/bin/sh\nprintf '%s\\0' \"$@\" > {shlex.quote(str(record))}\n"
                    f"pwd > {shlex.quote(str(record))}.cwd\n"
                    f"echo \"$HVDSCALE_REQUEUE_EXIT_CODE\" > {shlex.quote(str(record))}.code\n"
                    '[ "${FAKE_SRUN_WAIT:-0}" = 1 ] || exit 0\n'
                    f"got() {{ echo \"$1\" >> {shlex.quote(str(record))}.signals\n"
                    '  [ -z "$FAKE_SRUN_MARKER" ] || { mkdir -p "$(dirname "$FAKE_SRUN_MARKER")"; '
                    'echo "{}" > "$FAKE_SRUN_MARKER"; }\n'
                    '  exit "${FAKE_SRUN_EXIT:-0}"; }\n'
                    "trap 'got USR1' USR1\ntrap 'got TERM' TERM\n"
                    f": > {shlex.quote(str(record))}.ready\n"
                    "while :; do sleep 0.05; done\n")
    srun.chmod(0o755)
    scontrol = fake_bin / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$*" >> {shlex.quote(str(tmp_path / "scontrol.calls"))}\n'
                        'if [ "$1" = requeue ]; then exit "${FAKE_REQUEUE_EXIT:-0}"; fi\n'
                        '[ "$1 $2" = "show hostnames" ] || exit 9\n'
                        'case "$3" in "gpu[01-02]") printf "gpu01\\ngpu02\\n" ;; *) exit 1 ;; esac\n')
    scontrol.chmod(0o755)

    def start(script, args=(), **slurm):
        env = {"PATH": f"{fake_bin}:/usr/bin:/bin", "HOME": str(tmp_path),
               "SLURM_SUBMIT_DIR": str(home), **slurm}
        # its own process group, so teardown can end it and its srun if a test fails midway
        proc = subprocess.Popen(["bash", str(script), *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
                                start_new_session=True)
        started.append(proc)
        return proc, env

    def recorded():
        argv = record.read_bytes().split(b"\0")[:-1] if record.exists() else None
        if record.exists():
            record.unlink()
        return argv and [a.decode() for a in argv]

    def run(script, args=(), **slurm):
        popen, env = start(script, args, **slurm)
        out, err = popen.communicate(timeout=60)
        proc = subprocess.CompletedProcess(popen.args, popen.returncode, out, err)
        return proc, recorded(), env

    run.home, run.hvdscale, run.start, run.recorded = home, hvdscale, start, recorded
    run.record, run.scontrol_calls = record, tmp_path / "scontrol.calls"
    yield run
    for proc in started:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()


def dry_run(cluster, env, *launch_args):
    proc = subprocess.run([str(cluster.hvdscale), "launch", "--launcher", "srun", *launch_args,
                           "--dry-run", "--", str(cluster.hvdscale), "train", *RECIPE_ARGS],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return shlex.split(proc.stdout)


GPU_ALLOCATION = {"SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "4",
                  "SLURM_NTASKS_PER_NODE": "4", "SLURM_CPUS_ON_NODE": "64", "SLURM_JOB_ID": "42"}


@pytest.mark.parametrize("plugin", [None, "pmi2"])
def test_gpu_template_runs_the_launchers_srun_line(cluster, plugin):
    slurm = dict(GPU_ALLOCATION, **({"HVDSCALE_SRUN_MPI": plugin} if plugin else {}))
    proc, ran, env = cluster(SLURM / "hvdscale-gpu.sbatch", RECIPE_ARGS, **slurm)
    assert proc.returncode == 0, proc.stderr
    expected = dry_run(cluster, dict(env, NCCL_DEBUG="WARN"), "--np", "8", "--gpus-per-node", "4",
                       "--cores-per-node", "64", "--mpi", plugin or "pmix")
    assert expected[0] == "srun" and ran == expected[1:]
    # and that line is the right one for 2 nodes x 4 GPUs x 64 cores
    assert ran[:9] == ["--nodes", "2", "--ntasks", "8", "--ntasks-per-node", "4",
                       "--cpus-per-task", "16", f"--mpi={plugin or 'pmix'}"]
    assert "--export=ALL,OMP_NUM_THREADS=16" in ran
    assert ran[-len(RECIPE_ARGS) - 2:] == [str(cluster.hvdscale), "train", *RECIPE_ARGS]


def test_gpu_template_dry_run_prints_the_same_line(cluster):
    proc, ran, env = cluster(SLURM / "hvdscale-gpu.sbatch", RECIPE_ARGS,
                             HVDSCALE_DRY_RUN="1", **GPU_ALLOCATION)
    assert proc.returncode == 0, proc.stderr
    assert ran is None                         # nothing was started
    printed = shlex.split(proc.stdout)
    assert printed[0] == "srun"
    _, ran, _ = cluster(SLURM / "hvdscale-gpu.sbatch", RECIPE_ARGS, **GPU_ALLOCATION)
    assert printed[1:] == ran


def test_gpu_template_sets_nccl_debug_only_when_unset(cluster):
    _, ran, _ = cluster(SLURM / "hvdscale-gpu.sbatch", RECIPE_ARGS, NCCL_DEBUG="INFO", **GPU_ALLOCATION)
    # NCCL_DEBUG=INFO reaches the workers through --export=ALL; the launcher adds no WARN
    assert "--export=ALL,OMP_NUM_THREADS=16" in ran


def test_gpu_template_runs_in_the_checkout(cluster, tmp_path):
    """srun starts in the checkout, so relative recipe paths resolve there."""
    proc, _, _ = cluster(SLURM / "hvdscale-gpu.sbatch", RECIPE_ARGS, **GPU_ALLOCATION)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "srun.argv.cwd").read_text().strip() == str(cluster.home)


def test_gpu_template_follows_gpus_per_node_and_the_allocation(cluster):
    # 3 nodes with 8 GPUs and 96 cores; GPUS_PER_NODE wins over SLURM's count
    _, ran, _ = cluster(SLURM / "hvdscale-gpu.sbatch", RECIPE_ARGS, SLURM_JOB_NUM_NODES="3",
                        SLURM_GPUS_ON_NODE="8", SLURM_CPUS_ON_NODE="96")
    assert ran[:9] == ["--nodes", "3", "--ntasks", "24", "--ntasks-per-node", "8",
                       "--cpus-per-task", "12", "--mpi=pmix"]
    _, ran, _ = cluster(SLURM / "hvdscale-gpu.sbatch", RECIPE_ARGS, GPUS_PER_NODE="2",
                        **GPU_ALLOCATION)
    assert ran[:8] == ["--nodes", "2", "--ntasks", "4", "--ntasks-per-node", "2",
                       "--cpus-per-task", "32"]


def test_cpu_template_runs_the_launchers_srun_line(cluster):
    slurm = {"SLURM_JOB_NUM_NODES": "4", "SLURM_NTASKS_PER_NODE": "2", "SLURM_CPUS_ON_NODE": "32"}
    proc, ran, env = cluster(SLURM / "hvdscale-cpu.sbatch", RECIPE_ARGS, **slurm)
    assert proc.returncode == 0, proc.stderr
    expected = dry_run(cluster, env, "--np", "8", "--workers-per-node", "2",
                       "--cores-per-node", "32", "--mpi", "pmix")
    assert expected[0] == "srun" and ran == expected[1:]
    assert ran[:9] == ["--nodes", "4", "--ntasks", "8", "--ntasks-per-node", "2",
                       "--cpus-per-task", "16", "--mpi=pmix"]
    assert "--export=ALL,OMP_NUM_THREADS=16" in ran     # no NCCL settings on CPU nodes


@pytest.mark.parametrize("script", ["hvdscale-gpu.sbatch", "hvdscale-cpu.sbatch"])
@pytest.mark.parametrize("args, slurm, message", [
    ([], GPU_ALLOCATION, "usage: sbatch"),
    (RECIPE_ARGS, {}, "SLURM_JOB_NUM_NODES is not set"),
    (RECIPE_ARGS, dict(GPU_ALLOCATION, HVDSCALE_HOME="/nonexistent"), "/nonexistent/.venv/bin/hvdscale not found"),
    (RECIPE_ARGS, dict(GPU_ALLOCATION, SLURM_JOB_NUM_NODES="two"), "not a node count"),
])
def test_templates_stop_with_one_line_on_bad_input(cluster, script, args, slurm, message):
    proc, ran, _ = cluster(SLURM / script, args, **slurm)
    assert proc.returncode == 2 and ran is None
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_gpu_template_refuses_an_unknown_gpu_count(cluster):
    proc, ran, _ = cluster(SLURM / "hvdscale-gpu.sbatch", RECIPE_ARGS, SLURM_JOB_NUM_NODES="2",
                           SLURM_CPUS_ON_NODE="8")
    assert proc.returncode == 2 and ran is None
    assert "cannot tell the GPUs per node" in proc.stderr


# ---------------------------------------------------------------------------------------
# preemption: --signal=B:USR1@N reaches the batch shell, which passes it to srun; requeue


CPU_ALLOCATION = {"SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS_PER_NODE": "2",
                  "SLURM_CPUS_ON_NODE": "8", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "lamb"}
TEMPLATES = ["hvdscale-gpu.sbatch", "hvdscale-cpu.sbatch"]


def _signal_the_batch_shell(cluster, script, signame, **slurm):
    """Start a template with a waiting srun, send `signame` to the batch shell (what
    `--signal=B:...` does), return (exit code, stderr, srun argv, signals srun received)."""
    ready = cluster.record.with_suffix(".argv.ready")
    ready.unlink(missing_ok=True)
    proc, _ = cluster.start(SLURM / script, RECIPE_ARGS, FAKE_SRUN_WAIT="1",
                            **dict(GPU_ALLOCATION, **CPU_ALLOCATION), **slurm)
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "srun was not started"
        time.sleep(0.05)
    proc.send_signal(getattr(signal, f"SIG{signame}"))
    _, err = proc.communicate(timeout=30)
    signals = cluster.record.with_suffix(".argv.signals")
    return proc.returncode, err, cluster.recorded(), signals.read_text().split()


@pytest.mark.parametrize("script", TEMPLATES)
@pytest.mark.parametrize("signame", ["USR1", "TERM"])
def test_signal_to_the_batch_shell_reaches_srun_and_the_job_is_requeued(cluster, script, signame):
    code, err, ran, signals = _signal_the_batch_shell(cluster, script, signame, HVDSCALE_REQUEUE="1",
                                                      FAKE_SRUN_EXIT="75")
    assert signals == [signame]                      # passed on once, to srun
    assert code == 0, err                            # the requeue was asked for
    assert cluster.scontrol_calls.read_text().split("\n")[-2] == "requeue 4242"
    assert "requeueing job 4242" in err
    # the ranks were told the requeue code; OUT is fixed per job id, so a restart finds it
    assert cluster.record.with_suffix(".argv.code").read_text().strip() == "75"
    assert ran[-4:] == [*RECIPE_ARGS[-2:], "--out", "runs/lamb-4242"]


@pytest.mark.parametrize("script", TEMPLATES)
def test_preempted_marker_requeues_even_when_srun_reports_a_killed_task(cluster, script):
    """--kill-on-bad-exit may SIGKILL ranks that were about to exit 75: srun then reports 137,
    and OUT/preempted.json is what tells a preemption from a crash."""
    marker = cluster.home / "runs" / "lamb-4242" / "preempted.json"    # OUT in the checkout
    code, err, _, _ = _signal_the_batch_shell(cluster, script, "USR1", HVDSCALE_REQUEUE="1",
                                              FAKE_SRUN_EXIT="137", FAKE_SRUN_MARKER=str(marker))
    assert code == 0 and "requeueing job 4242" in err and marker.exists()
    # The next attempt removes that marker before it starts: a crash (137) without a new one
    # is not requeued, and its code is the job's.
    cluster.scontrol_calls.unlink()
    code, err, _, _ = _signal_the_batch_shell(cluster, script, "USR1", HVDSCALE_REQUEUE="1",
                                              FAKE_SRUN_EXIT="137")
    assert code == 137 and not cluster.scontrol_calls.exists() and not marker.exists()


def test_given_out_directory_is_kept_and_its_marker_read(cluster):
    args = [*RECIPE_ARGS, "--out", "myrun"]
    marker = cluster.home / "myrun" / "preempted.json"
    proc, _ = cluster.start(SLURM / "hvdscale-cpu.sbatch", args, FAKE_SRUN_WAIT="1",
                            FAKE_SRUN_EXIT="1", FAKE_SRUN_MARKER=str(marker),
                            HVDSCALE_REQUEUE="1", **CPU_ALLOCATION)
    ready = cluster.record.with_suffix(".argv.ready")
    while not ready.exists():
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "requeueing job 4242" in err
    ran = cluster.recorded()
    assert ran[-len(args):] == args and ran.count("--out") == 1


@pytest.mark.parametrize("script", TEMPLATES)
def test_without_requeue_the_signal_is_passed_on_and_the_job_ends(cluster, script):
    code, err, ran, signals = _signal_the_batch_shell(cluster, script, "USR1", FAKE_SRUN_EXIT="0")
    assert signals == ["USR1"] and code == 0
    assert not cluster.scontrol_calls.exists()                 # no requeue
    assert ran[-len(RECIPE_ARGS):] == RECIPE_ARGS              # no --out, no --resume added
    assert cluster.record.with_suffix(".argv.code").read_text().strip() == ""


def test_failed_requeue_says_so_and_keeps_the_code(cluster):
    code, err, _, _ = _signal_the_batch_shell(cluster, "hvdscale-cpu.sbatch", "USR1",
                                              HVDSCALE_REQUEUE="1", FAKE_SRUN_EXIT="75",
                                              FAKE_REQUEUE_EXIT="1")
    assert code == 75 and "scontrol requeue failed (submit with --requeue)" in err


@pytest.mark.parametrize("script", TEMPLATES)
def test_a_restarted_job_resumes(cluster, script):
    slurm = dict(GPU_ALLOCATION, **CPU_ALLOCATION)
    _, ran, _ = cluster(SLURM / script, RECIPE_ARGS, **slurm)
    assert "--resume" not in ran
    _, ran, _ = cluster(SLURM / script, RECIPE_ARGS, SLURM_RESTART_COUNT="1", **slurm)
    assert ran[-len(RECIPE_ARGS) - 1:] == [*RECIPE_ARGS, "--resume"]
    _, ran, _ = cluster(SLURM / script, RECIPE_ARGS, SLURM_RESTART_COUNT="2",
                        HVDSCALE_REQUEUE="1", **slurm)
    assert ran[-len(RECIPE_ARGS) - 3:] == [*RECIPE_ARGS, "--out", "runs/lamb-4242", "--resume"]


@pytest.mark.parametrize("value", ["0", "abc", "300"])
def test_bad_requeue_code_is_refused_with_one_line(cluster, value):
    proc, ran, _ = cluster(SLURM / "hvdscale-cpu.sbatch", RECIPE_ARGS, HVDSCALE_REQUEUE="1",
                           HVDSCALE_REQUEUE_EXIT_CODE=value, **CPU_ALLOCATION)
    assert proc.returncode == 2 and ran is None
    assert "HVDSCALE_REQUEUE_EXIT_CODE must be a code from 1 to 255" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_templates_declare_what_sbatch_needs():
    for name in ("hvdscale-gpu.sbatch", "hvdscale-cpu.sbatch"):
        text = (SLURM / name).read_text()
        assert text.startswith("#!/usr/bin/env bash\n")
        directives = [ln for ln in text.splitlines() if ln.startswith("#SBATCH")]
        assert any("--nodes=" in d for d in directives) and any("--time=" in d for d in directives)
        # sbatch stops reading #SBATCH lines at the first command
        first_command = next(i for i, ln in enumerate(text.splitlines())
                             if ln.strip() and not ln.startswith("#"))
        assert all(text.splitlines().index(d) < first_command for d in directives)
        assert "--launcher srun" in text
    assert "--gres=gpu:" in (SLURM / "hvdscale-gpu.sbatch").read_text()


def test_slurm_hostfile_lists_the_allocation(cluster):
    script = REPO / "launchers" / "hosts" / "slurm_hostfile.sh"
    proc, _, _ = cluster(script, [], SLURM_JOB_NODELIST="gpu[01-02]", SLURM_GPUS_ON_NODE="4")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "gpu01 slots=4\ngpu02 slots=4\n"
    proc, _, _ = cluster(script, ["2"], SLURM_JOB_NODELIST="gpu[01-02]")
    assert proc.stdout == "gpu01 slots=2\ngpu02 slots=2\n"
    proc, _, _ = cluster(script, [])
    assert proc.returncode == 1 and "SLURM_JOB_NODELIST is not set" in proc.stderr


# ---------------------------------------------------------------------------------------
# every shell script we ship


def _shell_scripts():
    found = sorted(set((REPO / "launchers").glob("*.sh")) | set((REPO / "launchers").glob("**/*.sh"))
                   | set((REPO / "launchers").glob("**/*.sbatch")))
    found += [REPO / "launchers" / "hvdscale-run", REPO / ".ci" / "run"]
    return [p for p in found if p.exists()]


SCRIPTS = _shell_scripts()


@pytest.mark.parametrize("script", SCRIPTS, ids=[str(p.relative_to(REPO)) for p in SCRIPTS])
def test_shell_script_parses_and_is_shellcheck_clean(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (Debian package shellcheck)")
    proc = subprocess.run([shellcheck, "-s", "bash", str(script)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout


def test_shellcheck_finds_problems():
    """The lint above can fail: an unquoted expansion is reported."""
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed")
    proc = subprocess.run([shellcheck, "-s", "bash", "-"], input="#!/bin/bash\nrm $1\n",
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "SC2086" in proc.stdout


def test_scripts_are_executable():
    for script in SCRIPTS:
        if script.suffix in (".sh", ".sbatch") or script.name in ("hvdscale-run", "run"):
            assert os.access(script, os.X_OK), f"{script} is not executable"


# ---------------------------------------------------------------------------------------
# a real job: the template, a stand-in srun that runs the step with mpirun, hvdscale train


MPIRUN_SRUN = r"""#!/bin/sh
# srun stand-in: the job step on this machine with mpirun (which passes USR1 to every rank)
n=1
while [ $# -gt 0 ]; do
    case "$1" in
        --ntasks) n=$2; shift 2 ;;
        --nodes|--ntasks-per-node|--cpus-per-task) shift 2 ;;
        --export=*) for kv in $(echo "${1#--export=}" | tr , ' '); do
                        case $kv in OMP_NUM_THREADS=*) export "$kv" ;; esac
                    done; shift ;;
        --*) shift ;;
        *) break ;;
    esac
done
exec mpirun --allow-run-as-root --oversubscribe -np "$n" -bind-to none "$@"
"""
REAL_RUN = ["--set", "framework=torch", "--set", "data.train_limit=2048",
            "--set", "data.test_limit=200", "--set", "batch.per_worker=64",
            "--set", "batch.reference=128", "--set", "train.max_steps=24",
            "--set", "lr.warmup_steps=4", "--set", "checkpoint.every_steps=8",
            "--set", "log.progress=false", "--set", "log.tensorboard=false",
            "--set", "faults.preemption_check_s=0.05"]   # stop within a step or two


@pytest.mark.multiproc
def test_template_requeues_a_real_preempted_job_and_the_restart_resumes(cluster, tmp_path):
    """USR1 to the batch shell (--signal=B:USR1@N) -> srun (here mpirun) -> both ranks stop at
    one step with a checkpoint and exit 75 -> `scontrol requeue`; the restarted job
    (SLURM_RESTART_COUNT=1) resumes from that checkpoint and finishes."""
    (tmp_path / "bin" / "srun").write_text(MPIRUN_SRUN)
    out = tmp_path / "run"
    args = [str(REPO / "pipelines" / "fashion_mnist_lamb.yaml"), *REAL_RUN, "--out", str(out)]
    slurm = {"SLURM_JOB_NUM_NODES": "1", "SLURM_NTASKS_PER_NODE": "2", "SLURM_CPUS_ON_NODE": "2",
             "SLURM_JOB_ID": "77", "HVDSCALE_REQUEUE": "1",
             "PATH": f"{tmp_path / 'bin'}:{os.path.dirname(sys.executable)}:/usr/bin:/bin",
             "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
             "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc, _ = cluster.start(SLURM / "hvdscale-cpu.sbatch", args, **slurm)
    first = out / "checkpoints" / "step-00000008.json"
    deadline = time.monotonic() + 240
    while not first.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no first checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    sent = time.monotonic()
    stdout, stderr = proc.communicate(timeout=120)
    took = time.monotonic() - sent
    print(f"template: batch shell exited {proc.returncode} {took:.1f} s after USR1")
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert took < 60
    marker = json.loads((out / "preempted.json").read_text())
    # a signal that lands while the step-8 checkpoint is being written makes that checkpoint
    # the preemption one (docs/reliability.md): step 8 is a correct stop too
    assert 8 <= marker["step"] < 24 and marker["exit_code"] == 75
    assert marker["checkpoint"] == f"step-{marker['step']:08d}"
    assert cluster.scontrol_calls.read_text().split() == ["requeue", "77"]
    assert "requeueing job 77" in stderr

    cluster.scontrol_calls.unlink()
    proc, _ = cluster.start(SLURM / "hvdscale-cpu.sbatch", args, SLURM_RESTART_COUNT="1", **slurm)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert f"at step {marker['step']}" in stdout and "resumed from" in stdout
    summary = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert summary["steps"] == 24 and summary["workers"] == 2
    assert not cluster.scontrol_calls.exists() and not (out / "preempted.json").exists()
