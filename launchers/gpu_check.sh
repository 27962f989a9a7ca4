#!/usr/bin/env bash
# shellcheck disable=SC2317  # the stage functions run through `bash -c` (exported)
# The GPU check in stages, for a GPU host with no network (the bundle from
# launchers/gpu_prepare.sh travels with the tree) or a cluster node with hvdscale installed:
#
#   launchers/gpu_check.sh OUT_DIR              # on the GPU host
#   launchers/gpu_check.sh --simulate OUT_DIR   # on a CPU: the stages up to the first CUDA-only one
#
#   host        python, torch, GPUs and compute capability, TF/DALI present?
#   bundle      installs the bundle's wheels (into a scratch folder), reads its Fashion-MNIST
#   horovod     Horovod with NCCL: the one installed, a wheel carried in the bundle, else built
#               (launchers/build_horovod.sh: NCCL + Gloo, torch, TF only where present, this
#               GPU's compute capability, -j$(nproc)); a built wheel is copied to OUT_DIR
#   allreduce   size-1 hvd.allreduce of a CUDA tensor through NCCL          (CUDA)
#   sync_free   20 steps of LAMB/LARS/SGD under set_sync_debug_mode("error") (CUDA)
#   throughput  ResNet-50 bf16 channels_last, ours vs a plain AMP loop     (CUDA)
#   recipe      the demo recipe in bf16 on the GPU(s): its test accuracy    (CUDA)
#   pytest_gpu  tests/test_gpu.py (marker gpu)                              (CUDA)
#   tensorflow  TF on the GPU and horovod.tensorflow, where TF is installed (CUDA)
#   dali        the DALI mixed-decoding path, where DALI is installed       (CUDA)
#
# OUT_DIR gets summary.json (rewritten after every stage: a killed run still says how far it
# got; a `stages` list with each status: ok, failed, timeout, skipped, needs_cuda (simulate),
# not_reached), check.log (every stage's output) and the built wheel: at most 3 files. The
# stage limits add up to 540 s. To skip the build next time, copy the wheel into the bundle:
#   cp OUT_DIR/horovod-*.whl .gpu_bundle/
# Environment: HVDSCALE_PYTHON (default .venv/bin/python, else python3), HVDSCALE_GPU_BUNDLE
# (default .gpu_bundle), HVDSCALE_CUDA_ARCH (default: the GPUs present).
set -uo pipefail

SIMULATE=0
if [ "${1:-}" = "--simulate" ]; then SIMULATE=1; shift; fi
OUT=${1:?usage: launchers/gpu_check.sh [--simulate] OUT_DIR}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${HVDSCALE_PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || command -v "$PY" >/dev/null || PY=python3
PY=$(command -v "$PY")
PATH="$(dirname "$PY"):$PATH"; export PATH     # its cmake, pip scripts
BUNDLE=${HVDSCALE_GPU_BUNDLE:-$ROOT/.gpu_bundle}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
SITE="$WORK/site"         # what the bundle and the build add, ahead of the environment's own
mkdir -p "$SITE"
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_DEBUG=${NCCL_DEBUG:-WARN}
cd "$ROOT" || exit 2
STAGES="$WORK/stages.jsonl"
: >"$STAGES"
: >"$OUT/check.log"
STOPPED=""
FAILED=0
STAGE_PY="$ROOT/benchmarks/gpu_check_stages.py"

write_summary() {
    "$PY" - "$STAGES" "$OUT/summary.json" "$SIMULATE" "$STOPPED" <<'PY'
import json, os, sys
stages_file, out, simulate, stopped = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4]
stages = [json.loads(line) for line in open(stages_file) if line.strip()]
host = next((s.get("result") for s in stages if s["name"] == "host"), None)
summary = {"mode": "simulate" if simulate else "gpu", "stopped_at": stopped or None,
           "host": host, "limits_total_s": sum(s["limit_s"] for s in stages),
           "stages": stages}
tmp = out + ".tmp"
with open(tmp, "w") as fh:
    fh.write(json.dumps(summary, indent=1) + "\n")
os.replace(tmp, out)
PY
}

record() {  # name status limit seconds [reason]; the stage's last output line if JSON
    local result="null"
    if [ -s "$WORK/$1.out" ]; then
        result=$(tail -n 1 "$WORK/$1.out" | "$PY" -c 'import json,sys
try: print(json.dumps(json.loads(sys.stdin.read())))
except ValueError: print("null")')
    fi
    printf '{"name": "%s", "status": "%s", "limit_s": %s, "seconds": %s, "reason": "%s", "result": %s}\n' \
        "$1" "$2" "$3" "$4" "${5:-}" "$result" >>"$STAGES"
    echo "==> $1: $2 (${4}s of ${3}s)${5:+ - $5}"
    write_summary
}

# stage NAME LIMIT_S NEEDS(cuda|-) COMMAND...: runs it with a time limit, or records why not
stage() {
    local name=$1 limit=$2 needs=$3 t0=$SECONDS rc status reason=""
    shift 3
    if [ -n "$STOPPED" ]; then record "$name" not_reached "$limit" 0 "stopped at $STOPPED"; return; fi
    if [ "$SIMULATE" = 1 ] && [ "$needs" = cuda ]; then
        STOPPED=$name
        record "$name" needs_cuda "$limit" 0 "simulation: the first stage that needs CUDA"
        return
    fi
    echo "==> [$(date +%H:%M:%S)] $name (limit ${limit}s)"
    { echo; echo "======== $name"; } >>"$OUT/check.log"
    # the limits are the GPU host's; a simulation on a small shared CPU gets 10 times as long
    timeout --kill-after=5 $((SIMULATE ? limit * 10 : limit)) "$@" >"$WORK/$name.out" 2>&1
    rc=$?
    cat "$WORK/$name.out" >>"$OUT/check.log"
    case $rc in
        0) status=ok ;;
        77) status=skipped; reason=$(tail -n 1 "$WORK/$name.out" | cut -c1-200 | tr -d '\042\134') ;;
        124|137) status=timeout; FAILED=1 ;;
        *) status=failed; reason="exit $rc: $(grep -v '^\s*$' "$WORK/$name.out" | tail -n 1 | cut -c1-200 | tr -d '\042\134')"; FAILED=1 ;;
    esac
    record "$name" "$status" "$limit" $((SECONDS - t0)) "$reason"
}

