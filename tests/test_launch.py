"""hvdscale launch: the exact commands the pure builder makes for several layouts, the errors
for layouts that cannot work, hosts files, and the examples in docs/cluster.md."""
import argparse
import os
import re
import shlex
import subprocess
import sys
from dataclasses import replace

import pytest

from conftest import REPO
from hvdscale import launch
from hvdscale.commands import launch as launch_cmd
from hvdscale.errors import ConfigError

TRAIN = ("hvdscale", "train", "pipelines/imagenet_resnet50_goyal.yaml")
BASE_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin"}
ROOT_PREFIX = ["env", "OMPI_ALLOW_RUN_AS_ROOT=1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1"]
CLI = [sys.executable, "-c", "import sys; from hvdscale.cli import main; sys.exit(main())"]


def build(env=None, **fields):
    fields.setdefault("command", TRAIN)
    return launch.build_command(launch.Layout(**fields), dict(BASE_ENV if env is None else env))


# ---------------------------------------------------------------------------------------
# mpirun


def test_mpirun_two_gpu_nodes_forwards_the_environment_that_matters():
    env = {"PATH": "/p", "LD_LIBRARY_PATH": "/l", "PYTHONPATH": "/py", "NCCL_IB_HCA": "mlx5",
           "HOROVOD_FUSION_THRESHOLD": "67108864", "NCCL_DEBUG": "INFO", "HOME": "/root",
           "MY_NCCL_THING": "x", "SLURM_JOB_ID": "7"}
    argv = build(env, launcher="mpirun", np=8, hosts=(("node1", 4), ("node2", 4)),
                 gpus_per_node=4, cores_per_node=32)
    assert argv == [
        "mpirun", "-np", "8", "-H", "node1:4,node2:4", "-bind-to", "none", "-map-by", "slot",
        "-mca", "pml", "ob1", "-mca", "btl", "^openib", "-x", "OMP_NUM_THREADS=8",
        "-x", "PATH", "-x", "LD_LIBRARY_PATH", "-x", "PYTHONPATH",
        "-x", "HOROVOD_FUSION_THRESHOLD", "-x", "NCCL_DEBUG", "-x", "NCCL_IB_HCA", *TRAIN]


def test_mpirun_sets_nccl_debug_for_gpus_only_when_the_user_did_not():
    gpu = build(launcher="mpirun", np=2, gpus_per_node=2, cores_per_node=8)
    assert "NCCL_DEBUG=WARN" in gpu
    cpu = build(launcher="mpirun", np=2, cores_per_node=8)
    assert not any(a.startswith("NCCL_DEBUG") for a in cpu)
    unset = build({"PATH": "/p"}, launcher="mpirun", np=2, cores_per_node=8)
    # variables that are not set are not named: OpenMPI would warn about each one
    assert [unset[i + 1] for i, a in enumerate(unset) if a == "-x"] == ["OMP_NUM_THREADS=4", "PATH"]


def test_mpirun_allows_root_only_when_root():
    user = build(launcher="mpirun", np=2, cores_per_node=2)
    root = build(launcher="mpirun", np=2, cores_per_node=2, is_root=True)
    assert "--allow-run-as-root" not in user and user[0] == "mpirun"
    assert root[:3] == ROOT_PREFIX and root[3] == "mpirun"
    assert root.count("--allow-run-as-root") == 1
    assert [a for a in root[3:] if a != "--allow-run-as-root"] == user


def test_mpirun_mca_overrides_and_network_options():
    mca = launch.parse_mca(["pml=ucx", "btl_openib_warn_no_device_params_found=0"])
    argv = build(launcher="mpirun", np=2, cores_per_node=2, mca=mca, network_interface="ib0",
                 ssh_port=12345)
    text = shlex.join(argv)
    assert "-mca pml ucx -mca btl '^openib' -mca btl_openib_warn_no_device_params_found 0" in text
    assert "ob1" not in text
    assert "-mca btl_tcp_if_include ib0" in text and "-x NCCL_SOCKET_IFNAME=ib0" in text
    assert "-mca plm_rsh_args '-p 12345'" in text
    bare = build(launcher="mpirun", np=2, cores_per_node=2, mca=launch.parse_mca([], defaults=False))
    assert "-mca" not in bare
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        launch.parse_mca(["pml"])


