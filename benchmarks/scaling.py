"""Weak scaling of one training step: hvdscale (Horovod) against the peers a user would pick.

The same small CNN (hvdscale's `cnn`), Fashion-MNIST-shaped synthetic batches (28x28x1,
10 classes), SGD with momentum, per-worker batch fixed, one thread per worker.

    torch       ours: `hvdscale train`'s Engine loop + torch trainer under horovodrun -np K:
                      K=2 once with the Gloo and once with the MPI controller; K=1 (no
                      collective runs, so no controller matters) under horovodrun's default
                peer: a plain DistributedDataParallel loop (gloo) under torch.distributed.run
    tensorflow  ours: the same Engine loop + TF trainer under horovodrun -np K (Gloo)
                peer K=1: plain Keras 3 `model.fit` in one process (its own defaults, so XLA
                          where Keras picks it)
                peer K=2: a plain `tf.function` step with `hvd.DistributedGradientTape`
                          under horovodrun -np 2 (Gloo)

Ours is timed through the whole engine loop (data source, LR schedule, trainer step, guard,
logging hooks): the clock starts when the data source hands out step `warmup` (after a
barrier) and stops when it hands out the last step, so every step in between is counted
from one batch request to the next. The peers time the same number of steps after the same
warm-up. Each rank's time is reduced to the slowest rank:

    tau_K = K * batch * steps / time        E_2 = tau_2 / (2 * tau_1)

Noise: the machine is shared, so every configuration runs `--repeats` times and the runs are
interleaved (each round runs every configuration once, in an order rotated per round), so
drifting load hits all sides alike. The table gives the median and the spread (min..max) per
configuration; ratios are ours / peer of the medians, and the per-round ratios (ours and the
peer run back to back) are shown with their spread. Load average is recorded at start/end.

    .venv/bin/python benchmarks/scaling.py [--repeats 5] [--steps 60] [--skip-tf]
        [--variant NAME:KEY=VAL,KEY=VAL ...]   extra Horovod/OMP environment (PYTHONPATH=TREE:
                                               ours from another source tree), or recipe
                                               settings, e.g. horovod.groups=0) for ours,
                                               compared side by side in the same run

The last line is one JSON object: ratio_tau_1, ratio_tau_2, hvdscale_E_2, ddp_E_2 for ours
under the controller a user gets (`controller`: what plain horovodrun and `hvdscale launch`
run, MPI when Horovod has it, else Gloo), the same keys for each controller measured
(`*_gloo`, `*_mpi`), tf_ratio_tau_1, tf_ratio_tau_2 (ours and the TF peers both over Gloo),
repeats, and per-configuration medians, spreads and samples.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TRAIN_IMAGES = 4096          # synthetic training set per run (epoch boundaries are real)
SETTINGS_VAR = "HVDSCALE_BENCH_SETTINGS"    # a variant's recipe settings, to ours' workers


# ---------------------------------------------------------------------------- workers
def synthetic(batch, rank, count=4):
    import numpy as np
    rng = np.random.default_rng(1000 + rank)
    x = rng.standard_normal((count, batch, 28, 28, 1)).astype(np.float32)
    y = rng.integers(0, 10, size=(count, batch)).astype(np.int64)
    return x, y


class TimedSource:
    """A training source (hvdscale.data protocol) that notes the clock when it hands out the
    batch of step `start` (after a barrier on all ranks) and the batch of step `stop`."""

    def __init__(self, inner, start, stop, barrier):
        self.inner, self.start, self.stop, self.barrier = inner, start, stop, barrier
        self.num_examples, self.steps_per_epoch = inner.num_examples, inner.steps_per_epoch
        self.served, self.t0, self.t1 = 0, None, None

    def epoch(self, epoch, start=0):
        for batch in self.inner.epoch(epoch, start):
            if self.served == self.start:
                self.barrier()
                self.t0 = time.perf_counter()
            elif self.served == self.stop:
                self.t1 = time.perf_counter()
            self.served += 1
            yield batch


def worker_engine(args, framework):
    """Ours: the Engine loop `hvdscale train` runs, on synthetic in-memory data."""
    from hvdscale.commands.train import start_workers
    from hvdscale.config import load_config
    from hvdscale.data import build_sources
    from hvdscale.engine import Engine
    steps_total = args.warmup + args.steps + 1
    cfg = load_config(overrides=[
        f"framework={framework}", "model.name=cnn", "data.kind=synthetic", "data.channels=1",
        "data.image_size=28", "data.num_classes=10", f"data.train_limit={TRAIN_IMAGES}",
        "data.test_limit=64", "optimizer.name=sgd", "optimizer.base_lr=0.01",
        "optimizer.momentum=0.9", "optimizer.weight_decay=0", f"batch.per_worker={args.batch}",
        "lr.scaling=none", "lr.warmup=none", "lr.decay=constant",
        f"train.threads={args.threads}", f"train.max_steps={steps_total}", "train.epochs=1000",
        "train.eval_every_epochs=null", "train.target_accuracy=null",
        "checkpoint.every_epochs=null", "log.progress=false", "log.tensorboard=false",
        *json.loads(os.environ.get(SETTINGS_VAR, "[]"))])
    comm, trainer = start_workers(cfg)
    train, test = build_sources(cfg, comm.rank, comm.size)
    timed_source = TimedSource(train, args.warmup, args.warmup + args.steps, comm.barrier)
    with tempfile.TemporaryDirectory(prefix="scaling-engine-") as out:
        Engine(cfg, comm, trainer, timed_source, test, out, hardware="cpu",
               echo=lambda *a, **k: None).run()
    elapsed = comm.allreduce(timed_source.t1 - timed_source.t0, op="max")
    return comm.rank, result(comm.size, args, elapsed)


def worker_ddp(args):
    """torch peer: the same model and optimizer under DistributedDataParallel (gloo)."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from hvdscale.torch.models import build_model
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(42)
    model = torch.nn.parallel.DistributedDataParallel(build_model("cnn", 10, 1, 28))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = synthetic(args.batch, rank)
    xs = [torch.from_numpy(b).permute(0, 3, 1, 2).contiguous() for b in x]
    ys = [torch.from_numpy(b) for b in y]

    def step(i):
        opt.zero_grad()
        F.cross_entropy(model(xs[i % len(xs)]), ys[i % len(ys)]).backward()
        opt.step()

    def slowest(t):
        value = torch.tensor([t], dtype=torch.float64)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return float(value)

    out = timed(step, args, dist.barrier, slowest, rank, size)
    dist.destroy_process_group()
    return out


