#!/usr/bin/env bash
# The whole GPU check in one command, for a host with one or more NVIDIA GPUs, a CUDA build
# of torch in the environment and no internet:
#
#   launchers/gpu_check.sh OUT_DIR
#
#   1. Horovod with NCCL (HOROVOD_GPU_OPERATIONS=NCCL): kept if the installed one has it,
#      else built from the cached sdist (or a cached NCCL wheel) and installed
#   2. hvdscale doctor --json --require torch,nccl
#   3. pytest -m gpu (tests/test_gpu.py: device batches, channels_last, fp16/bf16, no host sync)
#   4. horovodrun -np <GPUs> hvdscale train pipelines/fashion_mnist_lamb.yaml (bf16, on the GPUs)
#   5. benchmarks/gpu_throughput.py (ResNet-50: synthetic ceiling, DALI mixed decoding, peer)
#
# Every step writes OUT_DIR/<step>.log; measurements go to OUT_DIR/*.json and a summary of
# all steps to OUT_DIR/summary.json. A failed step is recorded and the next one still runs.
# Sized to finish within 10 minutes on one H100/H200 (per-step time limits below).
# Environment: HVDSCALE_PYTHON (default .venv/bin/python), HVDSCALE_CACHE (sdist/wheel cache,
# default ~/.cache/hvdscale), HOROVOD_SDIST (a horovod-0.28.1.tar.gz to build from),
# HVDSCALE_CUDA_ARCH (default 90;80).
set -uo pipefail

OUT=${1:?usage: launchers/gpu_check.sh OUT_DIR}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${HVDSCALE_PYTHON:-$ROOT/.venv/bin/python}
BIN=$(dirname "$PY")
CACHE=${HVDSCALE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hvdscale}
HVD_V=0.28.1
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PATH="$BIN:$PATH" TF_CPP_MIN_LOG_LEVEL=2
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_DEBUG=${NCCL_DEBUG:-WARN}
cd "$ROOT" || exit 2

STEPS=()
record() {  # name rc seconds
    STEPS+=("{\"step\": \"$1\", \"rc\": $2, \"seconds\": $3}")
    echo "==> $1: rc $2 in ${3}s (log: $OUT/$1.log)"
}
run_step() {  # name timeout_s command...
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    echo "==> [$(date +%H:%M:%S)] $name (limit ${limit}s)"
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    record "$name" $? $((SECONDS - t0))
}

# ------------------------------------------------------------------------------ 0. the host
nvidia-smi >"$OUT/nvidia-smi.log" 2>&1
GPUS=$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>>"$OUT/nvidia-smi.log" || echo 0)
echo "==> $GPUS GPU(s) visible to torch"
if [ "${GPUS:-0}" -lt 1 ]; then
    echo "gpu_check.sh: torch sees no CUDA GPU (see $OUT/nvidia-smi.log)" >&2
    echo "{\"gpus\": 0, \"error\": \"torch sees no CUDA GPU\"}" >"$OUT/summary.json"
    exit 1
fi