def test_threads_are_cores_over_workers_on_the_busiest_node():
    # 5 workers on two 4-slot hosts: -map-by slot puts 4 on node1, so 16 cores / 4 = 4 threads
    argv = build(launcher="mpirun", np=5, hosts=(("node1", 4), ("node2", 4)), cores_per_node=16)
    assert "OMP_NUM_THREADS=4" in argv
    cpu = build(launcher="mpirun", np=4, hosts=(("a", 2), ("b", 2)), cores_per_node=16)
    assert "OMP_NUM_THREADS=8" in cpu
    # more workers than cores still gives every worker one thread
    assert "OMP_NUM_THREADS=1" in build(launcher="mpirun", np=4, cores_per_node=2)
    # the user's explicit choices win: --threads over OMP_NUM_THREADS over the rule
    env = dict(BASE_ENV, OMP_NUM_THREADS="3")
    assert "OMP_NUM_THREADS=3" in build(env, launcher="mpirun", np=4, cores_per_node=16)
    assert "OMP_NUM_THREADS=5" in build(env, launcher="mpirun", np=4, cores_per_node=16, threads=5)


# ---------------------------------------------------------------------------------------
# horovodrun


@pytest.mark.parametrize("controller", [None, "gloo", "mpi"])
def test_horovodrun_local_and_multi_host(controller):
    local = build(launcher="horovodrun", np=2, cores_per_node=2, controller=controller)
    flag = [f"--{controller}"] if controller else []
    assert local == ["env", "OMP_NUM_THREADS=1", "horovodrun", "-np", "2", "-H", "localhost:2",
                     *flag, *TRAIN]
    hosts = build(launcher="horovodrun", hosts=(("node1", None), ("node2", None)), gpus_per_node=4,
                  cores_per_node=64, controller=controller, network_interface="ib0")
    # Gloo may be used: the rendezvous is bound to ib0's address (hvdscale.launch.horovodrun)
    exe = (["horovodrun"] if controller == "mpi" else
           [sys.executable, "-m", "hvdscale.launch.horovodrun", "--bind-interface", "ib0", "--"])
    assert hosts == ["env", "OMP_NUM_THREADS=16", "NCCL_DEBUG=WARN", *exe, "-np", "8",
                     "-H", "node1:4,node2:4", *flag, "--network-interface", "ib0", *TRAIN]


def test_horovodrun_as_root_and_with_an_absolute_launcher():
    argv = build(launcher="horovodrun", np=2, cores_per_node=4, is_root=True,
                 launcher_path="/venv/bin/horovodrun", launcher_args=("--verbose",))
    assert argv == ["env", "OMP_NUM_THREADS=2", "OMPI_ALLOW_RUN_AS_ROOT=1",
                    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1", "/venv/bin/horovodrun", "-np", "2",
                    "-H", "localhost:2", "--verbose", *TRAIN]


def test_horovodrun_elastic_uses_the_discovery_script_on_the_hosts_file(tmp_path):
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("node1 slots=4\nnode2:4\n")
    argv = build(launcher="horovodrun", hosts=launch.read_hostfile(hosts), hostfile=str(hosts),
                 elastic=True, min_np=4, max_np=12, gpus_per_node=4, cores_per_node=32)
    assert argv == ["env", "OMP_NUM_THREADS=8", "NCCL_DEBUG=WARN", f"HVDSCALE_HOSTS_FILE={hosts}",
                    "HVDSCALE_SLOTS=4", "horovodrun", "-np", "8", "--min-np", "4", "--max-np", "12",
                    "--host-discovery-script", str(launch.DISCOVERY_SCRIPT), *TRAIN]
    assert launch.DISCOVERY_SCRIPT.is_file() and os.access(launch.DISCOVERY_SCRIPT, os.X_OK)


