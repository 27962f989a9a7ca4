#!/usr/bin/env bash
# Fill the bundle that launchers/gpu_check.sh uses on a GPU host without network; run it on a
# machine with network, then carry the folder (about 35 MB) with the tree:
#
#   launchers/gpu_prepare.sh [BUNDLE_DIR]        (default .gpu_bundle, ignored by git)
#
#   BUNDLE_DIR/horovod-0.28.1.tar.gz      the sdist build_horovod.sh compiles
#   BUNDLE_DIR/wheels/*.whl               hvdscale's pure-Python needs that a bare GPU image
#                                         lacks (for Python 3.12 and later)
#   BUNDLE_DIR/fashion-mnist/*.gz         the demo recipe's data (Debian's dataset-fashion-mnist)
# A Horovod wheel built by an earlier check (OUT_DIR/horovod-*.whl) copied into BUNDLE_DIR is
# installed instead of building again.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUNDLE=${1:-$ROOT/.gpu_bundle}
PY=${PYTHON:-python3}
PIP=("$PY" -m pip --disable-pip-version-check)
FMNIST=${HVDSCALE_FASHION_MNIST:-/usr/share/datasets/fashion-mnist}
# pure-Python packages hvdscale imports that the GPU image does not have
WHEELS=(tensorboardX)
mkdir -p "$BUNDLE/wheels" "$BUNDLE/fashion-mnist"

[ -f "$BUNDLE/horovod-0.28.1.tar.gz" ] \
    || "${PIP[@]}" download -q --no-deps --no-binary :all: horovod==0.28.1 -d "$BUNDLE"
"${PIP[@]}" download -q --no-deps --only-binary :all: --python-version 3.12 \
    --implementation py --abi none --platform any -d "$BUNDLE/wheels" "${WHEELS[@]}"
if ! ls "$FMNIST"/*-ubyte* >/dev/null 2>&1; then
    echo "gpu_prepare.sh: no Fashion-MNIST in $FMNIST (apt-get install dataset-fashion-mnist, or set HVDSCALE_FASHION_MNIST)" >&2
    exit 1
fi
cp "$FMNIST"/*-ubyte* "$BUNDLE/fashion-mnist/"
size=$(du -sm "$BUNDLE" | cut -f1)
echo "gpu_prepare.sh: $BUNDLE ready (${size} MB):"
(cd "$BUNDLE" && find . -type f | sort)
if [ "$size" -gt 60 ]; then
    echo "gpu_prepare.sh: warning: over 60 MB; the device tool carries at most 64 MiB" >&2
fi