def _tf_threads(tf, threads):
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)


def _tf_dataset(tf, args, rank):
    import numpy as np
    rng = np.random.default_rng(1000 + rank)
    x = rng.standard_normal((TRAIN_IMAGES, 28, 28, 1)).astype(np.float32)
    y = rng.integers(0, 10, size=TRAIN_IMAGES).astype(np.int64)
    return (tf.data.Dataset.from_tensor_slices((x, y)).shuffle(TRAIN_IMAGES, seed=rank)
            .repeat().batch(args.batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE))


def worker_keras_fit(args):
    """TF peer, one process: plain Keras 3 compile + fit (its default jit_compile="auto")."""
    import keras
    import tensorflow as tf
    _tf_threads(tf, args.threads)
    from hvdscale.tensorflow.models import build_model
    keras.utils.set_random_seed(42)
    model = build_model("cnn", 10, 1, 28)
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    marks = {}

    class Clock(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch in (args.warmup, args.warmup + args.steps):
                marks[batch] = time.perf_counter()

    model.fit(_tf_dataset(tf, args, 0), epochs=1, steps_per_epoch=args.warmup + args.steps + 1,
              callbacks=[Clock()], verbose=0)
    return 0, result(1, args, marks[args.warmup + args.steps] - marks[args.warmup])


def worker_tf_tape(args):
    """TF peer, K processes: the plain Horovod recipe -- a tf.function step with
    hvd.DistributedGradientTape, variables broadcast from rank 0 after the first step."""
    import keras
    import tensorflow as tf
    _tf_threads(tf, args.threads)
    import horovod.tensorflow as hvd
    hvd.init()
    from hvdscale.tensorflow.models import build_model
    keras.utils.set_random_seed(42)
    model = build_model("cnn", 10, 1, 28)
    opt = keras.optimizers.SGD(0.01, momentum=0.9)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    # DistributedGradientTape needs the tf.Variables behind Keras 3's variables
    sources = [v.value for v in model.trainable_variables]

    @tf.function
    def step(x, y, first):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        tape = hvd.DistributedGradientTape(tape)
        grads = tape.gradient(loss, sources)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        if first:
            hvd.broadcast_variables([v.value for v in model.variables], root_rank=0)
            hvd.broadcast_variables([v.value for v in opt.variables], root_rank=0)
        return loss

    batches = iter(_tf_dataset(tf, args, hvd.rank()))

    def run(i):
        x, y = next(batches)
        step(x, y, i == 0)

    def barrier():
        hvd.allreduce(tf.constant(0.0), name="barrier")

    def slowest(t):
        return float(hvd.allreduce(tf.constant(t, tf.float64), op=hvd.Max, name="slowest"))

    return timed(run, args, barrier, slowest, hvd.rank(), hvd.size())


def timed(step, args, barrier, slowest, rank, size):
    for i in range(args.warmup):
        step(i)
    barrier()
    t0 = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.steps):
        step(i)
    return rank, result(size, args, slowest(time.perf_counter() - t0))


