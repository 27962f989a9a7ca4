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


# /proc/cpuinfo flags of CPUs that compute in bf16 natively (AVX-512 BF16; AMX tiles on
# Sapphire Rapids and later). Without them PyTorch and TensorFlow emulate bf16 on the CPU:
# the demo recipe ran 10x slower in bf16 than in fp32 on a 2-core EPYC without AVX-512
# (torch, horovodrun -np 2: 1.0 s against 0.10 s per step).
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: "str | None" = None) -> frozenset:
    """The first CPU's feature flags from /proc/cpuinfo (empty where it cannot be read)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):      # x86 / ARM
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def native_bf16(flags: "frozenset | None" = None) -> bool:
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in NATIVE_BF16_FLAGS)


def slow_settings(*, precision: str, device: str, workers_here: int, threads: int,
                  cores: int, flags: "frozenset | None" = None) -> list:
    """One sentence per chosen setting that is known to be slow on this machine (the run's
    header prints each as a warning); empty when nothing is."""
    warnings = []
    if device == "cpu" and precision == "bf16":
        flags = cpu_flags() if flags is None else flags
        if flags and not native_bf16(flags):
            warnings.append("train.precision=bf16 is emulated on this CPU (no AVX512_BF16 "
                            "or AMX): expect it several times slower than fp32 (10x measured "
                            "on an EPYC without AVX-512)")
    if device == "cpu" and workers_here * threads > cores:
        warnings.append(f"{workers_here} workers x {threads} thread{'s' * (threads > 1)} on "
                        f"{cores} cores: oversubscribed CPUs slow every step (fewer workers "
                        f"per node, or train.threads)")
    return warnings