# ---------------------------------------------------------------------------------------
# srun


@pytest.mark.parametrize("plugin", ["pmix", "pmi2"])
def test_srun_gpu_layouts(plugin):
    argv = build(launcher="srun", np=8, gpus_per_node=4, cores_per_node=64, srun_mpi=plugin)
    assert argv == ["srun", "--nodes", "2", "--ntasks", "8", "--ntasks-per-node", "4",
                    "--cpus-per-task", "16", f"--mpi={plugin}", "--kill-on-bad-exit=1",
                    "--export=ALL,OMP_NUM_THREADS=16,NCCL_DEBUG=WARN", *TRAIN]
    # 16 GPUs on 4-GPU nodes with 48 cores: 4 nodes, 12 cores per task
    big = build(launcher="srun", np=16, gpus_per_node=4, cores_per_node=48)
    assert big[:9] == ["srun", "--nodes", "4", "--ntasks", "16", "--ntasks-per-node", "4",
                       "--cpus-per-task", "12"]


def test_srun_takes_what_it_was_not_told_from_the_allocation():
    env = dict(BASE_ENV, SLURM_NTASKS="6", SLURM_JOB_NUM_NODES="3", SLURM_CPUS_ON_NODE="24")
    argv = build(env, launcher="srun")
    assert argv[:9] == ["srun", "--nodes", "3", "--ntasks", "6", "--ntasks-per-node", "2",
                        "--cpus-per-task", "12"]
    assert "--export=ALL,OMP_NUM_THREADS=12" in argv
    with pytest.raises(ConfigError, match="needs 4 nodes but the allocation has 3"):
        build(env, launcher="srun", np=8, workers_per_node=2)


# ---------------------------------------------------------------------------------------
# layouts that cannot work


@pytest.mark.parametrize("fields, message", [
    (dict(launcher="mpirun", np=9, hosts=(("node1", 4), ("node2", 4))),
     "--np 9 needs 9 slots but the hosts offer 8 (node1:4,node2:4)"),
    (dict(launcher="horovodrun", hosts=(("node1", 8),), gpus_per_node=4),
     "host node1 has 8 slots but --gpus-per-node is 4"),
    (dict(launcher="mpirun", np=8, gpus_per_node=4), "host localhost has 8 slots"),
    (dict(launcher="srun", np=8, gpus_per_node=4, hosts=(("a", 4),), cores_per_node=8),
     "srun takes its nodes from the SLURM allocation"),
    (dict(launcher="srun", np=8, gpus_per_node=4), "give --cores-per-node"),
    (dict(launcher="srun", gpus_per_node=4, cores_per_node=8), "give --np"),
    (dict(launcher="srun", np=4, gpus_per_node=4, cores_per_node=2), "only 2 cores per node"),
    (dict(launcher="mpirun", np=2, command=()), "nothing to launch"),
    (dict(launcher="pbsdsh", np=2), "unknown launcher 'pbsdsh'"),
    (dict(launcher="mpirun", np=0), "--np must be at least 1"),
    (dict(launcher="mpirun", np=2, gpus_per_node=-1), "--gpus-per-node must be 0 or more"),
    (dict(launcher="mpirun", np=2, controller="gloo"), "--controller only applies to horovodrun"),
    (dict(launcher="mpirun", np=2, elastic=True), "elastic jobs need --launcher horovodrun"),
    (dict(launcher="horovodrun", np=2, min_np=1), "only apply to --elastic"),
    (dict(launcher="horovodrun", np=2, elastic=True), "--elastic needs --hostfile"),
    (dict(launcher="horovodrun", hosts=(("a", 2),), np=2, elastic=True, min_np=3),
     "--min-np 3 is larger than --np 2"),
    (dict(launcher="horovodrun", hosts=(("a", None),)), "host a has no slot count"),
    (dict(launcher="srun", np=2, cores_per_node=4, srun_mpi="openmpi"), "choose pmix or pmi2"),
    (dict(launcher="srun", np=2, cores_per_node=4, ssh_port=22), "--ssh-port does not apply"),
])
def test_impossible_layouts_are_refused_with_one_line(fields, message):
    with pytest.raises(ConfigError) as err:
        build(**fields)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------
