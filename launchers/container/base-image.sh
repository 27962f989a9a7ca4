#!/usr/bin/env bash
# A local Debian 12 + Python 3.11 base image that stands in for python:3.11-slim-bookworm on
# hosts without access to an image registry (the Dockerfile takes it as CPU_IMAGE).
#
#   launchers/container/base-image.sh [TAG]      default TAG: localhost/hvdscale-base:bookworm
#
# debootstrap builds a minbase root filesystem from the host's Debian mirror with Python, its
# headers and venv; the host's extra CA certificates (/usr/local/share/ca-certificates, e.g. a
# TLS-intercepting egress proxy's) are added so pip inside the build trusts the same servers
# as the host; `podman import` turns the tree into an image. Nothing is done if TAG exists.
set -Eeuo pipefail
TAG="${1:-localhost/hvdscale-base:bookworm}"
MIRROR="${HVDSCALE_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SUITE=bookworm

if podman image exists "$TAG"; then
    echo "base-image.sh: $TAG exists; nothing to do"
    exit 0
fi
for tool in debootstrap podman; do
    command -v "$tool" >/dev/null || { echo "base-image.sh: '$tool' not found (apt-get install debootstrap podman)" >&2; exit 2; }
done

WORK=$(mktemp -d /var/tmp/hvdscale-rootfs.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
ROOTFS="$WORK/rootfs"
echo "==> debootstrap --variant=minbase $SUITE ($MIRROR)"
debootstrap --variant=minbase --include=python3,python3-venv,python3-dev,ca-certificates \
    "$SUITE" "$ROOTFS" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -n 20 "$WORK/debootstrap.log" >&2; echo "base-image.sh: debootstrap failed" >&2; exit 1; }

# The same suites as the Debian images: updates and security fixes.
cat >"$ROOTFS/etc/apt/sources.list" <<SOURCES
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb http://deb.debian.org/debian-security $SUITE-security main
SOURCES
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$ROOTFS/usr/local/share/ca-certificates/"
    chroot "$ROOTFS" update-ca-certificates >/dev/null
fi
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/log/*.log

echo "==> podman import -> $TAG"
tar -C "$ROOTFS" --numeric-owner -c . \
    | podman import --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$TAG" >/dev/null
echo "base-image.sh: $TAG ($(chroot "$ROOTFS" python3 --version))"
