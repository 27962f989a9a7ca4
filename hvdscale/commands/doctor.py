"""`hvdscale doctor`: what a user runs first on a new node.

Prints versions (Python, torch, TF, Horovod, DALI, MPI), Horovod's build flags (frameworks,
controllers, tensor operations), the GPUs seen, and one verdict line. Each probe runs in its
own guard so a broken framework is reported instead of crashing the report.
"""
import importlib
import platform
import shutil
import subprocess
import sys

from hvdscale.registry import BACKENDS


def add_arguments(parser):
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.add_argument("--require", default="torch,tensorflow,gloo,mpi",
                        help="comma list the verdict insists on (torch,tensorflow,gloo,mpi,nccl,dali)")


def _version(module):
    try:
        mod = importlib.import_module(module)
    except Exception as err:  # noqa: BLE001 -- any import failure is a finding to report
        return None, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return getattr(mod, "__version__", "unknown"), None


def _mpi_version():
    exe = shutil.which("mpirun")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None


def _horovod_build():
    """Horovod's compiled-in capabilities, asked of the library itself (not of pip)."""
    flags = {b.name: _ext_loads(b.horovod) for b in BACKENDS if b.horovod}
    basics = _basics()
    if basics is not None:
        flags.update({
            "gloo": basics.gloo_built(),
            "mpi": basics.mpi_built(),
            "nccl": basics.nccl_built() > 0,
            "ddl": basics.ddl_built(),
            "ccl": basics.ccl_built(),
            "cuda": basics.cuda_built(),
            "rocm": basics.rocm_built(),
        })
    return flags


def _ext_loads(module):
    try:
        importlib.import_module(module)
        return True
    except Exception:  # noqa: BLE001
        return False


def _basics():
    for module in ("horovod.torch", "horovod.tensorflow"):
        try:
            return importlib.import_module(module)
        except Exception:  # noqa: BLE001
            continue
    return None


