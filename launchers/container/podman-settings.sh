# shellcheck shell=bash
# Podman settings for a locked-down host, sourced by the other scripts here (docs/cluster.md,
# "Building and running the image with podman"). Each one answers a measured obstacle:
#   --runtime runc   the host's cgroups are hybrid (v1 controllers + a v2 mount), which crun
#                    refuses: "crun: cgroups in hybrid mode not supported"
#   --ulimit ...     root lacks CAP_SYS_RESOURCE, so limits above what podman itself runs
#                    with cannot be set: podman's default nofile=1048576 for `run` fails with
#                    "error setting rlimit type 7: operation not permitted" (hard nofile here:
#                    20000), and podman lowers its own nproc to 32768, so nproc above that
#                    fails as type 6. Default: nofile=1024:<this shell's hard limit>,
#                    nproc=4096:4096 (on this machine: nofile=1024:20000).
#   --network=host   build and run steps use the host's network directly: no CNI plugins,
#                    bridge or iptables needed to reach the package registries
# Each can be overridden from the environment for other hosts.
HVDSCALE_PODMAN_RUNTIME="${HVDSCALE_PODMAN_RUNTIME:-runc}"
_hard_nofile=$(ulimit -Hn)
[ "$_hard_nofile" = unlimited ] && _hard_nofile=1048576
HVDSCALE_PODMAN_ULIMITS="${HVDSCALE_PODMAN_ULIMITS:-nofile=1024:$_hard_nofile nproc=4096:4096}"
HVDSCALE_PODMAN_NETWORK="${HVDSCALE_PODMAN_NETWORK:-host}"

PODMAN=(podman --runtime "$HVDSCALE_PODMAN_RUNTIME")
PODMAN_OPTS=(--network="$HVDSCALE_PODMAN_NETWORK")
for limit in $HVDSCALE_PODMAN_ULIMITS; do
    PODMAN_OPTS+=(--ulimit "$limit")
done
export PODMAN PODMAN_OPTS
