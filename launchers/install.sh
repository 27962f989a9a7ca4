#!/usr/bin/env bash
# hvdscale's one install path (README, CI and the Dockerfile all call it).
#
#   launchers/install.sh [--gpu] [--no-apt] [--force] [--cuda-arch "80;90"] [--print-wheel-key]
#
# --cuda-arch (or HVDSCALE_CUDA_ARCH): the compute capabilities the GPU build targets; default
# the GPUs of this machine, else "80;90" (CUDA 13 builds nothing below 7.5); a CPU install
# ignores it. --print-wheel-key: the cache folder name of the Horovod wheel this install would
# use (horovod-VERSION-KEY); installs nothing.
#
# Creates .venv/ at the repository root with pinned torch, TensorFlow, Horovod 0.28.1
# (built from its sdist with launchers/patch_horovod.sh), mpi4py, DALI and hvdscale itself.
# The built Horovod wheel is cached outside the repository, keyed by the versions and the
# patch, so a second install reuses it. Idempotent: a complete, up-to-date .venv is left
# alone. On any failure the .venv is removed and one line names the step that failed.
set -Eeuo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="$ROOT/.venv"
CONSTRAINTS="$ROOT/launchers/constraints.txt"
PATCH="$ROOT/launchers/patch_horovod.sh"
BUILDER="$ROOT/launchers/build_horovod.sh"
PATCH_HASH=$(bash "$PATCH" --hash)     # the script and the diff it applies
STAMP="$VENV/.hvdscale-install-complete"
CACHE="${HVDSCALE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hvdscale}"
LOG="$ROOT/.install.log"
PYTHON="${PYTHON:-python3}"

GPU=0; APT=1; FORCE=0; PRINT_KEY=0; CUDA_ARCH="${HVDSCALE_CUDA_ARCH:-}"
while [ $# -gt 0 ]; do
    case "$1" in
        --gpu) GPU=1 ;;
        --no-apt) APT=0 ;;
        --force) FORCE=1 ;;
        --print-wheel-key) PRINT_KEY=1 ;;
        --cuda-arch) CUDA_ARCH="$2"; shift ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown option '$1' (try --help)" >&2; exit 2 ;;
    esac
    shift
done

STEP="start"
PACKAGE="-"
CREATED_VENV=0
on_error() {
    local rc=$?
    trap - ERR
    echo "---- last lines of $LOG ----" >&2
    tail -n 25 "$LOG" >&2 2>/dev/null || true
    # Never leave a half-made environment that later looks usable.
    if [ "$CREATED_VENV" = 1 ] || [ ! -f "$STAMP" ]; then rm -rf "$VENV"; fi
    echo "install.sh: FAILED at step '$STEP' (package: $PACKAGE, exit $rc); full log: $LOG" >&2
    exit "$rc"
}
trap on_error ERR

step() { STEP="$1"; PACKAGE="${2:--}"; echo "==> [$(date +%H:%M:%S)] $1${2:+ ($2)}"; }
pin() { grep -E "^$1==" "$CONSTRAINTS" | head -n1 | cut -d= -f3; }
run() { "$@" >>"$LOG" 2>&1; }

MODE=$([ "$GPU" = 1 ] && echo gpu || echo cpu)
# The architectures shape the GPU build only: a CPU wheel's key leaves them out, so the CPU
# image (built with the Dockerfile's --cuda-arch) finds the wheel a CPU host install built.
if [ "$GPU" = 1 ]; then
    [ -n "$CUDA_ARCH" ] || CUDA_ARCH=$(bash "$BUILDER" --print-arch)
else
    CUDA_ARCH=""