# ------------------------------------------------------------------------------ stage bodies
install_bundle_wheels() {
    local wheels=("$BUNDLE"/wheels/*.whl)
    [ -e "${wheels[0]}" ] || { echo "no wheels in $BUNDLE/wheels"; return 0; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "${wheels[@]}"
}

check_bundle() { install_bundle_wheels && "$PY" "$STAGE_PY" bundle --bundle "$BUNDLE"; }

has_nccl() { "$PY" -c 'import horovod.torch as h, sys; sys.exit(0 if h.nccl_built() else 1)' 2>/dev/null; }

get_horovod() {
    local carried=("$BUNDLE"/horovod-*.whl)
    if has_nccl; then
        echo "Horovod with NCCL is installed"
    elif [ -f "${carried[0]}" ]; then
        echo "installing the carried wheel ${carried[0]}"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "${carried[0]}"
    elif [ "$SIMULATE" = 1 ]; then
        if ! "$PY" -c 'import horovod.torch' 2>/dev/null; then
            echo "simulation: no Horovod installed (the GPU run builds one)"; return 77
        fi
        echo "simulation: the installed Horovod (without NCCL) stands in"
    else
        local sdist=("$BUNDLE"/horovod-0.28.1.tar.gz)
        local args=(--gpu --python "$PY" --mpi auto)
        [ -f "${sdist[0]}" ] && args+=(--sdist "${sdist[0]}")
        [ -n "${HVDSCALE_CUDA_ARCH:-}" ] && args+=(--cuda-arch "$HVDSCALE_CUDA_ARCH")
        bash "$ROOT/launchers/build_horovod.sh" "${args[@]}" "$WORK/wheel" || return 1
        cp "$WORK"/wheel/horovod-*.whl "$OUT"/
        "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WORK"/wheel/horovod-*.whl
    fi
    "$PY" "$STAGE_PY" horovod
}

train_recipe() {
    local gpus np=()
    gpus=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
    [ "$gpus" -gt 1 ] && np=("$PY" -m horovod.runner.launch -np "$gpus")
    "${np[@]}" "$PY" -m hvdscale train pipelines/fashion_mnist_lamb.yaml \
        --set train.precision=bf16 --set log.progress=false --set log.tensorboard=false \
        --set data.path="$BUNDLE/fashion-mnist" --out "$WORK/train" || return 1
    "$PY" - "$WORK/train" <<'PY'
import json, sys, pathlib
lines = [json.loads(l) for l in (pathlib.Path(sys.argv[1]) / "metrics.jsonl").read_text().splitlines() if l.strip()]
evals = [l for l in lines if "test_accuracy" in l]
print(json.dumps({"recipe": "fashion_mnist_lamb", "precision": "bf16",
                  "test_accuracy": evals[-1]["test_accuracy"] if evals else None,
                  "last": lines[-1] if lines else None}))
PY
}

run_dali() {
    "$PY" -c 'import nvidia.dali' 2>/dev/null || { echo "no DALI in this environment"; return 77; }
    "$PY" benchmarks/gpu_throughput.py --skip peer --images 1024 --steps 10 --warmup 5 \
        --repeats 2 --batch 128
}

# ------------------------------------------------------------------------------ the stages
# limits: 10 + 20 + 210 + 20 + 40 + 110 + 50 + 40 + 20 + 20 = 540 s
stage host 10 - "$PY" "$STAGE_PY" host
export -f install_bundle_wheels check_bundle get_horovod has_nccl train_recipe run_dali
export PY SITE BUNDLE OUT WORK ROOT SIMULATE STAGE_PY
stage bundle 20 - bash -c check_bundle
stage horovod 210 - bash -c get_horovod
stage allreduce 20 cuda "$PY" "$STAGE_PY" allreduce --timeline "$WORK/timeline.json"
stage sync_free 40 cuda "$PY" "$STAGE_PY" sync_free --steps 20 --batch 64
stage throughput 110 cuda "$PY" "$STAGE_PY" throughput --batch 256 --steps 15 --warmup 8 --repeats 3
stage recipe 50 cuda bash -c train_recipe
stage pytest_gpu 40 cuda "$PY" -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider
stage tensorflow 20 cuda "$PY" "$STAGE_PY" tensorflow
stage dali 20 cuda bash -c run_dali
echo "==> summary: $OUT/summary.json"
exit $FAILED
