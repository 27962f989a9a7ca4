"""Progress that fits where it is written: a bar on a terminal, a plain line every
`log.progress_every_s` seconds or `log.progress_every_percent` of the run in a log file
(horovodrun, mpirun, srun, CI), from rank 0 only; and TensorFlow's start-up chatter kept out
of a run's output."""
import io
import re
import subprocess
import sys

import pytest

from conftest import REPO, job_env, tool
from hvdscale.engine.reporting import ProgressLines
from hvdscale.tensorflow.quiet import is_chatter

PROGRESS = re.compile(r"step (\d+)/(\d+) \((\d+)%\)  epoch ([\d.]+)(?:  loss ([\d.]+))?  lr (\S+)  "
                      r"([\d,]+) img/s  elapsed (\d+:\d\d)  ETA (\d+:\d\d)")


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_lines_come_every_percent_or_every_interval_whichever_first():
    clock = FakeClock()
    lines = ProgressLines(io.StringIO(), total=200, initial=0, every_s=30, every_percent=10,
                          clock=clock)
    due = []
    for step in range(1, 201):
        clock.now += 0.5 if step <= 100 else 4.0     # the second half runs 8x slower
        if lines.due(step):
            due.append(step)
            lines.line(step, step / 50, 0.5, 0.1, 1000.0)
    # first half: 10 % = 20 steps (10 s) comes first; second half: 30 s = 7.5 steps
    assert due[:5] == [20, 40, 60, 80, 100]
    assert due[5:9] == [108, 116, 124, 132]
    assert all(b - a == 8 for a, b in zip(due[5:], due[6:]))


def test_a_line_names_step_epoch_loss_lr_throughput_and_eta():
    clock = FakeClock()
    lines = ProgressLines(io.StringIO(), total=1000, initial=200, every_s=60, every_percent=5,
                          clock=clock)
    clock.now += 50.0                     # 100 steps of this session in 50 s
    text = lines.line(300, 1.28, 0.4321, 0.00123, 2345.6)
    match = PROGRESS.fullmatch(text)
    assert match, text
    assert match.group(1, 2, 3) == ("300", "1000", "30")
    assert match.group(4, 5, 6, 7) == ("1.28", "0.4321", "0.00123", "2,346")
    # 700 steps left at 0.5 s/step (this session's pace) = 350 s
    assert match.group(8, 9) == ("0:50", "5:50")


def test_tensorflow_chatter_is_recognised_and_warnings_are_not():
    chatter = [
        b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
        b"I0000 00:00:1796290527.108304    9967 cudart_stub.cc:31] Could not find cuda "
        b"drivers on your machine, GPU will not be used.",
        b"To enable the following instructions: AVX2 AVX512F FMA, in other operations, "
        b"rebuild TensorFlow with the appropriate compiler flags.",
    ]
    kept = [
        b"W0000 00:00:1796290527.108304    9967 gpu_device.cc:2344] Cannot dlopen some GPU "
        b"libraries.",
        b"E0000 00:00:1796290527.108304    9967 cuda_dnn.cc:8310] Unable to register cuDNN",
        b"UserWarning: something a user should see",
    ]
    assert all(is_chatter(line) for line in chatter)
    assert not any(is_chatter(line) for line in kept)


def test_tensorflow_imports_without_start_up_chatter():
    """In a fresh process without TF_CPP_MIN_LOG_LEVEL: nothing of TensorFlow's start-up
    lines (nor, without an NVIDIA driver, its failed CUDA probe) reaches stderr, and what the
    process writes to stderr afterwards does."""
    code = ("import sys; from hvdscale.tensorflow.quiet import import_tensorflow, list_gpus; "
            "tf = import_tensorflow(); list_gpus(); print('after', file=sys.stderr); "
            "print(tf.__version__)")
    env = job_env()
    env.pop("TF_CPP_MIN_LOG_LEVEL")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=240, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == ["after"], proc.stderr
    assert proc.stdout.strip()


@pytest.mark.multiproc
def test_progress_under_horovodrun_is_a_few_plain_lines_from_rank_0(tmp_path):
    """Two workers, stderr to a file (as in a batch job): one line per 10 % of the run, from
    rank 0 only, no bar redraws; 2048 examples / (2 x 32) = 32 steps per epoch, 2 epochs."""
    log = tmp_path / "stderr.log"
    cmd = [tool("horovodrun"), "-np", "2", "--gloo", sys.executable, "-m", "hvdscale", "train",
           "--set", "data.train_limit=2048", "--set", "data.test_limit=200",
           "--set", "batch.per_worker=32", "--set", "batch.reference=64",
           "--set", "train.epochs=2", "--set", "lr.warmup_steps=2",
           "--set", "train.eval_every_epochs=1", "--set", "log.tensorboard=false",
           "--set", "log.progress_every_percent=10", "--set", "log.progress_every_s=3600",
           "--out", str(tmp_path / "run")]
    with open(log, "w") as err:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True,
                              env=job_env(), timeout=300, cwd=REPO)
    text = log.read_text()
    assert proc.returncode == 0, proc.stdout[-3000:] + text[-3000:]
    assert "\r" not in text                  # no bar redraws
    lines = text.splitlines()
    progress = [line for line in lines if PROGRESS.search(line)]
    # every int(64 * 10 %) = 6 steps, the last step left to the summary: 6, 12, ..., 60
    steps = [int(PROGRESS.search(line).group(1)) for line in progress]
    assert steps == list(range(6, 64, 6)), text[-3000:]
    assert all(line.startswith("[0]<stderr>:") for line in progress)
    assert all(PROGRESS.search(line).group(2) == "64" for line in progress)
    # the loss is known from the first statistics read (log.every_steps = 20) on
    assert [PROGRESS.search(line).group(5) is not None for line in progress] == \
        [step >= 20 for step in steps]
    evaluations = [line for line in lines if "test accuracy" in line]
    assert len(evaluations) == 2 and all(e.startswith("[0]<stderr>:") for e in evaluations)
    assert len(lines) <= len(progress) + len(evaluations) + 5, text
