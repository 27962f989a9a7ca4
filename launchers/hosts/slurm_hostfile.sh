#!/usr/bin/env bash
# Write a hosts file for the nodes of the current SLURM allocation, one "host slots=N" line
# each, for `hvdscale launch --hostfile` or as the starting file of an elastic job.
#
#   launchers/hosts/slurm_hostfile.sh [SLOTS] > hosts.txt
#
# SLOTS defaults to the GPUs SLURM gave each node (SLURM_GPUS_ON_NODE), else to
# SLURM_NTASKS_PER_NODE, else 1. Needs scontrol (it expands node lists like node[01-04]).
set -euo pipefail

fail() { echo "slurm_hostfile.sh: $*" >&2; exit 1; }
nodelist=${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}
[ -n "$nodelist" ] || fail "SLURM_JOB_NODELIST is not set: run this inside a SLURM allocation"
slots=${1:-${SLURM_GPUS_ON_NODE:-${SLURM_NTASKS_PER_NODE:-1}}}
case $slots in '' | *[!0-9]* | 0) fail "slots must be a positive integer, got '$slots'" ;; esac
command -v scontrol >/dev/null || fail "scontrol not found on PATH"

scontrol show hostnames "$nodelist" | while IFS= read -r host; do
    [ -n "$host" ] && echo "$host slots=$slots"
done