fi
# The Horovod wheel's cache key: the versions and build inputs the wheel depends on.
wheel_key() {
    local pyv mpi_v
    pyv=$("$1" -c 'import sys; print("%d%d" % sys.version_info[:2])')
    mpi_v=$(mpirun --version 2>/dev/null | head -n1 | tr -cd '0-9.' || echo none)
    printf '%s\n' "horovod=$(pin horovod)" "torch=$(pin torch)" "tf=$(pin tensorflow)" "py=$pyv" \
        "mpi=$mpi_v" "mode=$MODE" "arch=$CUDA_ARCH" "$PATCH_HASH" \
        "$(sha256sum "$BUILDER" | cut -c1-16)" | sha256sum | cut -c1-16
}
if [ "$PRINT_KEY" = 1 ]; then
    trap - ERR          # a read-only question: never the cleanup of a failed install
    KEY_PY="$PYTHON"; [ -x "$VENV/bin/python" ] && KEY_PY="$VENV/bin/python"
    echo "horovod-$(pin horovod)-$(wheel_key "$KEY_PY")"
    exit 0
fi

: >"$LOG"
# What the finished venv must match: pins, this script, the patch, setup.cfg, the mode.
WANT=$( (cat "$CONSTRAINTS" "$0" "$BUILDER" "$ROOT/setup.cfg"; echo "$PATCH_HASH") | sha256sum | cut -c1-16)-$MODE

