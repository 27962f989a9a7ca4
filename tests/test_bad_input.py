"""Bad input under `horovodrun -np 2`: every rank refuses it before training with the same
one-line `hvdscale train: error: ...`, exits 2, and the job ends quickly (no rank waits in a
collective for a peer that has gone)."""
import gzip
import re
import shutil
import sys
import time

import pytest

from conftest import horovodrun, run_job, tool

pytestmark = pytest.mark.multiproc
FMNIST = "/usr/share/datasets/fashion-mnist"
SMALL = ["--set", "data.train_limit=256", "--set", "data.test_limit=64",
         "--set", "batch.per_worker=32", "--set", "batch.reference=64",
         "--set", "train.max_steps=4", "--set", "lr.warmup_steps=1",
         "--set", "checkpoint.every_steps=2", "--set", "log.progress=false",
         "--set", "log.tensorboard=false"]
ERROR_LINE = re.compile(r"^\[(\d)\]<stderr>:(hvdscale train: error: .*)$", re.M)

# name -> (extra arguments, words the one line must contain)
CONFIG_CASES = {
    "unknown_key": (["--set", "train.epochz=3"], "unknown key 'epochz' in train"),
    "wrong_type": (["--set", "batch.per_worker=many"], "batch.per_worker: expected a number"),
    "batch_zero": (["--set", "batch.per_worker=0"], "batch.per_worker: must be > 0"),
    "negative_lr": (["--set", "optimizer.base_lr=-0.1"], "optimizer.base_lr: must be > 0"),
    "lr_overflows_float32": (["--set", "optimizer.base_lr=1e39"],
                             "optimizer.base_lr: 1e+39 overflows float32"),
    "warmup_too_long": (["--set", "lr.warmup_steps=null", "--set", "lr.warmup_epochs=3",
                         "--set", "train.epochs=2"],
                        "lr.warmup_epochs (3) is longer than training"),
    "missing_dataset": (["--set", "data.path=/nonexistent/fashion-mnist"],
                        "/nonexistent/fashion-mnist"),
}


def refused_by_every_rank(proc, words, controller="gloo"):
    """Each of the two ranks printed exactly one error line, the same one, with `words`."""
    output = proc.stdout + proc.stderr
    # mpirun may glue one rank's line to the next rank's tag: cut at the next "[1,"
    lines = ERROR_LINE.findall(output) if controller == "gloo" else \
        re.findall(r"\[1,(\d)\]<stderr>:(hvdscale train: error: [^\n\[]*)", output)
    by_rank = {}
    for rank, line in lines:
        by_rank.setdefault(rank, []).append(line)
    assert by_rank, output[-3000:]
    # horovodrun --gloo ends the other workers as soon as one exits non-zero, so a slower rank
    # may be terminated (143) before it prints; any rank that did print said the same line.
    for rank in ("0", "1"):
        terminated = f"Process {rank} exit with status code 143" in output
        assert rank in by_rank or (controller == "gloo" and terminated), output[-3000:]
    assert all(len(v) == 1 for v in by_rank.values()), by_rank
    first = next(iter(by_rank.values()))[0]
    assert all(v == [first] for v in by_rank.values()), by_rank
    assert words in first, first
    assert "<stderr>:Traceback" not in output, output[-3000:]
    assert proc.returncode != 0
    if controller == "gloo":   # horovodrun --gloo reports the first failed rank's exit code
        assert "Exit code: 2" in output, output[-2000:]
    else:                      # mpirun passes it through
        assert proc.returncode == 2, output[-2000:]
    return first


def train(args, controller="gloo", **kw):
    start = time.monotonic()
    proc = horovodrun(2, tool("hvdscale"), "train", *args, controller=controller,
                      check=False, timeout=120, **kw)
    return proc, time.monotonic() - start


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_recipe_values_refused_by_every_rank(case, tmp_path):
    extra, words = CONFIG_CASES[case]
    proc, took = train([*SMALL, *extra, "--out", tmp_path / "run"])
    refused_by_every_rank(proc, words)
    assert took < 30, f"{case}: took {took:.1f} s"
    assert not (tmp_path / "run" / "metrics.jsonl").exists()      # no training happened


def test_bad_recipe_file_under_mpi(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("name: bad\nframework: torch\nbatch: {per_worker: 32, acumulation: 2}\n")
    proc, took = train([str(recipe), *SMALL], controller="mpi")
    refused_by_every_rank(proc, "unknown key 'acumulation' in batch", controller="mpi")
    assert took < 30


def test_truncated_dataset_refused_by_every_rank(tmp_path):
    data = tmp_path / "fm"
    data.mkdir()
    for f in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz",
              "train-labels-idx1-ubyte.gz"):
        shutil.copy(f"{FMNIST}/{f}", data / f)
    with gzip.open(f"{FMNIST}/train-images-idx3-ubyte.gz") as src:
        head = src.read(16 + 28 * 28 * 100)           # the header promises 60000 images
    with gzip.open(data / "train-images-idx3-ubyte.gz", "wb") as dst:
        dst.write(head)
    proc, took = train([*SMALL, "--set", f"data.path={data}", "--out", tmp_path / "run"])
    line = refused_by_every_rank(proc, "train-images-idx3-ubyte")
    assert took < 30, line


@pytest.fixture(scope="module")
def checkpointed_run(tmp_path_factory):
    """A finished one-process run with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("ckpt") / "run"
    # one process with the 2-worker run's global batch (64), so the checkpoint fits
    run_job([sys.executable, "-m", "hvdscale.cli", "train", "--no-horovod", *SMALL,
             "--set", "batch.per_worker=64", "--out", out], timeout=240)
    return out


def corrupt_sidecar(ckpt):
    (ckpt / "step-00000004.json").write_text('{"step": 4, "state_fi')


def corrupt_state(ckpt):
    (ckpt / "step-00000004.pt").write_bytes(b"this is not a torch checkpoint" * 100)


def truncate_state(ckpt):
    path = ckpt / "step-00000004.pt"
    path.write_bytes(path.read_bytes()[:1000])


@pytest.mark.parametrize("damage", [corrupt_sidecar, corrupt_state, truncate_state])
def test_unreadable_checkpoint_refused_by_every_rank(damage, checkpointed_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(checkpointed_run, out)
    damage(out / "checkpoints")
    proc, took = train([*SMALL, "--set", "train.max_steps=6", "--out", out, "--resume"])
    line = refused_by_every_rank(proc, "checkpoint")
    assert "step-00000004" in line, line
    assert took < 30, f"{damage.__name__}: took {took:.1f} s"
