"""What machine this is, in words, for summary tables and reports."""
import os
from pathlib import Path


def cpu_model():
    """The CPU's marketing name from /proc/cpuinfo, or None where it cannot be read."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_count():
    """Cores this process may run on (a cgroup/affinity limit counts, unlike os.cpu_count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
