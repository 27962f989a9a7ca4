"""Import TensorFlow without its start-up chatter.

TensorFlow's C++ libraries log at load time, before absl logging is initialised, so
TF_CPP_MIN_LOG_LEVEL does not reach them: every process printed the absl notice, oneDNN's
note, "Could not find cuda drivers on your machine" and the CPU-instruction hint -- twice,
as two libraries carry the logger -- and under horovodrun every rank did. Here the process's
stderr (file descriptor 2, where the C++ code writes) goes through a filter while TensorFlow
loads: absl INFO lines (`I0000 ...`), the absl notice and the hint's second line are dropped;
warnings, errors and everything else pass through at once, so a crash during the import
still shows its cause.
"""
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


def _forward(read_fd: int, write_fd: int) -> None:
    """Copy lines from the pipe to the real stderr, leaving out the chatter."""
    pending = b""
    with os.fdopen(read_fd, "rb", buffering=0) as pipe:
        while True:
            chunk = pipe.read(65536)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            out = b"".join(line + b"\n" for line in lines if not is_chatter(line))
            if out:
                os.write(write_fd, out)
    if pending and not is_chatter(pending):
        os.write(write_fd, pending)


def import_tensorflow():
    """`import tensorflow`, through the filter the first time; returns the module."""
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    # C++ INFO lines logged after absl is initialised (the documented switch); warnings stay
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    sys.stderr.flush()
    real = os.dup(2)
    read_fd, write_fd = os.pipe()
    reader = threading.Thread(target=_forward, args=(read_fd, real), daemon=True)
    reader.start()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    try:
        import tensorflow
    finally:
        sys.stderr.flush()
        os.dup2(real, 2)          # closes the pipe's last write end: the reader drains, ends
        reader.join(timeout=10)
        os.close(real)
    return tensorflow
