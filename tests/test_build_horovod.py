"""launchers/build_horovod.sh's GPU settings, checked with --dry-run against a fake PyPI CUDA
toolkit and NCCL wheel (no compiler runs): NCCL from the pip wheel through a libnccl.so link
and a shared link, the architectures of the GPU present, a refused architecture CUDA 13 cannot
build, one line when no toolkit is found, and TensorFlow only where it is installed."""
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

SCRIPT = REPO / "launchers" / "build_horovod.sh"
CUDA13_ARCHS = "compute_75 compute_80 compute_86 compute_87 compute_89 compute_90 compute_100 compute_120"


def fake_site(tmp_path, toolkit=True, nccl=True):
    site = tmp_path / "site"
    if site.exists():
        return site
    if toolkit:
        cu13 = site / "nvidia" / "cu13"
        for d in ("bin", "include", "lib", "nvvm/bin"):
            (cu13 / d).mkdir(parents=True)
        (cu13 / "include" / "cuda_runtime.h").write_text("")
        (cu13 / "lib" / "libcudart.so.13").write_text("")
        nvcc = cu13 / "bin" / "nvcc"
        nvcc.write_text(f'#!/bin/sh\n[ "$1" = --list-gpu-arch ] && printf "%s\\n" {CUDA13_ARCHS}\n')
        nvcc.chmod(0o755)
    if nccl:
        (site / "nvidia" / "nccl" / "include").mkdir(parents=True)
        (site / "nvidia" / "nccl" / "lib").mkdir(parents=True)
        (site / "nvidia" / "nccl" / "include" / "nccl.h").write_text("")
        (site / "nvidia" / "nccl" / "lib" / "libnccl.so.2").write_text("")   # no libnccl.so
    site.mkdir(exist_ok=True)
    return site


def fake_python(tmp_path, tensorflow=False, torch_version="2.11.0"):
    """A python that has `torch` (and `tensorflow`) as empty modules: the script only asks
    whether they import and torch's version."""
    mods = tmp_path / f"mods-{int(tensorflow)}"
    (mods / "torch").mkdir(parents=True, exist_ok=True)
    (mods / "torch" / "__init__.py").write_text(f"__version__ = {torch_version!r}\n")
    if tensorflow:
        (mods / "tensorflow").mkdir(exist_ok=True)
        (mods / "tensorflow" / "__init__.py").write_text("")
    py = tmp_path / f"python-{int(tensorflow)}"
    py.write_text(f'#!/bin/sh\nPYTHONPATH={mods} exec {sys.executable} -S "$@"\n')
    py.chmod(0o755)
    return py


def dry_run(tmp_path, *args, gpu_caps=None, site=None, tensorflow=False):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if gpu_caps is not None:
        smi = bin_dir / "nvidia-smi"
        smi.write_text("#!/bin/sh\n" + "".join(f"echo {c}\n" for c in gpu_caps))
        smi.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path),
           "HVDSCALE_PY_SITE": str(site or fake_site(tmp_path))}
    python = fake_python(tmp_path, tensorflow)
    return subprocess.run(["bash", str(SCRIPT), "--dry-run", "--python", str(python),
                           "--cuda-toolkit", "pip", *args, str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=120)


def settings(proc):
    assert proc.returncode == 0, proc.stderr
    return dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)


def test_nccl_from_the_pip_wheel_is_linked_shared_through_a_libnccl_so_link(tmp_path):
    proc = dry_run(tmp_path, "--gpu", gpu_caps=["9.0"])
    env = settings(proc)
    assert env["HOROVOD_GPU_OPERATIONS"] == "NCCL" and env["HOROVOD_NCCL_LINK"] == "SHARED"
    assert env["HOROVOD_NCCL_INCLUDE"].endswith("nvidia/nccl/include")
    assert "libnccl.so\n" in proc.stdout + "\n"          # the link FindNCCL looks for
    assert env["HOROVOD_CUDA_HOME"] == env["CUDAToolkit_ROOT"]
    assert os.path.basename(env["HOROVOD_CUDA_HOME"]) == "cuda"   # the scratch toolkit root


def test_architectures_default_to_the_gpus_present(tmp_path):
    assert settings(dry_run(tmp_path, "--gpu", gpu_caps=["9.0"]))["HOROVOD_BUILD_CUDA_CC_LIST"] == "90"
    assert settings(dry_run(tmp_path, "--gpu", gpu_caps=["8.0", "9.0", "8.0"])
                    )["HOROVOD_BUILD_CUDA_CC_LIST"] == "80,90"
    no_gpu = tmp_path / "nogpu"
    no_gpu.mkdir()
    assert settings(dry_run(no_gpu, "--gpu"))["HOROVOD_BUILD_CUDA_CC_LIST"] == "80,90"
    assert settings(dry_run(tmp_path, "--gpu", "--cuda-arch", "86;90")
                    )["HOROVOD_BUILD_CUDA_CC_LIST"] == "86,90"


def test_an_architecture_cuda_13_dropped_is_refused_in_one_line(tmp_path):
    proc = dry_run(tmp_path, "--gpu", "--cuda-arch", "70;80;90")
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        "build_horovod.sh: --cuda-arch: this nvcc cannot build compute capability 70 "
        f"(it has: {CUDA13_ARCHS.replace('compute_', '')})"]


