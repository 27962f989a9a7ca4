#!/usr/bin/env bash
# Build the Horovod 0.28.1 wheel for one Python environment: the one recipe behind
# install.sh (CPU and --gpu), launchers/gpu_check.sh and the Dockerfile.
#
#   launchers/build_horovod.sh --print-arch   (the default architectures on this machine)
#   launchers/build_horovod.sh [--gpu] [--cuda-arch "80;90"] [--mpi auto|yes|no]
#                              [--tensorflow auto|yes|no] [--cuda-toolkit auto|pip|DIR]
#                              [--sdist FILE] [--python PY] OUT_DIR
#
# Builds into OUT_DIR/horovod-*.whl with the shared libraries stripped. Frameworks: PyTorch
# always; TensorFlow where PY imports it (auto) or as told. --gpu: NCCL for the GPU
# operations, Gloo and (where mpicxx exists) MPI for the rest. Found in this order:
#   CUDA toolkit: --cuda-toolkit DIR, HOROVOD_CUDA_HOME, CUDA_HOME, nvcc on PATH,
#                 /usr/local/cuda, then (or only, with --cuda-toolkit pip) PyPI's
#                 nvidia-cuda-nvcc (+ nvidia-cuda-runtime, -crt, -cccl, -nvvm) in PY's site
#   NCCL:         HOROVOD_NCCL_HOME / _INCLUDE / _LIB, a system libnccl, then nvidia-nccl-cu13
#   architectures: --cuda-arch, HVDSCALE_CUDA_ARCH, the GPUs present (nvidia-smi), else 80;90
# Without --sdist it is downloaded (pip download). Jobs: HVDSCALE_BUILD_JOBS or nproc.
# --dry-run prints the build settings and stops. HVDSCALE_PY_SITE: where PyPI's CUDA/NCCL
# wheels are looked for (default: PY's site-packages).
set -Eeuo pipefail
# All in one function, read whole before it runs: editing this file during a build (which
# takes long) cannot change what the running build does next.
main() {
    here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
    HVD_V=0.28.1
    GPU=0; ARCH="${HVDSCALE_CUDA_ARCH:-}"; TOOLKIT=auto; DRY=0; MPI=auto; TF=auto; SDIST=""; PY="${PYTHON:-python3}"
    if [ "${1:-}" = "--print-arch" ]; then    # what --cuda-arch defaults to on this machine
        caps=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | tr -d ' .' | sort -u | paste -sd';' || true)
        echo "${caps:-80;90}"
        exit 0
    fi
    while [ $# -gt 1 ]; do
        case "$1" in
            --gpu) GPU=1 ;;
            --dry-run) DRY=1 ;;
            --cuda-arch) ARCH="$2"; shift ;;
            --cuda-toolkit) TOOLKIT="$2"; shift ;;
            --mpi) MPI="$2"; shift ;;
            --tensorflow) TF="$2"; shift ;;
            --sdist) SDIST="$2"; shift ;;
            --python) PY="$2"; shift ;;
            *) echo "build_horovod.sh: unknown option '$1'" >&2; exit 2 ;;
        esac
        shift
    done
    OUT=${1:?usage: build_horovod.sh [--gpu] [--cuda-arch LIST] [--sdist FILE] [--python PY] OUT_DIR}
    die() { echo "build_horovod.sh: $*" >&2; exit 1; }
    has_module() { "$PY" -c "import $1" >/dev/null 2>&1; }

    WORK=$(mktemp -d)
    trap 'rm -rf "$WORK"' EXIT
    SITE=${HVDSCALE_PY_SITE:-$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')}
    has_module torch || die "$PY has no torch: Horovod is built for the torch it will run with"
    # the C++ standard torch's headers need (patch_horovod.sh edit 1)
    HVDSCALE_TORCH_CXX_STANDARD=$("$PY" -c 'import torch; v = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]); print(20 if v >= (2, 14) else 17)')
    export HVDSCALE_TORCH_CXX_STANDARD

    # ------------------------------------------------------------------ frameworks and controllers
    export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MXNET=1
    case "$TF" in
        auto) if has_module tensorflow; then TF=yes; else TF=no; fi ;;
        yes|no) ;;
        *) die "--tensorflow takes auto, yes or no" ;;
    esac
    if [ "$TF" = yes ]; then export HOROVOD_WITH_TENSORFLOW=1; else export HOROVOD_WITHOUT_TENSORFLOW=1; fi
    case "$MPI" in
        auto) if command -v mpicxx >/dev/null; then MPI=yes; else MPI=no; fi ;;
        yes|no) ;;
        *) die "--mpi takes auto, yes or no" ;;
    esac
    if [ "$MPI" = yes ]; then export HOROVOD_WITH_MPI=1; else export HOROVOD_WITHOUT_MPI=1; fi

    # ------------------------------------------------------------------ GPU: toolkit, NCCL, arch
    find_cuda() {
        local candidate nvcc
        case "$TOOLKIT" in
            auto) ;;
            pip) ;;
            *) [ -x "$TOOLKIT/bin/nvcc" ] && { echo "$TOOLKIT"; return; }; return 1 ;;
        esac
        if [ "$TOOLKIT" = auto ]; then
            for candidate in "${HOROVOD_CUDA_HOME:-}" "${CUDA_HOME:-}"; do
                [ -n "$candidate" ] && [ -x "$candidate/bin/nvcc" ] && { echo "$candidate"; return; }
            done
            if nvcc=$(command -v nvcc); then
                nvcc=$(readlink -f "$nvcc"); echo "${nvcc%/bin/nvcc}"; return
            fi
            [ -x /usr/local/cuda/bin/nvcc ] && { echo /usr/local/cuda; return; }
        fi
        # PyPI's toolkit pieces share nvidia/cu13; CMake's FindCUDAToolkit also wants an
        # unversioned libcudart.so, which the wheel lacks: a scratch root of links adds it.
        local pypi="$SITE/nvidia/cu13"
        if [ -x "$pypi/bin/nvcc" ] && [ -f "$pypi/include/cuda_runtime.h" ]; then
            # (real folders of links: nvcc finds its tree as bin/.., which a linked folder escapes)
            mkdir -p "$WORK/cuda/lib" "$WORK/cuda/bin"
            for d in include nvvm; do ln -s "$pypi/$d" "$WORK/cuda/$d"; done
            ln -s "$pypi"/bin/* "$WORK/cuda/bin/"
            ln -s "$pypi"/lib/* "$WORK/cuda/lib/"
            ln -s libcudart.so.13 "$WORK/cuda/lib/libcudart.so"
            ln -s lib "$WORK/cuda/lib64"
            echo "$WORK/cuda"; return
        fi
        return 1
    }
    if [ "$GPU" = 1 ]; then
        CUDA=$(find_cuda) || die "no CUDA toolkit (nvcc): set CUDA_HOME, or pip install 'nvidia-cuda-nvcc==13.0.*' 'nvidia-cuda-runtime==13.0.*' 'nvidia-cuda-crt==13.0.*' 'nvidia-cuda-cccl==13.0.*' 'nvidia-nvvm==13.0.*'"
        export HOROVOD_CUDA_HOME="$CUDA" CUDAToolkit_ROOT="$CUDA" PATH="$CUDA/bin:$PATH"
        export HOROVOD_GPU_OPERATIONS=NCCL
        # One libnccl in the process: the one torch loads (the same soname), linked shared.
        export HOROVOD_NCCL_LINK=SHARED
        if [ -z "${HOROVOD_NCCL_HOME:-}${HOROVOD_NCCL_INCLUDE:-}" ] \
           && ! ldconfig -p 2>/dev/null | grep -q 'libnccl\.so '; then
            nccl="$SITE/nvidia/nccl"
            { [ -f "$nccl/include/nccl.h" ] && [ -f "$nccl/lib/libnccl.so.2" ]; } \
                || die "no NCCL: set HOROVOD_NCCL_HOME, or pip install nvidia-nccl-cu13"
            # the wheel has only libnccl.so.2; FindNCCL looks for libnccl.so
            mkdir -p "$WORK/nccl-lib"
            ln -s "$nccl/lib/libnccl.so.2" "$WORK/nccl-lib/libnccl.so"
            export HOROVOD_NCCL_INCLUDE="$nccl/include" HOROVOD_NCCL_LIB="$WORK/nccl-lib"
        fi
        [ -n "$ARCH" ] || ARCH=$(bash "$here/build_horovod.sh" --print-arch)
        supported=$("$CUDA/bin/nvcc" --list-gpu-arch 2>/dev/null | tr -cd '0-9\n' | paste -sd' ' || true)
        for cc in ${ARCH//;/ }; do
            [ -z "$supported" ] || [[ " $supported " == *" $cc "* ]] \
                || die "--cuda-arch: this nvcc cannot build compute capability $cc (it has: $supported)"
        done
        export HOROVOD_BUILD_CUDA_CC_LIST="${ARCH//;/,}"
    else
        export HOROVOD_WITHOUT_GPU=1 HOROVOD_CPU_OPERATIONS=gloo
    fi

    if [ "$DRY" = 1 ]; then
        env | grep -E '^(HOROVOD_|CUDAToolkit_ROOT|HVDSCALE_TORCH_CXX)' | sort
        [ -z "${HOROVOD_NCCL_LIB:-}" ] || ls "$HOROVOD_NCCL_LIB"
        exit 0
    fi

    # ------------------------------------------------------------------ build
    if [ -z "$SDIST" ]; then
        "$PY" -m pip download --no-deps --no-binary :all: "horovod==$HVD_V" -d "$WORK" >/dev/null
        SDIST="$WORK/horovod-$HVD_V.tar.gz"
    fi
    [ -f "$SDIST" ] || die "no Horovod sdist at $SDIST"
    tar -xzf "$SDIST" -C "$WORK"
    bash "$here/patch_horovod.sh" "$WORK/horovod-$HVD_V"
    MAKEFLAGS="-j${HVDSCALE_BUILD_JOBS:-$(nproc)}"
    # CMake 4 refuses the bundled Gloo's cmake_minimum_required(2.8.12) without this.
    export MAKEFLAGS CMAKE_POLICY_VERSION_MINIMUM=3.5
    WHAT="torch=yes(c++$HVDSCALE_TORCH_CXX_STANDARD) tensorflow=$TF gloo=yes mpi=$MPI"
    [ "$GPU" = 0 ] || WHAT="$WHAT nccl=${HOROVOD_NCCL_INCLUDE:-${HOROVOD_NCCL_HOME:-system}} cuda=$HOROVOD_CUDA_HOME arch=$ARCH"
    echo "build_horovod.sh: horovod $HVD_V $WHAT $MAKEFLAGS"
    "$PY" -m pip wheel --no-build-isolation --no-deps -w "$WORK/wheel" "$WORK/horovod-$HVD_V"

    # Strip the debug information RelWithDebInfo leaves (about 10x the code): a GPU wheel of a
    # few MB travels where one of 100+ MB does not.
    whl=$(ls "$WORK"/wheel/horovod-*.whl)
    mkdir -p "$OUT"
    rm -f "$OUT"/horovod-*.whl
    if has_module wheel && command -v strip >/dev/null; then
        "$PY" -m wheel unpack -d "$WORK/unpacked" "$whl" >/dev/null
        find "$WORK/unpacked" -name '*.so' -exec strip --strip-debug {} +
        "$PY" -m wheel pack -d "$OUT" "$WORK"/unpacked/horovod-* >/dev/null
    else
        cp "$whl" "$OUT"/
    fi
    ls "$OUT"/horovod-*.whl
}
main "$@"
