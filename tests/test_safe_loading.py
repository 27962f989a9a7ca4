"""Safe loading: recipes are read with yaml.safe_load, torch checkpoints with weights_only=True
(and TF's with allow_pickle=False), nothing in hvdscale unpickles files, and Horovod's
launcher services refuse messages not signed with the job's secret key.

Each payload here would create a marker file if it were executed; the tests check both the
refusal and that the marker never appears (and, once, that the payload is live)."""
import io
import os
import re
import socket
import struct
import subprocess
import sys

import pytest

from conftest import REPO, job_env

SMALL = ["--set", "data.train_limit=256", "--set", "data.test_limit=64",
         "--set", "batch.per_worker=64", "--set", "batch.reference=64",
         "--set", "train.max_steps=4", "--set", "lr.warmup_steps=1",
         "--set", "checkpoint.every_steps=2", "--set", "train.threads=1",
         "--set", "log.progress=false", "--set", "log.tensorboard=false"]


def hvdscale(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "hvdscale.cli", *map(str, args)],
                          env=job_env(), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


class Payload:
    """Unpickling this object runs `touch MARKER`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ------------------------------------------------------------------------------ recipes
@pytest.mark.parametrize("tag", ["!!python/object/apply:os.system",
                                 "!!python/object/new:os.system"])
def test_recipe_with_a_python_tag_is_refused(tag, tmp_path):
    marker = tmp_path / "recipe-ran"
    recipe = tmp_path / "evil.yaml"
    recipe.write_text(f"name: evil\nframework: torch\ntrain:\n  seed: {tag} ['touch {marker}']\n")
    proc = hvdscale("train", recipe, "--no-horovod", timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hvdscale train: error: ")
    assert "is not valid YAML" in lines[0] and "python/object" in lines[0], lines[0]
    assert not marker.exists()


def test_set_override_with_a_python_tag_is_refused(tmp_path):
    marker = tmp_path / "override-ran"
    proc = hvdscale("train", "--no-horovod", "--set",
                    f"train.seed=!!python/object/apply:os.system ['touch {marker}']", timeout=60)
    assert proc.returncode == 2 and "is not valid YAML" in proc.stderr
    assert not marker.exists()


# ------------------------------------------------------------------------------ checkpoints
@pytest.fixture(scope="module")
def torch_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("safe") / "run"
    proc = hvdscale("train", "--no-horovod", *SMALL, "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_torch_checkpoint_with_a_pickled_object_is_refused(torch_run, tmp_path):
    import shutil
    import torch
    out = tmp_path / "run"
    shutil.copytree(torch_run, out)
    state = out / "checkpoints" / "step-00000004.pt"
    marker = tmp_path / "checkpoint-ran"
    good = torch.load(state, weights_only=True)
    good["model"]["extra"] = Payload(marker)          # one poisoned entry among real tensors
    torch.save(good, state)

    # the payload is live: a plain (unsafe) torch.load would run it
    check = subprocess.run([sys.executable, "-c", "import sys, torch; "
                            "torch.load(sys.argv[1], weights_only=False)", str(state)],
                           env=job_env(),
                           capture_output=True, text=True, timeout=120)
    assert marker.exists(), check.stderr[-2000:]
    marker.unlink()

    proc = hvdscale("train", "--no-horovod", *SMALL, "--set", "train.max_steps=6",
                    "--out", out, "--resume")
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("hvdscale train: error: ") and "step-00000004.pt" in line, line
    assert "holds more than plain tensors" in line, line
    assert not marker.exists()


def test_tensorflow_checkpoint_with_a_pickled_array_is_refused(tmp_path):
    """np.load(allow_pickle=False): an object array inside the .npz is refused."""
    import numpy as np
    from hvdscale.config import load_config
    from hvdscale.comm import Comm
    from hvdscale.errors import ConfigError
    from hvdscale.tensorflow.trainer import TensorFlowTrainer
    marker = tmp_path / "npz-ran"
    buf = io.BytesIO()
    np.savez(buf, model__names=np.array([Payload(marker)], dtype=object))
    cfg = load_config(None, ["framework=tensorflow", "model.name=mlp"])
    trainer = TensorFlowTrainer(cfg, Comm("tensorflow"), threads=1)
    trainer.build()
    with pytest.raises(ConfigError, match="checkpoint is unreadable"):
        trainer.load_state_bytes(buf.getvalue())
    assert not marker.exists()


# ------------------------------------------------------------------------------ source audit
UNSAFE = [
    (re.compile(r"\bpickle\.loads?\("), "pickle.load"),
    (re.compile(r"\b(cloudpickle|dill|joblib|marshal|shelve)\b"), "an unpickling library"),
    (re.compile(r"yaml\.(load|full_load|unsafe_load)\("), "a non-safe YAML loader"),
    (re.compile(r"allow_pickle\s*=\s*True"), "allow_pickle=True"),
]


def test_no_unsafe_loader_in_the_package():
    """Nothing in hvdscale/ unpickles files or reads YAML unsafely; every torch.load is
    weights_only=True and every np.load allow_pickle=False."""
    problems = []
    for path in sorted((REPO / "hvdscale").rglob("*.py")):
        text = path.read_text()
        for pattern, what in UNSAFE:
            for m in pattern.finditer(text):
                problems.append(f"{path.relative_to(REPO)}: {what}: {m.group(0)}")
        calls = r"\b(torch\.load|np\.load|numpy\.load)\(([^()]|\([^()]*\))*\)"
        for call in re.finditer(calls, text):
            needed = "weights_only=True" if call.group(1) == "torch.load" else "allow_pickle=False"
            if needed not in call.group(0):
                problems.append(f"{path.relative_to(REPO)}: {call.group(0)} lacks {needed}")
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------ Horovod's key
def test_horovod_services_refuse_messages_without_the_secret_key(tmp_path):
    """horovodrun makes a random 32-byte key per job (secret.make_secret_key) and its driver
    and task services (host checks, elastic notifications) check an HMAC-SHA256 of every
    message before unpickling it. A client with another key, or a forged message carrying a
    pickled payload, is refused and the payload never runs; the right key works."""
    from horovod.runner.common.util import network, secret
    from horovod.runner.driver.driver_service import HorovodRunDriverService
    key = secret.make_secret_key()
    service = HorovodRunDriverService(1, key, nics=None)
    try:
        addresses = service.addresses()
        # the right key: the client's probe (a signed ping) is answered
        good = network.BasicClient(HorovodRunDriverService.NAME, addresses, key, verbose=0,
                                   probe_timeout=3, attempts=1)
        assert good.addresses()

        # another key: the client's request is refused
        with pytest.raises(Exception):
            network.BasicClient(HorovodRunDriverService.NAME, addresses,
                                secret.make_secret_key(), verbose=0, probe_timeout=3,
                                attempts=1)

        # a forged message: a pickled payload with a wrong digest, sent by hand
        import cloudpickle
        marker = tmp_path / "forged-ran"
        body = cloudpickle.dumps(Payload(marker))
        host, port = next(iter(addresses.values()))[0]
        with socket.create_connection((host, port), timeout=10) as sock:
            sock.sendall(b"\0" * secret.DIGEST_LENGTH + struct.pack("i", len(body)) + body)
            sock.settimeout(10)
            try:
                reply = sock.recv(1024)
            except (ConnectionResetError, socket.timeout):
                reply = b""
        assert not marker.exists()
        assert b"forged-ran" not in reply
        # the same message, correctly signed, WOULD be unpickled (the check is what stops it)
        wire = network.Wire(key)
        signed = io.BytesIO()
        wire.write(Payload(marker), signed)
        with pytest.raises(Exception, match="Security error"):
            network.Wire(secret.make_secret_key()).read(io.BytesIO(signed.getvalue()))
        assert not marker.exists()
    finally:
        service.shutdown()


def test_gloo_rendezvous_store_takes_unsigned_requests():
    """Known gap, recorded in docs/reliability.md: Horovod 0.28.1's Gloo rendezvous (an HTTP
    key-value store that horovodrun serves on all interfaces) checks no key. It only holds
    raw address bytes for Gloo's C++ side, which are never unpickled, so a stranger on the
    network can disturb a starting job but not run code. If Horovod adds authentication
    here this test fails and the doc must be updated."""
    import urllib.request
    from horovod.runner.http.http_server import RendezvousServer
    server = RendezvousServer(verbose=0)
    port = server.start()
    try:
        req = urllib.request.Request(f"http://127.0.0.1:{port}/global/stranger", data=b"hello",
                                     method="PUT")
        assert urllib.request.urlopen(req, timeout=10).status == 200
        got = urllib.request.urlopen(f"http://127.0.0.1:{port}/global/stranger", timeout=10)
        assert got.read() == b"hello"
    finally:
        server.stop()