def result(size, args, seconds):
    return {"workers": size, "seconds": seconds,
            "images_per_sec": size * args.batch * args.steps / seconds}


WORKERS = {"hvdscale": lambda a: worker_engine(a, "torch"),
           "hvdscale_tf": lambda a: worker_engine(a, "tensorflow"),
           "ddp": worker_ddp, "keras_fit": worker_keras_fit, "tf_tape": worker_tf_tape}


# ---------------------------------------------------------------------------- driver
def parse_variant(text):
    """NAME:KEY=VAL,KEY=VAL -> (name, {KEY: VAL}): environment variables for ours' workers;
    a dotted lower-case KEY (horovod.groups=0) is a recipe setting instead. A piece without
    '=' continues the value before it (HOROVOD_THREAD_AFFINITY=0,1)."""
    name, _, rest = text.partition(":")
    items = []
    for piece in filter(None, rest.split(",")):
        if "=" not in piece and items:
            items[-1] += "," + piece
        else:
            items.append(piece)
    env, settings = {}, []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"scaling.py: --variant {text!r}: {item!r} is not KEY=VALUE")
        if "." in key and key == key.lower():
            settings.append(f"{key}={value}")
        else:
            env[key] = value
    if settings:
        env[SETTINGS_VAR] = json.dumps(settings)
    return name, env


def configurations(args):
    """(label, side, K, launcher, extra env) for every configuration of the run."""
    confs = []
    for k in (1, 2):
        for suffix, env in args.variants:
            if k == 1:
                # one worker runs no collective, so the controller makes no difference: ours
                # at K=1 runs once per round, under the launcher's default controller
                confs.append((f"hvdscale{suffix}_np1", "hvdscale", 1, args.default_controller,
                              env))
                continue
            for ctl in args.controllers:
                confs.append((f"hvdscale_{ctl}{suffix}_np{k}", "hvdscale", k, ctl, env))
        confs.append((f"ddp_np{k}", "ddp", k, "torchrun", {}))
        if not args.skip_tf:
            for suffix, env in args.variants:
                confs.append((f"hvdscale_tf_gloo{suffix}_np{k}", "hvdscale_tf", k, "gloo", env))
            confs.append(("keras_fit_np1", "keras_fit", 1, "python", {}) if k == 1 else
                         (f"tf_tape_gloo_np{k}", "tf_tape", k, "gloo", {}))
    return confs


