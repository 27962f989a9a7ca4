"""Where the TF one-worker step's time goes, in one process: rounds of four arms, each STEPS
timed steps after 8 warm-up steps, the order rotated per round:

    engine      hvdscale's Engine loop + TF trainer, configured as scaling.py's hvdscale_tf
    keras_fit   scaling.py's plain Keras 3 model.fit peer
    bare_ours   the trainer's compiled step alone, on tensors made beforehand
    data_path   source -> device_batches -> train_step, without the engine's bookkeeping

Per arm: wall ms, process CPU ms and main-thread CPU ms per step (TensorFlow runs the graph's
ops on its own threads, so the main thread's CPU is the Python-side cost of a step), and the
per-round ratios to keras_fit.

    cd <repo> && PYTHONPATH=$PWD OMP_NUM_THREADS=1 STEPS=50 ROUNDS=3 \
        .venv/bin/horovodrun -np 1 --gloo .venv/bin/python benchmarks/tf_step_cpu.py
"""
import json, os, sys, time, statistics, tempfile
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import scaling
STEPS, WARM, ROUNDS = int(os.environ.get("STEPS", "60")), 8, int(os.environ.get("ROUNDS", "4"))
from hvdscale.commands.train import start_workers
from hvdscale.config import load_config
from hvdscale.data import build_sources
from hvdscale.engine import Engine
cfg = load_config(overrides=[
    "framework=tensorflow", "model.name=cnn", "data.kind=synthetic", "data.channels=1",
    "data.image_size=28", "data.num_classes=10", "data.train_limit=4096",
    "data.test_limit=64", "optimizer.name=sgd", "optimizer.base_lr=0.01",
    "optimizer.momentum=0.9", "optimizer.weight_decay=0", "batch.per_worker=64",
    "lr.scaling=none", "lr.warmup=none", "lr.decay=constant",
    "train.threads=1", f"train.max_steps={WARM + STEPS + 1}", "train.epochs=1000",
    "train.eval_every_epochs=null", "train.target_accuracy=null",
    "checkpoint.every_epochs=null", "log.progress=false", "log.tensorboard=false",
    *json.loads(os.environ.get("SETTINGS", "[]"))])
comm, trainer = start_workers(cfg)
train, test = build_sources(cfg, comm.rank, comm.size)
import tensorflow as tf, keras, numpy as np

def now():
    return (time.perf_counter(), time.process_time(), time.thread_time())

class CpuClock:
    def __init__(self): self.marks = []
    def perf_counter(self):
        self.marks.append(now()); return self.marks[-1][0]
    def __getattr__(self, n): return getattr(time, n)

def span(a, b):
    return [(y - x) / STEPS * 1e3 for x, y in zip(a, b)]

def engine_run():
    clock = CpuClock(); scaling.time = clock
    ts = scaling.TimedSource(train, WARM, WARM + STEPS, lambda: None)
    with tempfile.TemporaryDirectory() as out:
        Engine(cfg, comm, trainer, ts, test, out, hardware="cpu", echo=lambda *a, **k: None).run()
    scaling.time = time
    return span(clock.marks[0], clock.marks[-1])

class A: pass
args = A(); args.batch, args.steps, args.warmup, args.threads = 64, STEPS, WARM, 1
def keras_fit():
    clock = CpuClock(); scaling.time = clock
    scaling.worker_keras_fit(args)
    scaling.time = time
    return span(clock.marks[0], clock.marks[-1])

x, y = scaling.synthetic(64, 0)
xs = [tf.constant(b) for b in x]; ys = [tf.constant(b) for b in y]
def bare_ours():
    lr = tf.constant(0.01, tf.float32)
    for i in range(WARM): trainer._step(xs[i % 4], ys[i % 4], lr)
    a = now()
    for i in range(STEPS): trainer._step(xs[i % 4], ys[i % 4], lr)
    return span(a, now())

def data_path():
    """source -> device_batches -> train_step, nothing else (what the engine adds is the rest)"""
    import itertools
    it = trainer.device_batches(itertools.chain(train.epoch(0, 0), train.epoch(1, 0)))
    for i in range(WARM): trainer.train_step(next(it), 0.01)
    a = now()
    for i in range(STEPS): trainer.train_step(next(it), 0.01)
    return span(a, now())

arms = {"engine": engine_run, "keras_fit": keras_fit, "bare_ours": bare_ours, "data_path": data_path}
res = {k: [] for k in arms}
for r in range(ROUNDS):
    names = list(arms); names = names[r % 4:] + names[:r % 4]
    for n in names:
        res[n].append(arms[n]())
    print("round", r, {k: [round(z, 2) for z in v[-1]] for k, v in res.items()}, os.getloadavg(), flush=True)
out = {}
for i, metric in enumerate(("wall_ms", "cpu_ms", "main_cpu_ms")):
    for k, v in res.items():
        out[f"{k}_{metric}"] = round(statistics.median([z[i] for z in v]), 3)
    for k in ("engine", "bare_ours", "data_path"):
        out[f"{k}_over_keras_{metric}_rounds"] = [round(a[i] / b[i], 4) for a, b in zip(res[k], res["keras_fit"])]
print("INPROC " + json.dumps(out))
