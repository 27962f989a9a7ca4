"""Host lists: `--hosts h1:2,h2:2`, hostfiles (the formats launchers/hosts/discover_hosts.sh
also reads for elastic jobs), and the discovery script horovodrun re-runs while an elastic
job runs."""
import re
from pathlib import Path
from typing import Optional, Tuple

from hvdscale.errors import ConfigError

Hosts = Tuple[Tuple[str, Optional[int]], ...]

DISCOVERY_SCRIPT = Path(__file__).resolve().parents[2] / "launchers" / "hosts" / "discover_hosts.sh"

_HOST_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def parse_hosts(text: str) -> Hosts:
    """`h1:2,h2:2` or `h1,h2` -> ((name, slots or None), ...)."""
    hosts = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            raise ConfigError(f"--hosts {text!r}: empty host name")
        name, sep, slots = item.partition(":")
        hosts.append((_check_host(name, f"--hosts {text!r}"),
                      _check_slots(slots, f"--hosts {text!r}") if sep else None))
    return _no_duplicates(tuple(hosts), f"--hosts {text!r}")


def parse_hostfile_text(text: str, source: str = "hostfile") -> Hosts:
    """Lines `host`, `host:N` or OpenMPI's `host slots=N [max_slots=M]`; `#` starts a comment.

    The same formats as launchers/hosts/discover_hosts.sh, which reads the file for elastic jobs.
    """
    hosts = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{source}:{number}"
        words = line.split()
        name, sep, slots = words[0].partition(":")
        name = _check_host(name, where)
        count = _check_slots(slots, where) if sep else None
        for word in words[1:]:
            key, eq, value = word.partition("=")
            if key == "slots" and eq and count is None:
                count = _check_slots(value, where)
            elif key == "max_slots" and eq:
                _check_slots(value, where)
            else:
                raise ConfigError(f"{where}: cannot read {raw.strip()!r} "
                                  "(expected 'host', 'host:N' or 'host slots=N')")
        hosts.append((name, count))
    if not hosts:
        raise ConfigError(f"{source}: no hosts listed")
    return _no_duplicates(tuple(hosts), source)


def read_hostfile(path: str) -> Hosts:
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ConfigError(f"--hostfile {path}: cannot read it ({err.strerror or err})") from None
    return parse_hostfile_text(text, source=str(path))


def format_hosts(hosts) -> str:
    return ",".join(f"{name}:{slots}" for name, slots in hosts)


def _check_host(name, where):
    if not _HOST_RE.match(name):
        raise ConfigError(f"{where}: {name!r} is not a host name")
    return name


def _check_slots(text, where):
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"{where}: slots must be a positive integer, got {text!r}")
    return int(text)


def _no_duplicates(hosts, where):
    seen = set()
    for name, _ in hosts:
        if name in seen:
            raise ConfigError(f"{where}: host {name} is listed twice; give it one slot count")
        seen.add(name)
    return hosts