# hosts and hosts files


def test_parse_hosts():
    assert launch.parse_hosts("node1:4,node2:2") == (("node1", 4), ("node2", 2))
    assert launch.parse_hosts("a.example.org, b") == (("a.example.org", None), ("b", None))
    for bad, message in [("a:0", "positive integer"), ("a:x", "positive integer"), ("a,,b", "empty"),
                         ("a b:2", "not a host name"), ("a:1,a:2", "listed twice")]:
        with pytest.raises(ConfigError, match=message):
            launch.parse_hosts(bad)


def test_hostfile_formats_and_errors(tmp_path):
    text = "# cluster\nnode1 slots=4 max_slots=8\n\n node2:2  # spare\nnode3\n"
    assert launch.parse_hostfile_text(text) == (("node1", 4), ("node2", 2), ("node3", None))
    with pytest.raises(ConfigError, match=r"h:2: cannot read 'node2 cores=4'"):
        launch.parse_hostfile_text("node1\nnode2 cores=4\n", source="h")
    with pytest.raises(ConfigError, match="no hosts listed"):
        launch.parse_hostfile_text("# nothing\n")
    with pytest.raises(ConfigError, match="cannot read it"):
        launch.read_hostfile(tmp_path / "missing.txt")


def _discover(hosts_file, **env):
    return subprocess.run([str(launch.DISCOVERY_SCRIPT)], capture_output=True, text=True, timeout=20,
                          env={"PATH": os.environ["PATH"], "HVDSCALE_HOSTS_FILE": str(hosts_file), **env})


def test_discovery_script_agrees_with_the_python_reader_and_follows_edits(tmp_path):
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("# start\nnode1 slots=4 max_slots=4\nnode2:2   # spare\nnode3\n")
    proc = _discover(hosts, HVDSCALE_SLOTS="3")
    assert proc.returncode == 0, proc.stderr
    parsed = launch.parse_hostfile_text(hosts.read_text())
    assert proc.stdout.splitlines() == [f"{h}:{s or 3}" for h, s in parsed]
    # the file is read on every call: an edit moved into place changes the next answer
    new = tmp_path / "hosts.new"
    new.write_text("node2:2\nnode4 slots=8")     # no final newline: the last line still counts
    new.replace(hosts)
    assert _discover(hosts).stdout.splitlines() == ["node2:2", "node4:8"]


@pytest.mark.parametrize("content, env, message", [
    ("node1 cores=4\n", {}, "hosts.txt:1: cannot read 'cores=4'"),
    ("node1\nnode2:0\n", {}, "hosts.txt:2: slots must be a positive integer"),
    ("-bad:2\n", {}, "is not a host name"),
    ("node1\n", {"HVDSCALE_SLOTS": "x"}, "HVDSCALE_SLOTS must be a positive integer"),
    (None, {}, "cannot read hosts file"),
])
def test_discovery_script_rejects_bad_input(tmp_path, content, env, message):
    hosts = tmp_path / "hosts.txt"
    if content is not None:
        hosts.write_text(content)
    proc = _discover(hosts, **env)
    assert proc.returncode != 0 and proc.stdout == ""
    assert message in proc.stderr


# ---------------------------------------------------------------------------------------
# the sub-command


def cli(*args, env=None, timeout=60):
    full_env = dict(os.environ if env is None else env)
    full_env["PYTHONPATH"] = str(REPO)
    return subprocess.run([*CLI, "launch", *args], capture_output=True, text=True, env=full_env,
                          timeout=timeout, cwd=REPO)


