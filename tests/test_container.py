"""The CPU container image, built and run for real with podman (marker `image`; `make test`
deselects it, `make test-image` runs it).

The module builds localhost/hvdscale:cpu with launchers/container/build-cpu.sh (what `make
image-cpu` runs: a debootstrap'ed Debian 12 base image as CPU_IMAGE, runc, explicit ulimits,
host network). A first build compiles Horovod and the DALI TF plugin inside (the better part of
an hour on 2 busy cores); later builds reuse podman's cached layers unless the install inputs
changed. Then, inside the image, as its non-root user: `hvdscale doctor` and a `horovodrun -np
2` training of the demo recipe on the Fashion-MNIST the image carries (Debian's
dataset-fashion-mnist). HVDSCALE_TEST_IMAGE=TAG tests an image that is already built instead.
"""
import json
import os
import re
import shutil
import subprocess

import pytest

from conftest import REPO

pytestmark = [pytest.mark.image, pytest.mark.timeout(4 * 3600)]
CONTAINER = REPO / "launchers" / "container"
STEPS = 30


def podman_run(*args, timeout=900):
    return subprocess.run(["bash", str(CONTAINER / "podman-run.sh"), "--rm", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    given = os.environ.get("HVDSCALE_TEST_IMAGE")
    if given:
        return given
    for tool in ("podman", "runc", "debootstrap"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install podman runc debootstrap)")
    tag = "localhost/hvdscale:cpu"
    log = tmp_path_factory.mktemp("image") / "build.log"
    with open(log, "w") as out:
        proc = subprocess.run(["nice", "-n", "10", "bash", str(CONTAINER / "build-cpu.sh"), tag],
                              stdout=out, stderr=subprocess.STDOUT, timeout=4 * 3600, cwd=REPO)
    text = log.read_text()
    assert proc.returncode == 0, f"image build failed ({log}):\n{text[-6000:]}"
    assert f"build-cpu.sh: built {tag}" in text
    assert_host_wheel_reused(text)
    return tag


def assert_host_wheel_reused(text):
    """Where the install ran in this build and the host's own Horovod wheel (same key: Python
    3.11, Debian 12's OpenMPI, same pins and patches) was offered, the image took it."""
    offered = re.search(r"host Horovod wheels offered: (.*)", text)
    if offered is None or "horovod wheel (horovod==" not in text:
        return          # not offered (another distro), or the install layer came from cache
    key = subprocess.run(["bash", "launchers/install.sh", "--print-wheel-key"], cwd=REPO,
                         capture_output=True, text=True, timeout=60).stdout.strip()
    host_py = subprocess.run([str(REPO / ".venv" / "bin" / "python"), "-c",
                              "import sys; print(sys.version_info[:2] == (3, 11))"],
                             capture_output=True, text=True).stdout.strip()
    if host_py == "True" and f"{key}/" in offered.group(1).split():
        assert f"cached wheel: /root/.cache/hvdscale/{key}" in text, \
            f"the image compiled Horovod although the host's wheel {key} was offered"


def test_doctor_in_the_image(image):
    proc = podman_run(image, "doctor", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["python"].startswith("3.11.")
    assert report["torch"].endswith("+cpu") and report["horovod"] == "0.28.1"
    build = report["horovod_build"]
    assert all(build[k] for k in ("torch", "tensorflow", "gloo", "mpi")), build
    assert report["problems"] == {} and report["verdict"].startswith("OK")


def test_two_worker_training_of_the_demo_recipe_in_the_image(image, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o777)              # the image runs as its own non-root user
    proc = podman_run("-v", f"{out}:/out", "--entrypoint", "horovodrun", image,
                      "-np", "2", "-H", "localhost:2",
                      "hvdscale", "train", "pipelines/fashion_mnist_lamb.yaml",
                      "--set", f"train.max_steps={STEPS}", "--set", "lr.warmup_steps=5",
                      "--set", "checkpoint.every_steps=10",
                      "--set", "log.progress=false",
                      "--out", "/out/run")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    summary = records[-1]
    assert summary["workers"] == 2 and summary["steps"] == STEPS
    assert summary["final_test_accuracy"] > 0.5        # 30 steps of LAMB on Fashion-MNIST: ~0.77
    assert (out / "run" / "checkpoints" / f"step-{STEPS:08d}.json").exists()
