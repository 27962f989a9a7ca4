#!/usr/bin/env bash
# `make demo`: the default recipe under horovodrun, PyTorch first, then TensorFlow, and the
# report comparing the two runs (runs/demo-report-npNP/index.html).
#   launchers/demo.sh [NP] [RECIPE]
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NP=${1:-2}
RECIPE=${2:-pipelines/fashion_mnist_lamb.yaml}
BIN="$ROOT/.venv/bin"
cd "$ROOT"
runs=()
for fw in torch tensorflow; do
    out="runs/demo-$fw-np$NP"
    echo "==> hvdscale train $RECIPE --set framework=$fw on $NP workers (output: $out)"
    "$BIN/horovodrun" -np "$NP" --gloo "$BIN/hvdscale" train "$RECIPE" \
        --set framework="$fw" --out "$out" --overwrite   # an earlier demo moves aside
    runs+=("$out")
done
echo "==> hvdscale report ${runs[*]}"
"$BIN/hvdscale" report "${runs[@]}" --out "runs/demo-report-np$NP"
echo "(a local file: open it in a browser, no server needed)"
