"""TensorFlow at one worker: hvdscale's engine from several source trees against plain Keras,
in one run.

Each arm runs the `hvdscale_tf` worker of benchmarks/scaling.py *from its own tree* (the same
Engine loop, synthetic Fashion-MNIST-shaped batches, SGD with momentum, batch 64, one thread,
under `horovodrun -np 1 --gloo`, exactly what scaling.py's `hvdscale_tf_gloo_np1` measures),
and the peer is scaling.py's `keras_fit` worker (plain Keras 3 `model.fit`, one process). So an
older commit and the working tree are compared on the same machine in the same minutes:

    .venv/bin/python benchmarks/tf_one_worker.py --repeats 7 --steps 300 \\
        --commit old=6c913ca --commit before=HEAD        # the working tree is always `ours`

--commit NAME=REV extracts REV (git archive) into a temporary directory;
--keras-under-horovodrun adds the Keras peer launched the way ours is (the launcher's share).
The arms run interleaved, the order rotated per round, so drifting load hits every arm alike.
Besides img/s, each run reports the CPU its timed window used (all of the process's threads,
and the main thread alone): on a loaded machine wall time mostly measures the scheduler,
while CPU per step still measures the work a step does. Printed per metric and arm: median,
min..max, spread, the ratio to Keras from the medians and per round (arm and peer run back to
back); load average at start and end; CPU model. The last line is one JSON object.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def extract(rev, name):
    """REV of this repository as a plain directory (no git state is touched)."""
    target = Path(tempfile.mkdtemp(prefix=f"tf-one-worker-{name}-"))
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


class _CpuClock:
    """Stands in for the `time` module inside scaling.py: every perf_counter() it hands out
    (the marks that open and close scaling.py's timed window) also notes the process's and
    the calling thread's CPU time, so a run reports the CPU its timed steps used."""

    def __init__(self):
        self.marks = []

    def perf_counter(self):
        self.marks.append((time.process_time(), time.thread_time()))
        return time.perf_counter()

    def __getattr__(self, name):
        return getattr(time, name)


def worker(tree, side, result, argv):
    """In the launched process: scaling.py's `side` worker from `tree`, plus CPU seconds
    (all threads, and the thread that opened the window) over its timed window."""
    sys.path.insert(0, str(tree / "benchmarks"))
    import scaling
    clock = _CpuClock()
    scaling.time = clock
    worker_args = argparse.Namespace(**argv)
    fn = scaling.WORKERS[side]
    rank, res = fn(worker_args)
    (p0, t0), (p1, t1) = clock.marks[0], clock.marks[-1]
    res.update(cpu_seconds=p1 - p0, main_thread_cpu_seconds=t1 - t0)
    if rank == 0:
        Path(result).write_text(json.dumps(res))


def run_arm(tree, side, args, horovodrun):
    """One run of scaling.py's `side` worker from `tree`, under `horovodrun -np 1 --gloo` or
    as a plain process: {images_per_sec, seconds, cpu_seconds, main_thread_cpu_seconds}."""
    out = Path(tempfile.mkdtemp(prefix="tf-one-worker-")) / "result.json"
    argv = {"batch": args.batch, "steps": args.steps, "warmup": args.warmup, "threads": 1}
    worker = [sys.executable, str(Path(__file__).resolve()), "--worker", side, "--tree",
              str(tree), "--result", str(out), "--worker-args", json.dumps(argv)]
    cmd = [str(BIN / "horovodrun"), "-np", "1", "--gloo", *worker] if horovodrun else worker
    env = dict(os.environ, OMP_NUM_THREADS="1", TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=str(tree), **json.loads(args.env or "{}"))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 or not out.is_file():
        sys.exit(f"tf_one_worker.py: {side} from {tree} failed ({proc.returncode}):\n"
                 f"{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def cpu_model():
    from hvdscale.hardware import cpu_model as model
    return model() or platform.processor() or "unknown"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commit", action="append", default=[], metavar="NAME=REV",
                        help="another arm: hvdscale at git revision REV")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=60, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--env", default=None, help="JSON of extra environment for every arm")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--tree", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--worker-args", help=argparse.SUPPRESS)
    parser.add_argument("--keras-under-horovodrun", action="store_true",
                        help="one more arm: the Keras peer launched like ours (horovodrun -np 1 "
                             "--gloo), to tell the launcher's cost from the engine's")
    args = parser.parse_args()
    if args.worker:
        return worker(Path(args.tree), args.worker, args.result, json.loads(args.worker_args))

    # (name, tree, scaling.py worker, under horovodrun)
    arms = [("keras_fit", REPO, "keras_fit", False), ("ours", REPO, "hvdscale_tf", True)]
    if args.keras_under_horovodrun:
        arms.append(("keras_hvdrun", REPO, "keras_fit", True))
    for item in args.commit:
        name, sep, rev = item.partition("=")
        if not sep or not name or not rev:
            parser.error(f"--commit {item!r}: expected NAME=REV")
        arms.append((name, extract(rev, name), "hvdscale_tf", True))
    runs = {arm[0]: [] for arm in arms}
    load_start, t_start = os.getloadavg(), time.time()
    for r in range(args.repeats):
        order = arms[r % len(arms):] + arms[:r % len(arms)]
        for name, tree, side, horovodrun in order:
            runs[name].append(run_arm(tree, side, args, horovodrun))
            print(f"round {r + 1}/{args.repeats} {name:<12} "
                  f"{runs[name][-1]['images_per_sec']:8.1f} img/s "
                  f"{1e3 * runs[name][-1]['cpu_seconds'] / args.steps:7.2f} CPU ms/step  "
                  f"load {[round(x, 2) for x in os.getloadavg()]}", file=sys.stderr)
    load_end = os.getloadavg()
    report(args, runs, load_start, load_end, time.time() - t_start)


def report(args, runs, load_start, load_end, seconds):
    """Per arm: img/s and CPU ms per step (all threads; the main thread), median, min..max,
    and against Keras from the medians and per round."""
    per_step = 1e3 / args.steps
    metrics = {"img_s": lambda run: run["images_per_sec"],
               "cpu_ms_per_step": lambda run: run["cpu_seconds"] * per_step,
               "main_thread_cpu_ms_per_step": lambda run: run["main_thread_cpu_seconds"]
               * per_step}
    print(f"TF one worker, batch {args.batch}, {args.steps} timed steps, 1 thread, "
          f"{args.repeats} interleaved rounds; {cpu_model()}, {os.cpu_count()} cores; "
          f"load {[round(x, 2) for x in load_start]} -> {[round(x, 2) for x in load_end]}, "
          f"{seconds / 60:.1f} min")
    summary = {"steps": args.steps, "repeats": args.repeats, "cpu": cpu_model(),
               "load_start": [round(x, 2) for x in load_start],
               "load_end": [round(x, 2) for x in load_end], "arms": {}}
    for metric, get in metrics.items():
        print(f"\n| arm | {metric} median | min | max | spread | / keras (medians) | "
              f"/ keras per round: median (min..max) |")
        print("|---|---|---|---|---|---|---|")
        peer = [get(run) for run in runs["keras_fit"]]
        for name, arm_runs in runs.items():
            values = [get(run) for run in arm_runs]
            med = statistics.median(values)
            rounds = [a / b for a, b in zip(values, peer)]
            entry = {"median": round(med, 3), "min": round(min(values), 3),
                     "max": round(max(values), 3),
                     "spread": round((max(values) - min(values)) / med, 3),
                     "over_keras": round(med / statistics.median(peer), 4),
                     "over_keras_rounds": [round(x, 4) for x in rounds],
                     "samples": [round(x, 3) for x in values]}
            summary["arms"].setdefault(name, {})[metric] = entry
            print(f"| {name} | {med:.2f} | {min(values):.2f} | {max(values):.2f} | "
                  f"{entry['spread']:.1%} | {entry['over_keras']:.3f} | "
                  f"{statistics.median(rounds):.3f} ({min(rounds):.3f}..{max(rounds):.3f}) |")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
