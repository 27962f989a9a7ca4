#!/usr/bin/env bash
# `podman run` with this host's settings (podman-settings.sh): runc, explicit ulimits, the
# host network. Everything else is passed to podman run as is.
#
#   launchers/container/podman-run.sh --rm localhost/hvdscale:cpu doctor
#   launchers/container/podman-run.sh --rm --entrypoint horovodrun localhost/hvdscale:cpu \
#       -np 2 -H localhost:2 hvdscale train pipelines/fashion_mnist_lamb.yaml
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=/dev/null
. "$HERE/podman-settings.sh"
exec "${PODMAN[@]}" run "${PODMAN_OPTS[@]}" "$@"
