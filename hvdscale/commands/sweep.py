"""`hvdscale sweep RECIPE [RECIPE ...] --batch-sizes 64,...,8192 --target ACC`: the large-batch
study of docs/study.md -- test accuracy at a fixed epoch budget versus global batch for each
optimizer under the rule-scaled and the tuned protocol, steps to target, B_crit and the noise
scale. Every run is one Engine run in this process (hvdscale.study.engine_run). `--plan` times
a short pilot and prints the number of runs and the estimated wall time instead of running.
"""
import datetime
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

from hvdscale.errors import ConfigError


def add_arguments(parser):
    d = _defaults()
    parser.add_argument("recipes", nargs="*", metavar="RECIPE",
                        help="one YAML recipe per optimizer (pipelines/sweep_*.yaml)")
    parser.add_argument("--batch-sizes", help="comma list of global batch sizes; the smallest is "
                                              "B_ref")
    parser.add_argument("--target", type=float,
                        help="validation accuracy whose crossing gives the steps to target")
    parser.add_argument("--epochs", type=float, default=d.epochs, help="epoch budget of every run")
    parser.add_argument("--seeds", default=",".join(map(str, d.seeds)),
                        help="fresh seeds of the measurement runs (not the tuning seed)")
    parser.add_argument("--tune-seed", type=int, default=d.tune_seed)
    parser.add_argument("--lr-factors", default=",".join(map(str, d.lr_factors)),
                        help="tuned protocol: these multiples of the rule's lr (>= 4)")
    parser.add_argument("--ref-lr-factors", default=",".join(map(str, d.ref_lr_factors)),
                        help="multiples of the recipe's lr tried at B_ref to settle lr_ref")
    parser.add_argument("--lr-extend", type=int, default=d.lr_extend,
                        help="grow an lr grid by up to this many runs (half the lowest, twice "
                             "the highest) while its best lr is at an edge")
    parser.add_argument("--warmup-fraction", type=float, default=d.warmup_fraction,
                        help="linear warm-up over this fraction of the budget")
    parser.add_argument("--evals-per-run", type=int, default=d.evals_per_run)
    parser.add_argument("--validation", type=int, default=d.validation,
                        help="training images held out as the validation split")
    parser.add_argument("--probe", default=f"{d.probe_count}x{d.probe_micro}",
                        help="frozen-weights probe: COUNTxMICRO micro-batches")
    parser.add_argument("--noise-window", type=float, default=d.noise_window,
                        help="B_noise: median of the probes within +- this fraction of each "
                             "seed's steps to target")
    parser.add_argument("--snapshots", type=int, default=d.snapshots_per_run,
                        help="weight snapshots along each B_ref measurement run")
    parser.add_argument("--noise-every", type=int, default=d.noise_every,
                        help="online noise-scale EMA every N steps on the B_ref runs (0 = off)")
    parser.add_argument("--train-limit", type=int, default=None,
                        help="use only the first N images of the training split")
    parser.add_argument("--test-limit", type=int, default=None)
    parser.add_argument("--data-root", default=None, help="Fashion-MNIST folder")
    parser.add_argument("--threads", type=int, default=d.threads,
                        help="torch threads per process (1: no OpenMP spin-waits on shared cores)")
    parser.add_argument("--jobs", type=int, default=d.jobs,
                        help="optimizers trained in parallel processes")
    parser.add_argument("--bootstrap", type=int, default=d.bootstrap)
    parser.add_argument("--out", default="runs/sweep", help="folder for results.json")
    parser.add_argument("--report-dir", default=None,
                        help="where report.md, results.json and the PNGs go (default: --out)")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the report from OUT/results.json without training")
    parser.add_argument("--plan", action="store_true",
                        help="time a short pilot per batch size and print the number of runs "
                             "and the estimated wall time; train nothing else")


def _defaults():
    from hvdscale.study.sweep import StudySettings
    return StudySettings(recipes=[], batch_sizes=[], target=0.0)


def _floats(name, text):
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{name}: expected comma-separated numbers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise ConfigError(f"{name}: expected positive numbers, got {text!r}")
    return values


def settings_from_args(args):
    from hvdscale.study.sweep import StudySettings, check, parse_batch_sizes

    if not args.recipes:
        raise ConfigError("give at least one RECIPE (one per optimizer)")
    for recipe in args.recipes:
        if not Path(recipe).is_file():
            raise ConfigError(f"recipe not found: {recipe}")
    if args.batch_sizes is None:
        raise ConfigError("--batch-sizes is required, e.g. --batch-sizes 64,256,1024,4096")
    if args.target is None:
        raise ConfigError("--target is required, e.g. --target 0.85")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        count, micro = (int(v) for v in args.probe.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--seeds/--probe: expected integers ('1,2,3', '64x32'), got "
                          f"{args.seeds!r} / {args.probe!r}") from None
    for name, value, low in (("--validation", args.validation, 100),
                             ("--evals-per-run", args.evals_per_run, 2),
                             ("--probe count", count, 2), ("--probe micro", micro, 1),
                             ("--snapshots", args.snapshots, 2), ("--threads", args.threads, 1),
                             ("--noise-every", args.noise_every, 0),
                             ("--jobs", args.jobs, 1), ("--bootstrap", args.bootstrap, 10)):
        if value < low:
            raise ConfigError(f"{name} must be >= {low}, got {value}")
    for name, value in (("--epochs", args.epochs), ("--noise-window", args.noise_window)):
        if not value > 0:
            raise ConfigError(f"{name} must be > 0, got {value}")
    settings = StudySettings(
        recipes=list(args.recipes), batch_sizes=parse_batch_sizes(args.batch_sizes),
        target=args.target, epochs=args.epochs, seeds=seeds, tune_seed=args.tune_seed,
        lr_factors=_floats("--lr-factors", args.lr_factors),
        ref_lr_factors=_floats("--ref-lr-factors", args.ref_lr_factors),
        lr_extend=args.lr_extend,
        warmup_fraction=args.warmup_fraction, evals_per_run=args.evals_per_run,
        validation=args.validation, probe_micro=micro, probe_count=count,
        snapshots_per_run=args.snapshots, noise_window=args.noise_window,
        noise_every=args.noise_every,
        train_limit=args.train_limit, test_limit=args.test_limit, data_root=args.data_root,
        threads=args.threads, jobs=args.jobs, bootstrap=args.bootstrap)
    check(settings)
    return settings