def test_cli_dry_run_prints_one_shell_line_that_splits_back_into_the_argv():
    proc = cli("--launcher", "mpirun", "--np", "2", "--cores-per-node", "8", "--dry-run", "--",
               "hvdscale", "train", "my recipe.yaml", "--set", "train.max_steps=3")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1
    argv = shlex.split(lines[0])
    # the worker's arguments survive quoting, including options that look like launch's own
    assert argv[-4:] == ["train", "my recipe.yaml", "--set", "train.max_steps=3"]
    assert "-np" in argv and argv[argv.index("-np") + 1] == "2"
    assert ("--allow-run-as-root" in argv) == (os.geteuid() == 0)


@pytest.mark.parametrize("args, message", [
    (["--launcher", "mpirun", "--np", "9", "--hosts", "a:4,b:4"], "--np 9 needs 9 slots"),
    (["--launcher", "mpirun", "--np", "2"], "nothing to launch"),
    (["--hostfile", "/nonexistent/hosts"], "--hostfile /nonexistent/hosts: cannot read it"),
    (["--launcher", "mpirun", "--np", "2", "--mca", "pml"], "write KEY=VALUE"),
])
def test_cli_errors_are_one_line_and_exit_2(args, message):
    dry = ["--dry-run", "--", "true"] if "nothing" not in message else ["--dry-run"]
    proc = cli(*args, *dry)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"hvdscale launch: error: {proc.stderr.strip().split('error: ', 1)[1]}"
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_cli_without_dry_run_names_a_missing_launcher(tmp_path):
    env = dict(os.environ, PATH=str(tmp_path))   # no srun anywhere on this PATH
    proc = cli("--launcher", "srun", "--np", "2", "--cores-per-node", "4", "--", "true", env=env)
    assert proc.returncode == 2
    assert "srun not found on PATH" in proc.stderr


def test_cli_execs_the_command_it_prints(tmp_path):
    """Without --dry-run the printed argv is what runs: a fake mpirun on PATH records it."""
    fake = tmp_path / "mpirun"
    record = tmp_path / "argv"
    fake.write_text(f'#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done > {record}\n'
                    'echo "OMPI_ALLOW_RUN_AS_ROOT=${OMPI_ALLOW_RUN_AS_ROOT:-}"\nexit 3\n')
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}", NCCL_IB_HCA="mlx5")
    args = ["--launcher", "mpirun", "--np", "2", "--cores-per-node", "4", "--", "python3", "-c", "x y"]
    printed = shlex.split(cli(*args[:-4], "--dry-run", *args[-4:], env=env).stdout)
    proc = cli(*args, env=env)
    assert proc.returncode == 3       # the launcher's exit status comes back unchanged
    ran = record.read_text().splitlines()
    start = printed.index("mpirun") + 1
    assert ran == printed[start:]
    assert "NCCL_IB_HCA" in ran
    assert proc.stdout.strip() == ("OMPI_ALLOW_RUN_AS_ROOT=1" if os.geteuid() == 0
                                   else "OMPI_ALLOW_RUN_AS_ROOT=")


def test_hvdscale_run_wrapper_passes_every_argument_through(tmp_path):
    (tmp_path / "launchers").mkdir()
    wrapper = tmp_path / "launchers" / "hvdscale-run"
    wrapper.write_bytes((REPO / "launchers" / "hvdscale-run").read_bytes())
    wrapper.chmod(0o755)
    proc = subprocess.run([str(wrapper), "--np", "2"], capture_output=True, text=True, timeout=20)
    assert proc.returncode == 2 and "run launchers/install.sh first" in proc.stderr
    fake = tmp_path / ".venv" / "bin" / "hvdscale"
    fake.parent.mkdir(parents=True)
    fake.write_text('#!/bin/sh\nfor a in "$@"; do printf "[%s]" "$a"; done\n')
    fake.chmod(0o755)
    proc = subprocess.run([str(wrapper), "--np", "2", "--", "a b", ""], capture_output=True,
                          text=True, timeout=20)
    assert proc.stdout == "[launch][--np][2][--][a b][]"