def _gpus():
    seen = []
    try:
        import torch
        if torch.cuda.is_available():
            seen += [f"torch: {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001
        pass
    smi = shutil.which("nvidia-smi")
    if smi and not seen:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
            seen += [line for line in out.stdout.splitlines() if line.strip()]
        except (OSError, subprocess.TimeoutExpired):
            pass
    return seen


def _horovod_settings():
    """The Horovod environment a job started from this shell would run with: the user's
    HOROVOD_* values and what hvdscale sets before hvd.init() (hvdscale/comm.py)."""
    import os
    from hvdscale.comm import SINGLE_WORKER_CYCLE_TIME_MS, gradient_groups, \
        horovod_env_defaults
    one = horovod_env_defaults({k: v for k, v in os.environ.items()
                                if k not in ("HOROVOD_SIZE", "OMPI_COMM_WORLD_SIZE")})
    many = horovod_env_defaults(dict(os.environ, HOROVOD_SIZE="2"))
    cycle = os.environ.get("HOROVOD_CYCLE_TIME")
    idle = os.environ.get("HOROVOD_IDLE_CYCLE_TIME")
    waits = _horovod_waits_without_polling()
    return {
        "HOROVOD_CYCLE_TIME": f"{cycle} ms (environment)" if cycle else
        f"{one.get('HOROVOD_CYCLE_TIME', SINGLE_WORKER_CYCLE_TIME_MS)} ms with one worker "
        f"(hvdscale), {many.get('HOROVOD_CYCLE_TIME', '1')} ms with more (Horovod)",
        "idle_wait": None if waits is None else
        ("no: this Horovod polls every cycle and spins in synchronize() (an upstream build; "
         "launchers/install.sh builds one that waits)" if not waits else
         f"yes: sleeps while idle (HOROVOD_IDLE_CYCLE_TIME {idle or '50'} ms"
         f"{' (environment)' if idle else ''}), blocks in synchronize()"),
        # how gradients reach Horovod unless horovod.groups says otherwise (hvdscale/comm.py)
        "gradient_groups": f"CPUs {_groups(gradient_groups(None, gpu=False))}, GPUs "
        f"{_groups(gradient_groups(None, gpu=True))} (unless horovod.groups is set)",
        "user_set": {k: v for k, v in sorted(os.environ.items()) if k.startswith("HOROVOD_")},
    }


def _groups(n):
    return "per tensor" if n == 0 else "one allreduce after backward" if n == 1 \
        else f"{n} grouped allreduces"


def _horovod_waits_without_polling():
    """True if the installed Horovod carries launchers/horovod-wait.patch (its extension
    knows HOROVOD_IDLE_CYCLE_TIME), False for an upstream build, None without Horovod."""
    import importlib.util
    from pathlib import Path
    spec = importlib.util.find_spec("horovod")
    if spec is None or not spec.submodule_search_locations:
        return None
    libs = [p for d in spec.submodule_search_locations for p in Path(d).glob("*/mpi_lib*.so")]
    if not libs:
        return None
    return any(b"HOROVOD_IDLE_CYCLE_TIME" in p.read_bytes() for p in libs)


def _cpu():
    """The CPU and whether it computes bf16 natively (else train.precision=bf16 is emulated
    and slow; hvdscale/hardware.py)."""
    from hvdscale.hardware import NATIVE_BF16_FLAGS, cpu_count, cpu_flags, cpu_model
    flags = cpu_flags()
    return {"model": cpu_model(), "cores": cpu_count(),
            "native_bf16": [f for f in NATIVE_BF16_FLAGS if f in flags] if flags else None}


def _quiet_tensorflow():
    """Import TensorFlow without its C++ start-up lines; a failure is _version's to report."""
    try:
        from hvdscale.tensorflow.quiet import import_tensorflow
        import_tensorflow()
    except Exception:  # noqa: BLE001
        pass


def collect():
    report = {"python": platform.python_version(), "platform": platform.platform()}
    _quiet_tensorflow()
    report["cpu"] = _cpu()
    problems = {}
    for key, module in (*((b.name, b.module) for b in BACKENDS if b.module),
                        ("horovod", "horovod"), ("dali", "nvidia.dali"), ("mpi4py", "mpi4py"),
                        ("numpy", "numpy")):
        version, problem = _version(module)
        report[key] = version
        if problem:
            problems[key] = problem
    report["mpi"] = _mpi_version()
    report["horovod_build"] = _horovod_build()
    from hvdscale.launch import horovodrun_controller
    report["launch_controller"] = horovodrun_controller(
        bool(report["horovod_build"].get("mpi")), bool(report["horovod_build"].get("gloo")))
    report["gpus"] = _gpus()
    report["horovod_settings"] = _horovod_settings()
    report["problems"] = problems
    return report


def verdict(report, required):
    build = report["horovod_build"]
    missing = []
    for need in required:
        if need == "dali":
            ok = report.get("dali") is not None
        elif need in BACKENDS:
            ok = report.get(need) is not None and build.get(need, False)
        else:
            ok = build.get(need, False)
        if not ok:
            missing.append(need)
    if report.get("horovod") is None:
        return False, "Horovod does not import: run launchers/install.sh"
    if missing:
        return False, "missing: " + ", ".join(missing)
    return True, "ready for " + ", ".join(required)


def run(args):
    import json

    report = collect()
    required = [r.strip().lower() for r in args.require.split(",") if r.strip()]
    ok, why = verdict(report, required)
    report["verdict"] = ("OK: " if ok else "NOT READY: ") + why
    if args.json:
        print(json.dumps(report))
        return 0 if ok else 1
    width = 12
    for key in ("python", *(b.name for b in BACKENDS if b.module), "horovod", "dali", "mpi4py",
                "numpy", "mpi"):
        value = report.get(key)
        shown = value if value is not None else f"not available ({report['problems'].get(key, 'not found')})"
        print(f"{key:<{width}} {shown}")
    build = report["horovod_build"]
    if build:
        def marks(keys):
            return "  ".join(f"[{'X' if build.get(k) else ' '}] {k}" for k in keys)
        print(f"{'frameworks':<{width}} {marks(['torch', 'tensorflow'])}")
        print(f"{'controllers':<{width}} {marks(['gloo', 'mpi'])}")
        default = report["launch_controller"]
        if default:
            other = "gloo" if default == "mpi" else "mpi"
            print(f"{'launch':<{width}} horovodrun runs {default} by default"
                  + (f" (--controller {other} for {other})" if build.get(other) else ""))
        print(f"{'tensor ops':<{width}} {marks(['nccl', 'mpi', 'gloo', 'ddl', 'ccl'])}")
    cpu = report["cpu"]
    bf16 = cpu["native_bf16"]
    print(f"{'cpu':<{width}} {cpu['model'] or 'unknown'} ({cpu['cores']} cores)")
    print(f"{'cpu bf16':<{width}} " + (
        "unknown (no CPU flags in /proc/cpuinfo)" if bf16 is None else
        f"native ({', '.join(bf16)})" if bf16 else
        "emulated (no AVX512_BF16 or AMX): train.precision=bf16 is much slower than fp32 "
        "on this CPU"))
    print(f"{'gpus':<{width}} {', '.join(report['gpus']) if report['gpus'] else 'none seen'}")
    settings = report["horovod_settings"]
    print(f"{'hvd cycle':<{width}} {settings['HOROVOD_CYCLE_TIME']}")
    if settings["idle_wait"] is not None:
        print(f"{'hvd waits':<{width}} {settings['idle_wait']}")
    print(f"{'hvd grads':<{width}} {settings['gradient_groups']}")
    if settings["user_set"]:
        print(f"{'hvd env':<{width}} "
              + " ".join(f"{k}={v}" for k, v in settings["user_set"].items()))
    print(f"{'executable':<{width}} {sys.executable}")
    print(report["verdict"])
    return 0 if ok else 1
