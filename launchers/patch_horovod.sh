#!/usr/bin/env bash
# Source edits that let Horovod 0.28.1 (its last release) build against torch >= 2.1 and
# TF >= 2.16 with Keras 3 (CPU and GPU builds, gcc 12 and 13), start faster, and wait without
# spinning. The wheel cache keys (install.sh, gpu_check.sh) include `--hash`, so any change
# here or in the diff rebuilds.
#   usage: patch_horovod.sh SRC_DIR      (an unpacked horovod-0.28.1 sdist)
#          patch_horovod.sh --hash  (the fingerprint of all edits: the wheel cache key's part)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [ "${1:-}" = "--hash" ]; then
    cat "$here/patch_horovod.sh" "$here/horovod-wait.patch" | sha256sum | cut -c1-64
    exit 0
fi
src=${1:?usage: patch_horovod.sh HOROVOD_SRC_DIR | --hash}
cd "$src"

fail() { echo "patch_horovod: $*" >&2; exit 1; }

# Replace a literal line; fail if the expected text is not there (a different Horovod
# release must not be patched silently).
replace_line() {  # file old new
    grep -qxF -- "$2" "$1" || fail "expected line not found in $1: $2"
    OLD="$2" NEW="$3" python3 - "$1" <<'PY'
import os, sys
path = sys.argv[1]
old, new = os.environ["OLD"], os.environ["NEW"]
lines = open(path).read().split("\n")
open(path, "w").write("\n".join(new if l == old else l for l in lines))
PY
}

# 1. torch >= 2.1 headers need C++17; the core must use the same standard or Gloo's
#    symbols do not match at link time.
replace_line CMakeLists.txt 'set(CMAKE_CXX_STANDARD 14)' 'set(CMAKE_CXX_STANDARD 17)'
#    torch >= 2.14's headers need C++20 (std::strong_ordering): build_horovod.sh says which.
# shellcheck disable=SC2016  # CMake's $ENV{...} is literal text here
replace_line horovod/torch/CMakeLists.txt '    set(CMAKE_CXX_STANDARD 14)' \
    '    if(DEFINED ENV{HVDSCALE_TORCH_CXX_STANDARD})
        set(CMAKE_CXX_STANDARD $ENV{HVDSCALE_TORCH_CXX_STANDARD})
    else()
        set(CMAKE_CXX_STANDARD 17)
    endif()'

# 2. TF >= 2.16 moved the XLA headers; xla_mpi_ops.cc only serves GPU XLA, so drop it.
# shellcheck disable=SC2016  # the CMake variable is literal text here
replace_line horovod/tensorflow/CMakeLists.txt \
    'list(APPEND TF_SOURCES "${PROJECT_SOURCE_DIR}/horovod/tensorflow/xla_mpi_ops.cc")' \
    '# xla_mpi_ops.cc dropped by hvdscale (TF >= 2.16 moved the XLA headers)'

# 3. Keras 3 is a separate package; Horovod's keras layer wants the tf.keras backend.
for f in horovod/tensorflow/keras/__init__.py horovod/tensorflow/keras/callbacks.py; do
    replace_line "$f" '    from keras import backend as K' '    from tensorflow.keras import backend as K'
done
# 4. horovodrun asks "built with Gloo/MPI?" by importing a framework extension in a forked
#    child, TensorFlow first: every launch paid a full TensorFlow import (5 s idle, 15-25 s on
#    a loaded 2-core node) even for torch jobs. Any extension answers for the shared core
#    library, so ask torch first (about 2 s).
replace_line horovod/common/util.py "EXTENSIONS = ['tensorflow', 'torch', 'mxnet']" \
    "EXTENSIONS = ['torch', 'tensorflow', 'mxnet']  # hvdscale: the cheaper import first"
# 5. Waiting without spinning (launchers/horovod-wait.patch), for ranks that share a small
#    node with their compute threads: the background thread sleeps while this rank has nothing
#    queued or in flight (woken by the next enqueue; HOROVOD_IDLE_CYCLE_TIME caps the sleep,
#    50 ms, 0 = upstream's poll every cycle), and torch's synchronize() blocks on a condition
#    variable instead of a sched_yield loop. Measured in benchmarks/RESULTS.md ("Issue 12").
# 6. gcc 13's libstdc++ no longer pulls these in transitively (upstream #3957, after 0.28.1).
replace_line horovod/common/common.h '#include <memory>' $'#include <memory>\n#include <stdexcept>'
replace_line horovod/common/group_table.h '#include <queue>' $'#include <queue>\n#include <string>'
# 7. GPU builds with TensorFlow: XLA removed stream_executor::gpu::AsGpuStreamValue (the
#    forward declaration compiles, the import then fails on the missing symbol); TF >= 2.16
#    hands out the CUDA stream as Stream::platform_specific_handle().
replace_line horovod/tensorflow/mpi_ops.cc 'GpuStreamHandle AsGpuStreamValue(Stream* stream);' \
    $'#if TENSORFLOW_VERSION < 2016000000\nGpuStreamHandle AsGpuStreamValue(Stream* stream);\n#endif'
replace_line horovod/tensorflow/mpi_ops.cc '#include "tensorflow/compiler/xla/stream_executor/stream.h"' \
    $'#if TENSORFLOW_VERSION < 2016000000\n#include "tensorflow/compiler/xla/stream_executor/stream.h"\n#endif'
replace_line horovod/tensorflow/mpi_ops.cc '#endif // TENSORFLOW_VERSION >= 2011000000' \
    "$(cat <<'CC'
#endif // TENSORFLOW_VERSION >= 2011000000
#if TENSORFLOW_VERSION >= 2016000000
#include "xla/stream_executor/stream.h"
namespace stream_executor {
namespace gpu {
inline GpuStreamHandle AsGpuStreamValue(Stream* stream) {  // hvdscale
  return static_cast<GpuStreamHandle>(stream->platform_specific_handle().stream);
}
} // namespace gpu
} // namespace stream_executor
#endif
CC
)"
diff="$here/horovod-wait.patch"
patch -p1 --batch --forward --dry-run < "$diff" >/dev/null \
    || fail "launchers/horovod-wait.patch does not apply to $src"
patch -p1 --batch --forward --quiet < "$diff"
echo "patch_horovod: 7 edits applied to $src"
