#!/usr/bin/env bash
# What CI runs (via .ci/run, or `make ci-image`) so that an install change that breaks the
# image fails CI: installs podman, runc and debootstrap where missing (as root), then builds
# the CPU image and runs its tests (tests/test_container.py, marker image).
#
# Caching: build-cpu.sh hands the host's Horovod wheel cache to the build (read-only), so
# after the host install (make test installs first) Horovod is not compiled again inside;
# podman keeps the image layers in its storage (/var/lib/containers), so a later run on the
# same machine rebuilds only what changed. The tests must all run and pass: a skipped test
# (no podman), an empty collection (pytest exit 5) or a time-out fails this script.
#
#   launchers/container/ci-image.sh          HVDSCALE_IMAGE_CI_LIMIT: seconds (default 2700)
#                                            HVDSCALE_IMAGE_TESTS: the test file (default the image's)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
missing=()
for tool in podman runc debootstrap; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "ci-image.sh: installing ${missing[*]}"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends podman runc debootstrap
fi
cd "$ROOT"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
REPORT=$(mktemp /tmp/hvdscale-ci-image.XXXXXX.xml)
trap 'rm -f "$REPORT"' EXIT
start=$SECONDS
rc=0
timeout "${HVDSCALE_IMAGE_CI_LIMIT:-2700}" .venv/bin/python -m pytest -q -ra -m image \
    --junitxml="$REPORT" "${HVDSCALE_IMAGE_TESTS:-tests/test_container.py}" || rc=$?
took=$((SECONDS - start))
if [ "$rc" = 0 ]; then
    # pytest exits 0 when every test skipped: CI wants them run.
    counts=$(.venv/bin/python - "$REPORT" <<'PY'
import sys
import xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suite = root if root.tag == "testsuite" else root.find("testsuite")
print(*(int(suite.get(k, 0)) for k in ("tests", "skipped", "failures", "errors")))
PY
)
    read -r tests skipped failures errors <<<"$counts"
    if [ "$tests" = 0 ] || [ "$skipped" != 0 ] || [ "$failures" != 0 ] || [ "$errors" != 0 ]; then
        echo "ci-image.sh: the image tests did not all run and pass ($tests tests, $skipped skipped, $failures failed, $errors errors)" >&2
        rc=1
    fi
fi
case "$rc" in
    0) ;;
    5) echo "ci-image.sh: pytest collected no image tests" >&2 ;;
    124) echo "ci-image.sh: the image build and tests ran past ${HVDSCALE_IMAGE_CI_LIMIT:-2700} s" >&2 ;;
esac
echo "ci-image.sh: image build and tests took $took s (exit $rc)"
exit "$rc"
