#!/usr/bin/env bash
# Host discovery for Horovod elastic jobs (horovodrun --host-discovery-script).
#
#   HVDSCALE_HOSTS_FILE=hosts.txt launchers/hosts/discover_hosts.sh     (or: ... discover_hosts.sh FILE)
#
# Prints one "host:slots" line per host in the hosts file. Horovod calls it every few seconds
# and the file is read afresh each time, so editing it adds or removes hosts while the job
# runs. Replace the file in one step (write a copy, then mv it over) so that a call never reads
# half an edit. Lines: "host", "host:N" or OpenMPI's "host slots=N"; "#" starts a comment;
# a host without a count gets HVDSCALE_SLOTS (default 1). `hvdscale launch --hostfile` reads
# the same formats.
set -euo pipefail

file=${1:-${HVDSCALE_HOSTS_FILE:-}}
default_slots=${HVDSCALE_SLOTS:-1}
fail() { echo "discover_hosts.sh: $*" >&2; exit 1; }

[ -n "$file" ] || fail "no hosts file: set HVDSCALE_HOSTS_FILE or pass the file"
[ -r "$file" ] || fail "cannot read hosts file $file"
case $default_slots in '' | *[!0-9]* | 0) fail "HVDSCALE_SLOTS must be a positive integer, got '$default_slots'" ;; esac

# Collect first, print at the end: a bad line must not leave Horovod half a host list.
found=""
number=0
while IFS= read -r line || [ -n "$line" ]; do
    number=$((number + 1))
    line=${line%%#*}
    read -r -a words <<<"$line" || true
    [ "${#words[@]}" -gt 0 ] || continue
    host=${words[0]%%:*}
    slots=$default_slots
    [ "$host" = "${words[0]}" ] || slots=${words[0]#*:}
    for word in "${words[@]:1}"; do
        case $word in
            slots=*) slots=${word#slots=} ;;
            max_slots=*) ;;
            *) fail "$file:$number: cannot read '$word' (expected 'host', 'host:N' or 'host slots=N')" ;;
        esac
    done
    case $host in '' | *[!A-Za-z0-9._-]* | [._-]*) fail "$file:$number: '$host' is not a host name" ;; esac
    case $slots in '' | *[!0-9]* | 0) fail "$file:$number: slots must be a positive integer, got '$slots'" ;; esac
    found+="$host:$slots"$'\n'
done <"$file"
printf '%s' "$found"
