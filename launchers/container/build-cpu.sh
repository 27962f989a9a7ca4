#!/usr/bin/env bash
# Build the CPU image with podman on a host without a Docker engine or image registry
# (`make image-cpu`). The base image is made locally (base-image.sh) and passed as CPU_IMAGE.
#
#   launchers/container/build-cpu.sh [TAG]       default TAG: localhost/hvdscale:cpu
#
# The host's pip configuration (/etc/pip.conf) and every local wheel directory or file://
# index it names are bind-mounted read-only into the build steps, so the image installs from
# the same package sources as the host; the site settings live in podman-settings.sh.
#
# The host's Horovod wheel cache (HVDSCALE_HOST_WHEELS, default HVDSCALE_CACHE or
# ~/.cache/hvdscale, where launchers/install.sh keeps its wheels) is mounted read-only at
# /opt/host-wheels when the host runs the base image's Debian release (same glibc, compiler
# and OpenMPI): install.sh inside the image then takes the wheel whose key matches (same
# Horovod/torch/TF/Python/MPI versions and patches) instead of compiling Horovod again.
# HVDSCALE_HOST_WHEELS= (empty) turns this off.
set -Eeuo pipefail
# All in one function, read whole before it runs: editing this file during a build (which
# takes long) cannot change what the running build does next.
main() {
    HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
    ROOT=$(cd "$HERE/../.." && pwd)
    TAG="${1:-localhost/hvdscale:cpu}"
    BASE="${HVDSCALE_BASE_IMAGE:-localhost/hvdscale-base:bookworm}"
    SUITE=bookworm      # base-image.sh's Debian release
    # shellcheck source=/dev/null
    . "$HERE/podman-settings.sh"

    bash "$HERE/base-image.sh" "$BASE"

    # The host's effective pip configuration (all config files and PIP_* variables, as `pip config
    # list` reports them) becomes the build's /etc/pip.conf; each local path it names (wheel
    # directory, file:// index, constraints file) is mounted read-only at the same place.
    VOLUMES=()
    PIP_CONF="$(mktemp /tmp/hvdscale-pip.XXXXXX.conf)"
    trap 'rm -f "$PIP_CONF"' EXIT
    PIP_PY=python3   # any pip reads the same files and variables; the project's venv has one
    [ -x "$ROOT/.venv/bin/python" ] && PIP_PY="$ROOT/.venv/bin/python"
    if "$PIP_PY" -m pip --version >/dev/null 2>&1; then
        { echo "[global]"
          "$PIP_PY" -m pip config list 2>/dev/null | sed -E "s/^(global|:env:)\.([a-z-]+)='(.*)'$/\2 = \3/;t;d" \
              | awk '!seen[$1]++'
        } >"$PIP_CONF"
        chmod 644 "$PIP_CONF"
        VOLUMES+=(-v "$PIP_CONF:/etc/pip.conf:ro")
        while read -r path; do
            # file:///opt/pypi/simple -> /opt/pypi (its pages link to ../../files)
            [ "${path##*/}" = simple ] && path="${path%/simple}"
            # The CA bundle is the image's own (base-image.sh adds the host's extra CAs to it).
            case "$path" in /etc/ssl/*) continue ;; esac
            [ -e "$path" ] && VOLUMES+=(-v "$path:$path:ro")
        done < <(grep -Eo '(file://)?/[^ ]+' "$PIP_CONF" | sed 's|^file://||; s|/$||' | sort -u)
    fi

    HOST_WHEELS="${HVDSCALE_HOST_WHEELS-${HVDSCALE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hvdscale}}"
    # shellcheck source=/dev/null
    HOST_OS=$( (. "${HVDSCALE_OS_RELEASE:-/etc/os-release}" && echo "${ID:-}-${VERSION_CODENAME:-}") 2>/dev/null || true)
    if [ -z "$HOST_WHEELS" ]; then
        echo "build-cpu.sh: host Horovod wheels: not offered (HVDSCALE_HOST_WHEELS is empty)"
    elif [ "$HOST_OS" != "debian-$SUITE" ]; then
        echo "build-cpu.sh: host Horovod wheels: not offered (host is '$HOST_OS', the image debian-$SUITE)"
    elif ! compgen -G "$HOST_WHEELS/horovod-*/horovod-*.whl" >/dev/null; then
        echo "build-cpu.sh: host Horovod wheels: none in $HOST_WHEELS"
    else
        VOLUMES+=(-v "$HOST_WHEELS:/opt/host-wheels:ro")
        echo "build-cpu.sh: host Horovod wheels offered: $(cd "$HOST_WHEELS" && echo horovod-*/)"
    fi

    # --format docker: the Dockerfile's SHELL (bash -o pipefail) is ignored in the OCI format.
    # --iidfile: podman has been seen to exit 0 when stopped by SIGTERM mid-build; the image id
    # file is written only by a build that finished.
    IIDFILE="$(mktemp /tmp/hvdscale-iid.XXXXXX)"
    trap 'rm -f "$PIP_CONF" "$IIDFILE"' EXIT
    : >"$IIDFILE"
    echo "==> ${PODMAN[*]} build ${PODMAN_OPTS[*]} --format docker --build-arg CPU_ONLY=1 --build-arg CPU_IMAGE=$BASE -t $TAG"
    "${PODMAN[@]}" build "${PODMAN_OPTS[@]}" "${VOLUMES[@]}" --format docker --iidfile "$IIDFILE" \
        --build-arg CPU_ONLY=1 --build-arg CPU_IMAGE="$BASE" --pull=never \
        -t "$TAG" "$ROOT"
    [ -s "$IIDFILE" ] || { echo "build-cpu.sh: the build did not finish (no image id)" >&2; exit 1; }
    echo "build-cpu.sh: built $TAG ($(cut -c1-19 "$IIDFILE"))"
}
main "$@"
exit