# ---------------------------------------------------------------------------------------
# docs/cluster.md: every `$ hvdscale launch` line prints what the page says


def _doc_examples():
    examples = []
    for page in ("docs/cluster.md", "README.md"):
        examples += _page_examples(page)
    return examples


def _page_examples(page):
    text = (REPO / page).read_text()
    examples, env = [], dict(BASE_ENV)
    for block in re.findall(r"```console\n(.*?)```", text, flags=re.S):
        lines = block.splitlines()
        i = 0
        while i < len(lines):
            line = lines[i]
            assert line.startswith("$ "), f"{page}: output without a command: {line}"
            command = line[2:]
            i += 1
            output = []
            while i < len(lines) and not lines[i].startswith("$ "):
                output.append(lines[i])
                i += 1
            if command.startswith("export "):
                name, _, value = command[len("export "):].partition("=")
                env[name] = value
                continue
            examples.append((command, "\n".join(output), dict(env)))
    return examples


DOC_EXAMPLES = _doc_examples()


def test_docs_have_launch_examples_for_every_launcher():
    commands = " ".join(c for c, _, _ in DOC_EXAMPLES)
    for launcher in launch.LAUNCHERS:
        assert f"--launcher {launcher}" in commands
    assert len(DOC_EXAMPLES) >= 8


@pytest.mark.parametrize("command, expected, env", DOC_EXAMPLES,
                         ids=[f"doc{i}" for i in range(len(DOC_EXAMPLES))])
def test_docs_example_prints_what_the_page_shows(command, expected, env, monkeypatch):
    words = shlex.split(command)
    assert words[:2] == ["hvdscale", "launch"], f"only hvdscale launch lines are checked: {command}"
    parser = argparse.ArgumentParser(prog="hvdscale launch")
    launch_cmd.add_arguments(parser)
    args = parser.parse_args(words[2:])
    monkeypatch.chdir(REPO)
    try:
        layout = launch_cmd.layout_from_args(args, env, cores=32, is_root=False)
        got = launch.format_command(launch.build_command(layout, env))
    except ConfigError as err:
        got = f"hvdscale launch: error: {err}"
    # the interpreter that runs hvdscale.launch.horovodrun is the container's, wherever this .venv is
    got = got.replace(sys.executable, "/opt/hvdscale/.venv/bin/python")
    assert got.replace(str(REPO), "/opt/hvdscale") == expected


def test_readme_cluster_commands_are_accepted(monkeypatch):
    """The README's short cluster section uses options the launcher knows."""
    readme = (REPO / "README.md").read_text()
    lines = [ln.strip() for ln in readme.splitlines() if "hvdscale launch " in ln]
    assert lines, "README.md has no hvdscale launch example"
    monkeypatch.chdir(REPO)
    for line in lines:
        words = shlex.split(line.split("hvdscale launch ", 1)[1])
        parser = argparse.ArgumentParser(prog="hvdscale launch")
        launch_cmd.add_arguments(parser)
        args = parser.parse_args(words)
        layout = launch_cmd.layout_from_args(args, BASE_ENV, cores=32, is_root=False)
        assert launch.build_command(layout, BASE_ENV)[-len(layout.command):] == list(layout.command)


def test_layout_is_a_value():
    """build_command is pure: the same layout and environment give the same argv, and the
    layout is not changed by building."""
    layout = launch.Layout(launcher="mpirun", command=TRAIN, np=4, cores_per_node=8)
    env = dict(BASE_ENV, NCCL_ALGO="Ring")
    first = launch.build_command(layout, env)
    assert launch.build_command(layout, dict(env)) == first
    assert replace(layout) == layout and env == dict(BASE_ENV, NCCL_ALGO="Ring")


@pytest.mark.parametrize("mpi, gloo, want", [(True, True, "mpi"), (True, False, "mpi"),
                                             (False, True, "gloo"), (False, False, None)])
def test_horovodrun_controller_follows_horovodruns_own_rule(mpi, gloo, want):
    assert launch.horovodrun_controller(mpi, gloo) == want