# ------------------------------------------------------------------------------ 1. Horovod+NCCL
has_nccl() { "$PY" -c 'import horovod.torch as h, sys; sys.exit(0 if h.nccl_built() else 1)' 2>/dev/null; }
# shellcheck disable=SC2317  # run through `bash -c build_horovod` (exported)
build_horovod() {
    set -e
    local site nccl cuda build wheel_dir key
    key=$("$PY" -c 'import torch, sys; print(f"{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}")')
    wheel_dir="$CACHE/horovod-$HVD_V-nccl-$key-$(bash "$ROOT/launchers/patch_horovod.sh" --hash | cut -c1-12)"
    if ! ls "$wheel_dir"/horovod-*.whl >/dev/null 2>&1; then
        local sdist=${HOROVOD_SDIST:-}
        [ -n "$sdist" ] || sdist=$(find "$CACHE" -maxdepth 2 -name "horovod-$HVD_V.tar.gz" 2>/dev/null | head -n1)
        if [ -z "$sdist" ]; then   # online hosts can still fetch it
            "$PY" -m pip download --no-deps --no-binary :all: "horovod==$HVD_V" -d "$CACHE"
            sdist="$CACHE/horovod-$HVD_V.tar.gz"
        fi
        build=$(mktemp -d)
        tar -xzf "$sdist" -C "$build"
        bash "$ROOT/launchers/patch_horovod.sh" "$build/horovod-$HVD_V"
        site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
        nccl=${HOROVOD_NCCL_HOME:-}
        [ -n "$nccl" ] || { [ -d "$site/nvidia/nccl" ] && nccl="$site/nvidia/nccl"; }
        cuda=${HOROVOD_CUDA_HOME:-${CUDA_HOME:-/usr/local/cuda}}
        echo "nccl: ${nccl:-system}  cuda: $cuda"
        export HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_TENSORFLOW=1
        export HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_CUDA_HOME="$cuda"
        local arch=${HVDSCALE_CUDA_ARCH:-90;80} jobs
        jobs=$(nproc)
        export HOROVOD_BUILD_CUDA_CC_LIST="${arch//;/,}" HOROVOD_CUDA_ARCH_LIST="$arch"
        export MAKEFLAGS="-j$jobs"
        [ -z "$nccl" ] || export HOROVOD_NCCL_HOME="$nccl"
        "$PY" -m pip wheel --no-build-isolation --no-deps -w "$build/wheel" "$build/horovod-$HVD_V"
        mkdir -p "$wheel_dir"
        cp "$build"/wheel/horovod-*.whl "$wheel_dir"/
        rm -rf "$build"
    fi
    "$PY" -m pip install --no-index --no-deps --force-reinstall "$wheel_dir"/horovod-*.whl
    has_nccl
}
if has_nccl; then
    echo "Horovod already has NCCL" >"$OUT/horovod_nccl.log"; record horovod_nccl 0 0
else
    export -f build_horovod has_nccl
    export PY ROOT CACHE HVD_V
    run_step horovod_nccl 300 bash -c build_horovod
fi

# ------------------------------------------------------------------------------ 2.-5.
run_step doctor 60 "$BIN/hvdscale" doctor --json --require torch,nccl
tail -n 1 "$OUT/doctor.log" >"$OUT/doctor.json" 2>/dev/null

run_step pytest_gpu 120 "$PY" -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider \
    --junitxml="$OUT/pytest_gpu.xml"

rm -rf "$OUT/train"
run_step train 150 "$BIN/horovodrun" -np "$GPUS" "$BIN/hvdscale" train \
    pipelines/fashion_mnist_lamb.yaml --set train.precision=bf16 --set log.progress=false \
    --out "$OUT/train"
tail -n 1 "$OUT/train/metrics.jsonl" >"$OUT/train.json" 2>/dev/null

run_step throughput 240 "$PY" benchmarks/gpu_throughput.py --images 3000 --steps 30 \
    --warmup 15 --repeats 3 --out "$OUT/throughput.json"

# ------------------------------------------------------------------------------ summary
printf '%s\n' "${STEPS[@]}" | "$PY" -c '
import json, sys
out, gpus = sys.argv[1], int(sys.argv[2])
def last_json(name):
    try:
        return json.loads(open(f"{out}/{name}").read().strip().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        return None
steps = [json.loads(line) for line in sys.stdin if line.strip()]
summary = {"gpus": gpus, "steps": steps, "doctor": last_json("doctor.json"),
           "train": last_json("train.json"), "throughput": last_json("throughput.json")}
open(f"{out}/summary.json", "w").write(json.dumps(summary, indent=1) + "\n")
' "$OUT" "$GPUS"
echo "==> summary: $OUT/summary.json"
failed=0
for s in "${STEPS[@]}"; do case "$s" in *'"rc": 0,'*) ;; *) failed=1 ;; esac; done
exit $failed