if [ "$FORCE" = 0 ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
    echo "install.sh: $VENV is complete and up to date ($WANT); nothing to do"
    exit 0
fi

# ---------------------------------------------------------------------------------------
step "system packages" "apt: build-essential cmake patch libopenmpi-dev openmpi-bin dataset-fashion-mnist"
APT_PKGS=(build-essential cmake patch libopenmpi-dev openmpi-bin dataset-fashion-mnist
          shellcheck iproute2 openssh-server openssh-client procps)
# for the tests only (without them those tests skip, saying why): chromium renders
# `hvdscale report`'s page headless. HVDSCALE_TEST_PACKAGES=0 leaves them out (the image).
TEST_APT_PKGS=(chromium)
if [ "${HVDSCALE_TEST_PACKAGES:-1}" = 0 ]; then TEST_APT_PKGS=(); fi
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
missing=()
for p in "${APT_PKGS[@]}"; do installed "$p" || missing+=("$p"); done
missing_tests=()
for p in "${TEST_APT_PKGS[@]}"; do installed "$p" || missing_tests+=("$p"); done
if [ "${#missing[@]}" -gt 0 ] && [ "$APT" = 0 ]; then
    echo "install.sh: missing system packages (${missing[*]}) and --no-apt given" >&2; false
fi
if [ "$APT" = 1 ] && [ $(( ${#missing[@]} + ${#missing_tests[@]} )) -gt 0 ]; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    PACKAGE="apt: ${missing[*]} ${missing_tests[*]}"
    run $SUDO apt-get update || [ "${#missing[@]}" = 0 ]     # test packages alone: not fatal
    if [ "${#missing[@]}" -gt 0 ]; then
        run env DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends "${missing[@]}"
    fi
    if [ "${#missing_tests[@]}" -gt 0 ] && ! run env DEBIAN_FRONTEND=noninteractive $SUDO \
            apt-get install -y --no-install-recommends "${missing_tests[@]}"; then
        echo "install.sh: warning: could not install ${missing_tests[*]} (tests that need it skip)" >&2
    fi
fi

# ---------------------------------------------------------------------------------------
step "virtual environment" "$VENV"
rm -f "$STAMP"
if [ ! -x "$VENV/bin/python" ]; then
    rm -rf "$VENV"
    CREATED_VENV=1
    run "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
[ -d /opt/wheels ] && PIP_LOCAL=(--find-links /opt/wheels) || PIP_LOCAL=()
PIPI=("${PIP[@]}" install -c "$CONSTRAINTS" "${PIP_LOCAL[@]}")
run "${PIP[@]}" install -c "$CONSTRAINTS" pip setuptools wheel

TORCH_V=$(pin torch); TF_V=$(pin tensorflow); HVD_V=$(pin horovod); DALI_V=$(pin nvidia-dali-cuda130)
if [ "$GPU" = 1 ]; then
    TORCH_REQ="torch==$TORCH_V"; TF_REQ="tensorflow==$TF_V"
else
    # The CPU build, never the multi-GB CUDA one.
    TORCH_REQ="torch==$TORCH_V+cpu"; TF_REQ="tensorflow-cpu==$TF_V"
fi

step "deep-learning frameworks" "$TORCH_REQ $TF_REQ"
run "${PIPI[@]}" "$TORCH_REQ" "$TF_REQ" tf_keras numpy

step "python dependencies" "hvdscale[dev] requirements"
run "${PIPI[@]}" -e "${ROOT}[dev]"

step "mpi4py" "mpi4py (built against the system MPI)"
run "${PIPI[@]}" --no-binary mpi4py mpi4py

# ---------------------------------------------------------------------------------------
step "horovod wheel" "horovod==$HVD_V"
BUILD_ARGS=(--python "$VENV/bin/python" --mpi yes --tensorflow yes)
[ "$GPU" = 0 ] || BUILD_ARGS+=(--gpu --cuda-arch "$CUDA_ARCH")
WHEEL_DIR="$CACHE/horovod-$HVD_V-$(wheel_key "$VENV/bin/python")"
if ls "$WHEEL_DIR"/horovod-*.whl >/dev/null 2>&1; then
    echo "    cached wheel: $WHEEL_DIR"
else
    # launchers/build_horovod.sh: the sdist, the patches, NCCL/CUDA discovery, a stripped wheel
    echo "    building from source into $WHEEL_DIR (several minutes on 2 cores); log: $LOG"
    rm -rf "$WHEEL_DIR.tmp"
    run bash "$BUILDER" "${BUILD_ARGS[@]}" "$WHEEL_DIR.tmp"
    rm -rf "$WHEEL_DIR"; mv "$WHEEL_DIR.tmp" "$WHEEL_DIR"   # appears whole or not at all
fi
run "${PIPI[@]}" --no-deps --force-reinstall "$WHEEL_DIR"/horovod-*.whl
# Horovod's own runtime requirements (not taken from the wheel to keep numpy/torch pinned).
run "${PIPI[@]}" cloudpickle psutil pyyaml packaging

# ---------------------------------------------------------------------------------------
step "DALI" "nvidia-dali-cuda130==$DALI_V"
run "${PIPI[@]}" "nvidia-dali-cuda130==$DALI_V"
step "DALI TensorFlow plugin" "nvidia-dali-tf-plugin-cuda130==$DALI_V (compiles against TF)"
# Its DALI stub includes the CUDA runtime headers. Without a CUDA toolkit (CPU-only machines,
# the CPU image) they come from NVIDIA's header wheels, unpacked for this build only.
PLUGIN_ENV=()
HEADERS=""
if [ ! -f "${CUDA_HOME:-/usr/local/cuda}/include/cuda_runtime_api.h" ]; then
    HEADERS=$(mktemp -d)
    run "${PIP[@]}" download --no-deps -d "$HEADERS/wheels" "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-crt==13.0.*"
    for whl in "$HEADERS"/wheels/*.whl; do run "$VENV/bin/python" -m zipfile -e "$whl" "$HEADERS/tree"; done
    PLUGIN_ENV=(env "CPATH=$HEADERS/tree/nvidia/cu13/include${CPATH:+:$CPATH}")
fi
run "${PLUGIN_ENV[@]}" "${PIPI[@]}" --no-build-isolation "nvidia-dali-tf-plugin-cuda130==$DALI_V"
[ -z "$HEADERS" ] || rm -rf "$HEADERS"

# ---------------------------------------------------------------------------------------
step "verify" "horovod.torch horovod.tensorflow"
run "$VENV/bin/python" -c "import horovod.torch, horovod.tensorflow, mpi4py, nvidia.dali, hvdscale"
"$VENV/bin/horovodrun" --check-build >>"$LOG" 2>&1
for need in PyTorch TensorFlow Gloo MPI; do
    PACKAGE="horovod built without $need"
    grep -E "\[X\] $need" "$LOG" >/dev/null
done
echo "$WANT" >"$STAMP"
trap - ERR
echo "install.sh: done ($MODE); $VENV is ready. Next: make demo | make test"
