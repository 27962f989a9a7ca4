"""Import TensorFlow without its start-up chatter.

TensorFlow's C++ libraries log at load time, before absl logging is initialised, so
TF_CPP_MIN_LOG_LEVEL does not reach them: every process printed the absl notice, oneDNN's
note, "Could not find cuda drivers on your machine" and the CPU-instruction hint -- twice,
as two libraries carry the logger -- and under horovodrun every rank did. Here the process's
stderr (file descriptor 2, where the C++ code writes) goes through a filter while TensorFlow
loads: absl INFO lines (`I0000 ...`), the absl notice and the hint's second line are dropped;
warnings, errors and everything else pass through at once, so a crash during the import
still shows its cause. Listing the GPUs on a machine without an NVIDIA driver logs CUDA's
failed probe as an error; `list_gpus` leaves that one line out there, and only there.
"""
import contextlib
import os
import re
import sys
import threading

_CHATTER = (
    re.compile(rb"^I\d{4} [\d:.]+\s+\d+ \S+:\d+\] "),       # absl INFO
    re.compile(rb"^WARNING: All log messages before absl::InitializeLog\(\) is called"),
    re.compile(rb"^To enable the following instructions: .* rebuild TensorFlow"),
)


def is_chatter(line: bytes) -> bool:
    return any(pattern.match(line) for pattern in _CHATTER)


def _forward(read_fd: int, write_fd: int, drop) -> None:
    """Copy lines from the pipe to the real stderr, leaving out those `drop` matches."""
    pending = b""
    with os.fdopen(read_fd, "rb", buffering=0) as pipe:
        while True:
            chunk = pipe.read(65536)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            out = b"".join(line + b"\n" for line in lines if not drop(line))
            if out:
                os.write(write_fd, out)
    if pending and not drop(pending):
        os.write(write_fd, pending)


@contextlib.contextmanager
def stderr_filtered(drop):
    """Route file descriptor 2 (where C++ libraries write) through `drop(line) -> bool`
    while the block runs; kept lines go out at once."""
    if sys.stderr is not None:
        sys.stderr.flush()
    try:
        real = os.dup(2)
    except OSError:               # no stderr at all (a daemon): nothing to filter
        yield
        return
    read_fd, write_fd = os.pipe()
    reader = threading.Thread(target=_forward, args=(read_fd, real, drop), daemon=True)
    reader.start()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    try:
        yield
    finally:
        if sys.stderr is not None:
            sys.stderr.flush()
        os.dup2(real, 2)          # closes the pipe's last write end: the reader drains, ends
        reader.join(timeout=10)
        os.close(real)


def import_tensorflow():
    """`import tensorflow`, through the filter the first time; returns the module."""
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    # C++ INFO lines logged after absl is initialised (the documented switch); warnings stay
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    with stderr_filtered(is_chatter):
        import tensorflow
    return tensorflow


# TensorFlow probes CUDA when asked for GPUs, and logs the failure as an error even on a
# machine with no NVIDIA driver at all, where no GPU is the expected answer.
_NO_DRIVER_PROBE = re.compile(rb"^E\d{4} [\d:.]+\s+\d+ cuda_\w+\.cc:\d+\] failed call to cuInit")


def nvidia_driver_loaded() -> bool:
    return os.path.exists("/proc/driver/nvidia/version")


def list_gpus():
    """tf.config.list_physical_devices("GPU"); the CUDA probe's failure is left out only where
    no NVIDIA driver is loaded (with a driver it is the error a user needs to see)."""
    tf = import_tensorflow()
    if nvidia_driver_loaded():
        return tf.config.list_physical_devices("GPU")
    with stderr_filtered(lambda line: bool(_NO_DRIVER_PROBE.match(line))):
        return tf.config.list_physical_devices("GPU")