def _load():
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "?"


def _command():
    if len(sys.argv) > 2 and sys.argv[1] == "sweep":
        return "hvdscale sweep " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    return "hvdscale sweep (API)"


def show_plan(settings):
    """Time a pilot (a few steps per batch size, first recipe) and print the plan's size."""
    from hvdscale.study import sweep, timing

    load_start = _load()
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="hvdscale-sweep-plan-") as tmp:
        study = sweep.Study(settings, tmp, log=lambda m: None)
        n_train = len(study.data[0])
        costs = timing.measure_costs(study, settings.recipes[0])
    runs = [r for recipe in settings.recipes
            for r in sweep.plan(settings, sweep.read_setting(recipe), n_train)]
    est = timing.estimate(runs, costs, settings.evals_per_run, settings.jobs,
                          probes_per_setting=sweep.probes_planned(settings))
    counts = {}
    for r in runs:
        key = f"{r['setting']} {r['protocol']}/{r['role']}" + \
            (" (grid extensions, at most)" if r.get("extension") else "")
        counts[key] = counts.get(key, 0) + 1
    # an upper bound: grid extensions are counted as if every grid ended at an edge
    report = {"command": _command(), "runs": est["runs"], "runs_by_kind": counts,
              "cpu_s": round(est["cpu_s"]), "wall_s_estimate": round(est["wall_s"]),
              "processes": est["processes"],
              "per_step_s": {b: round(c["step_s"], 5) for b, c in costs.items()},
              "per_eval_s": {b: round(c["eval_s"], 4) for b, c in costs.items()},
              "per_run_rest_s": {b: round(c["run_s"], 3) for b, c in costs.items()},
              "per_probe_s": round(next(iter(costs.values()))["probe_s"], 3),
              "pilot_s": round(time.time() - start, 1), "load_start": load_start,
              "load_end": _load(), "cores": os.cpu_count()}
    print(json.dumps(report))
    return 0


def run(args):
    from hvdscale.study import analysis, report, sweep

    out = Path(args.out)
    report_dir = Path(args.report_dir) if args.report_dir else out
    if args.report_only:
        payload = sweep.load_results(out)
    else:
        settings = settings_from_args(args)
        if args.plan:
            return show_plan(settings)
        load_start = _load()
        print(f"hvdscale sweep: load average {load_start}", file=sys.stderr)
        start = time.time()
        study = sweep.Study(settings, out, log=lambda m: print(m, file=sys.stderr, flush=True))
        train, val, test = study.data
        model = sweep.read_setting(settings.recipes[0]).model
        study.run(jobs=settings.jobs)
        infos = list(study.settings_out.values())
        payload = {
            "design": {"command": _command(), "model": model, "train": len(train),
                       "validation": len(val), "test": len(test), "epochs": settings.epochs,
                       "batch_sizes": settings.batch_sizes, "seeds": settings.seeds,
                       "tune_seed": settings.tune_seed, "target": settings.target,
                       "warmup_fraction": settings.warmup_fraction,
                       "wall_s": time.time() - start, "cpu_s": study.cpu_s,
                       "load": {"start": load_start, "end": _load()},
                       "date": datetime.date.today().isoformat(), "jobs": settings.jobs},
            **analysis.analyse_study(study.runs, infos, bootstrap=settings.bootstrap,
                                     noise_window=settings.noise_window),
            "optimizers": infos,
            "study_settings": sweep.settings_dict(settings),
            "runs": study.runs,
        }
        out.mkdir(parents=True, exist_ok=True)
        sweep.save_results(out / sweep.RESULTS_FILE, payload)
    if report_dir != out:
        report_dir.mkdir(parents=True, exist_ok=True)
        sweep.save_results(report_dir / sweep.RESULTS_FILE, payload)
    path = report.write_report(payload, report_dir)
    headline = {"report": str(path), "runs": len(payload["runs"]),
                "wall_s": round(payload["design"]["wall_s"], 1),
                "positive_control": payload["positive_control"]}
    for opt, by in payload["summary"].items():
        headline[opt] = {p: {"b_max": by[p]["b_max"]} for p in by}
        headline[opt]["b_crit"] = payload["noise"][opt]["b_crit"]
        headline[opt]["b_noise"] = payload["noise"][opt]["b_noise"]
    print(json.dumps(headline))
    return 0