def launch(conf, args):
    label, side, k, launcher, extra = conf
    out = Path(tempfile.mkdtemp(prefix=f"scaling-{label}-")) / "result.json"
    me = [sys.executable, str(Path(__file__).resolve()), "--worker", side, "--result", str(out),
          "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
          "--threads", str(args.threads)]
    if launcher in ("gloo", "mpi"):
        cmd = [str(BIN / "horovodrun"), "-np", str(k), f"--{launcher}", *me]
    elif launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={k}", *me[1:]]
    else:
        cmd = me
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TF_CPP_MIN_LOG_LEVEL="2",
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # a variant's PYTHONPATH goes first: ours from another source tree (a before/after A/B
    # in one run: --variant before:PYTHONPATH=/tmp/old-tree)
    extra = dict(extra)
    if "PYTHONPATH" in extra:
        env["PYTHONPATH"] = extra.pop("PYTHONPATH") + os.pathsep + env["PYTHONPATH"]
    env.update(extra)
    for attempt in (1, 2):   # a launcher that dies at start-up or teardown gets one retry
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode == 0 and out.is_file():
            return json.loads(out.read_text())["images_per_sec"]
        print(f"scaling.py: {label} attempt {attempt} failed ({proc.returncode}): "
              f"{proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        out.unlink(missing_ok=True)
    sys.exit(f"scaling.py: {label} failed twice:\n{proc.stderr[-3000:]}")


def spread(values):
    """(min, max) and the relative spread (max - min) / median."""
    med = statistics.median(values)
    return min(values), max(values), (max(values) - min(values)) / med if med else 0.0


def launch_controller():
    """The controller plain horovodrun picks on this install (hvdscale.launch's rule)."""
    from horovod.common.util import gloo_built, mpi_built
    from hvdscale.launch import horovodrun_controller
    return horovodrun_controller(bool(mpi_built()), bool(gloo_built()))


def loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64, help="images per worker per step")
    parser.add_argument("--steps", type=int, default=60, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=8, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=1, help="compute threads per worker")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs per configuration, interleaved; median and spread reported")
    parser.add_argument("--controllers", default="gloo,mpi",
                        help="Horovod controllers for ours (comma list of gloo, mpi)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VAL,..",
                        help="an extra setting of ours to compare (environment for the workers)")
    parser.add_argument("--skip-tf", action="store_true", help="torch only")
    parser.add_argument("--only", default=None, metavar="REGEX",
                        help="run only the configurations whose label matches (e.g. 'tf|keras')")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        rank, res = WORKERS[args.worker](args)
        if rank == 0:
            Path(args.result).write_text(json.dumps(res))
        return

    args.controllers = [c for c in args.controllers.split(",") if c]
    args.default_controller = launch_controller()
    # (label suffix, environment): "" for the default, "_NAME" for each --variant
    args.variants = [("", {})] + [(f"_{name}", env) for name, env in map(parse_variant,
                                                                          args.variant)]
    confs = configurations(args)
    if args.only:
        import re
        confs = [c for c in confs if re.search(args.only, c[0])]
    samples = {c[0]: [] for c in confs}
    load_start = loadavg()
    for r in range(args.repeats):   # interleaved, order rotated per round
        order = confs[r % len(confs):] + confs[:r % len(confs)]
        for conf in order:
            samples[conf[0]].append(launch(conf, args))
            print(f"round {r + 1}/{args.repeats} {conf[0]:<28} "
                  f"{samples[conf[0]][-1]:8.1f} img/s  load {loadavg()}", file=sys.stderr)
    load_end = loadavg()
    tau = {label: statistics.median(v) for label, v in samples.items()}

    print(f"small CNN step, batch {args.batch}/worker, {args.steps} timed steps, "
          f"{args.threads} thread(s) per worker, median of {args.repeats} interleaved runs; "
          f"load average {load_start} -> {load_end}")
    print(f"| {'configuration':<28} | {'median img/s':>12} | {'min':>8} | {'max':>8} | "
          f"{'spread':>6} |")
    print(f"|{'-' * 30}|{'-' * 14}|{'-' * 10}|{'-' * 10}|{'-' * 8}|")
    spreads = {}
    for label, values in samples.items():
        low, high, rel = spread(values)
        spreads[label] = round(rel, 3)
        print(f"| {label:<28} | {tau[label]:>12.1f} | {low:>8.1f} | {high:>8.1f} | "
              f"{rel:>6.1%} |")

    default = args.default_controller
    summary = {"batch_per_worker": args.batch, "steps": args.steps, "threads": args.threads,
               "repeats": args.repeats, "load_start": load_start, "load_end": load_end,
               "controller": default}

    def compare(ours, peer, key):
        """ours/peer from the medians plus the per-round ratios and their spread."""
        if ours not in tau or peer not in tau:
            return
        rounds = [a / b for a, b in zip(samples[ours], samples[peer])]
        summary[key] = round(tau[ours] / tau[peer], 4)
        summary[key + "_rounds_median"] = round(statistics.median(rounds), 4)
        summary[key + "_rounds_min"] = round(min(rounds), 4)
        summary[key + "_rounds_max"] = round(max(rounds), 4)
        print(f"{key:<22} {summary[key]:.3f} (per round: median "
              f"{statistics.median(rounds):.3f}, {min(rounds):.3f}..{max(rounds):.3f})")

    def efficiency(side, key, one=None):
        one, two = one or f"{side}_np1", f"{side}_np2"
        if one in tau and two in tau:
            summary[key] = round(tau[two] / (2 * tau[one]), 4)
            rounds = [b / (2 * a) for a, b in zip(samples[one], samples[two])]
            summary[key + "_rounds_min"] = round(min(rounds), 4)
            summary[key + "_rounds_max"] = round(max(rounds), 4)
            print(f"{key:<22} {summary[key]:.3f} (per round {min(rounds):.3f}.."
                  f"{max(rounds):.3f})")

    for suffix, _ in args.variants:
        compare(f"hvdscale{suffix}_np1", "ddp_np1", f"ratio_tau_1{suffix}")
        for ctl in args.controllers:
            compare(f"hvdscale_{ctl}{suffix}_np2", "ddp_np2", f"ratio_tau_2_{ctl}{suffix}")
            efficiency(f"hvdscale_{ctl}{suffix}", f"hvdscale_E_2_{ctl}{suffix}",
                       one=f"hvdscale{suffix}_np1")
        # the headline keys (no controller suffix) are the launcher's default controller's
        for base in ("ratio_tau_2", "hvdscale_E_2"):
            source = f"{base}_{default}{suffix}"
            for key in [k for k in summary if k == source or k.startswith(source + "_rounds")]:
                summary[base + suffix + key[len(source):]] = summary[key]
    print(f"headline keys (ratio_tau_2, hvdscale_E_2) = controller {default}")
    efficiency("ddp", "ddp_E_2")
    for suffix, _ in args.variants:
        compare(f"hvdscale_tf_gloo{suffix}_np1", "keras_fit_np1", f"tf_ratio_tau_1{suffix}")
        compare(f"hvdscale_tf_gloo{suffix}_np2", "tf_tape_gloo_np2", f"tf_ratio_tau_2{suffix}")
        efficiency(f"hvdscale_tf_gloo{suffix}", f"hvdscale_tf_E_2{suffix}")
    summary["median_img_s"] = {k: round(v, 1) for k, v in tau.items()}
    summary["spread"] = spreads
    summary["samples"] = {k: [round(x, 1) for x in v] for k, v in samples.items()}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