def test_no_toolkit_and_no_nccl_each_fail_in_one_line(tmp_path):
    proc = dry_run(tmp_path, "--gpu", site=fake_site(tmp_path / "a", toolkit=False))
    assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1
    assert "no CUDA toolkit" in proc.stderr and "nvidia-cuda-nvcc" in proc.stderr
    proc = dry_run(tmp_path, "--gpu", site=fake_site(tmp_path / "b", nccl=False))
    assert proc.returncode != 0 and "no NCCL" in proc.stderr and "nvidia-nccl-cu13" in proc.stderr


def test_frameworks_follow_the_environment(tmp_path):
    env = settings(dry_run(tmp_path, "--gpu"))                   # no TensorFlow here
    assert env["HOROVOD_WITH_PYTORCH"] == "1" and env["HOROVOD_WITHOUT_TENSORFLOW"] == "1"
    assert env["HVDSCALE_TORCH_CXX_STANDARD"] == "17"
    env = settings(dry_run(tmp_path, "--gpu", tensorflow=True))
    assert env["HOROVOD_WITH_TENSORFLOW"] == "1" and "HOROVOD_WITHOUT_TENSORFLOW" not in env
    env = settings(dry_run(tmp_path, "--gpu", "--tensorflow", "no", tensorflow=True))
    assert "HOROVOD_WITH_TENSORFLOW" not in env
    cpu = settings(dry_run(tmp_path))
    assert cpu["HOROVOD_WITHOUT_GPU"] == "1" and "HOROVOD_GPU_OPERATIONS" not in cpu


# ---------------------------------------------------------------------------------------
# Review item 1: Horovod's TensorFlow op in a GPU build, compiled against the installed TF
# (2.21). TF still ships tensorflow/compiler/xla/stream_executor/stream.h, so the stock file
# compiles; what breaks is the call of stream_executor::gpu::AsGpuStreamValue, which XLA no
# longer defines (an undefined symbol that fails at import). patch_horovod.sh edit 7 defines
# it from Stream::platform_specific_handle(). Compiled to an object with the CUDA runtime
# headers from NVIDIA's wheel (no toolkit, no GPU needed); about 20 s of one core.

def download(tmp_path, *requirements, binary=True):
    dest = tmp_path / "downloads"
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest),
                           *([] if binary else ["--no-binary", ":all:"]), *requirements],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.skip(f"cannot download {requirements}: {proc.stderr.strip()[-300:]}")
    return dest


@pytest.mark.slow
def test_patched_tensorflow_op_of_a_gpu_build_leaves_no_removed_xla_symbol(tmp_path):
    import tarfile
    import zipfile
    tf = pytest.importorskip("tensorflow")
    if shutil.which("g++") is None or shutil.which("nm") is None:
        pytest.skip("g++/nm not installed")
    dest = download(tmp_path, "horovod==0.28.1", binary=False)
    with tarfile.open(dest / "horovod-0.28.1.tar.gz") as sdist:
        sdist.extractall(tmp_path, filter="data")
    src = tmp_path / "horovod-0.28.1"
    subprocess.run(["bash", str(REPO / "launchers" / "patch_horovod.sh"), str(src)], check=True,
                   capture_output=True, timeout=120)
    for wheel in download(tmp_path, "nvidia-cuda-runtime==13.0.*", "nvidia-cuda-crt==13.0.*").glob("nvidia_cuda_*.whl"):
        with zipfile.ZipFile(wheel) as whl:
            whl.extractall(tmp_path / "cuda")
    major, minor, patch = (int(x) for x in tf.__version__.split("+")[0].split(".")[:3])
    third = src / "third_party"
    includes = [src, third / "gloo", third / "eigen", third / "flatbuffers" / "include",
                third / "lbfgs" / "include", third / "HTTPRequest" / "include",
                *sorted((third / "boost").glob("*/include")), tmp_path / "cuda" / "nvidia" / "cu13" / "include"]
    mpi = subprocess.run(["mpicxx", "--showme:incdirs"], capture_output=True, text=True)
    includes += mpi.stdout.split() if mpi.returncode == 0 else []
    obj = tmp_path / "mpi_ops.o"
    proc = subprocess.run(
        ["g++", "-c", "-O0", "-g0", "-w", *tf.sysconfig.get_compile_flags(), "-DEIGEN_MPL2_ONLY=1",
         "-DHAVE_GPU=1", "-DHAVE_CUDA=1", "-DHAVE_NCCL=1", "-DHAVE_GLOO=1", "-DHAVE_MPI=1",
         f"-DTENSORFLOW_VERSION={major * 10**9 + minor * 10**6 + patch * 10**3}", *(f"-I{d}" for d in includes),
         "-o", str(obj), str(src / "horovod" / "tensorflow" / "mpi_ops.cc")],
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    undefined = subprocess.run(["nm", "-C", "-u", str(obj)], capture_output=True, text=True).stdout
    assert "AsGpuStreamValue" not in undefined, "the op calls an XLA function TF no longer has"
