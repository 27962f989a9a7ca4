"""Settings known to be slow on the machine at hand: bf16 without native CPU support (and
more threads than cores) get one warning line in the run's header; `hvdscale doctor` says
whether the CPU computes bf16 natively."""
import re
from pathlib import Path

import pytest

import hvdscale.hardware as hardware
from hvdscale.cli import main
from hvdscale.commands.doctor import _cpu

EPYC_NO_AVX512 = """processor	: 0
vendor_id	: AuthenticAMD
model name	: AMD EPYC 7B12
flags		: fpu vme de pse tsc msr sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2
"""
SAPPHIRE_RAPIDS = """processor	: 0
model name	: Intel(R) Xeon(R) Platinum 8480+
flags		: fpu sse2 avx avx2 avx512f avx512bw avx512_bf16 amx_bf16 amx_tile amx_int8
"""
GRAVITON = """processor	: 0
Features	: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp bf16 i8mm
"""


def test_cpu_flags_and_native_bf16_from_cpuinfo():
    assert "avx2" in hardware.cpu_flags(EPYC_NO_AVX512)
    assert not hardware.native_bf16(hardware.cpu_flags(EPYC_NO_AVX512))
    assert hardware.native_bf16(hardware.cpu_flags(SAPPHIRE_RAPIDS))
    assert "asimd" in hardware.cpu_flags(GRAVITON)
    assert hardware.cpu_flags("model name : no flags line") == frozenset()


def test_slow_settings_warn_for_emulated_bf16_and_oversubscription():
    def warnings(precision="bf16", cpuinfo=EPYC_NO_AVX512, device="cpu", workers=2, threads=1,
                 cores=2):
        return hardware.slow_settings(precision=precision, device=device, workers_here=workers,
                                      threads=threads, cores=cores,
                                      flags=hardware.cpu_flags(cpuinfo))
    [bf16] = warnings()
    assert bf16.startswith("train.precision=bf16 is emulated on this CPU")
    assert warnings(cpuinfo=SAPPHIRE_RAPIDS) == []
    assert warnings(precision="fp32") == []
    assert warnings(device="NVIDIA H100 80GB HBM3") == []     # a GPU does its own bf16
    assert warnings(cpuinfo="no flags") == []                 # unknown: no guess
    [over] = warnings(precision="fp32", workers=4, threads=1, cores=2)
    assert over.startswith("4 workers x 1 thread on 2 cores")
    assert warnings(precision="fp32", workers=1, threads=2, cores=2) == []


TINY = ["train", "--no-horovod", "--set", "data.train_limit=256", "--set", "data.test_limit=64",
        "--set", "batch.per_worker=32", "--set", "batch.reference=32",
        "--set", "train.max_steps=2", "--set", "lr.warmup_steps=1", "--set", "train.threads=1",
        "--set", "log.progress=false", "--set", "log.tensorboard=false"]


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_the_run_header_warns_once_when_bf16_is_emulated(precision, tmp_path, capsys,
                                                         monkeypatch):
    no_bf16 = hardware.cpu_flags(EPYC_NO_AVX512)
    monkeypatch.setattr(hardware, "cpu_flags", lambda cpuinfo=None: no_bf16)
    assert main([*TINY, "--set", f"train.precision={precision}",
                 "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    warned = [line for line in out.splitlines() if "is emulated on this CPU" in line]
    assert len(warned) == (precision == "bf16"), out
    if warned:
        assert warned[0].startswith("warning: train.precision=bf16")
        # in the header: before the first evaluation's line and the summary table
        assert out.index(warned[0]) < out.index("| hardware")


def test_doctor_reports_native_bf16_as_proc_cpuinfo_says():
    text = Path("/proc/cpuinfo").read_text()
    flags = set(re.search(r"^(?:flags|Features)\s*:(.*)$", text, re.M).group(1).split())
    cpu = _cpu()
    assert cpu["native_bf16"] == [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    assert cpu["cores"] >= 1
