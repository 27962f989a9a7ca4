"""`hvdscale sweep RECIPE [RECIPE ...] --batch-sizes 32,...,2048 --target ACC`: the critical batch
size, measured with a learning rate tuned per batch size, fresh seeds, a censored fit with a
seed bootstrap and the noise scale probed at the target (docs/study.md). One recipe per
optimizer setting; every training runs in this process through hvdscale.study.inproc.
"""
import datetime
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

from hvdscale.errors import ConfigError


def add_arguments(parser):
    d = _defaults()
    parser.add_argument("recipes", nargs="*", metavar="RECIPE",
                        help="one YAML recipe per optimizer setting (pipelines/sweep_*.yaml)")
    parser.add_argument("--batch-sizes", help="comma list of global batch sizes; the smallest is "
                                              "B_ref")
    parser.add_argument("--target", type=float, help="target held-out accuracy, e.g. 0.82")
    parser.add_argument("--seeds", default=",".join(map(str, d.seeds)),
                        help="fresh seeds of the measurement runs (not the tuning seed)")
    parser.add_argument("--tune-seed", type=int, default=d.tune_seed)
    parser.add_argument("--accuracy-epochs", type=float, default=d.accuracy_epochs,
                        help="fixed epoch budget of the accuracy-vs-batch comparison")
    parser.add_argument("--expected-epochs", type=float, default=d.expected_epochs,
                        help="expected epochs to the target at B_ref (sets its budget)")
    parser.add_argument("--budget-factor", type=float, default=d.budget_factor,
                        help="budget = this x the expected steps")
    parser.add_argument("--max-budget-epochs", type=float, default=d.max_budget_epochs)
    parser.add_argument("--eval-fraction", type=float, default=d.eval_fraction,
                        help="evaluate every this fraction of the fewest possible steps")
    parser.add_argument("--warmup-fraction", type=float, default=d.warmup_fraction)
    parser.add_argument("--lr-factor", type=float, default=d.lr_factor,
                        help="spacing of the learning-rate grid")
    parser.add_argument("--max-extend", type=int, default=d.max_extend,
                        help="extra learning rates when the best is at an edge")
    parser.add_argument("--probe", default=f"{d.probe_count}x{d.probe_micro}",
                        help="frozen-weights probe: COUNTxMICRO micro-batches")
    parser.add_argument("--noise-window", type=float, default=d.noise_window,
                        help="B_noise: median of the probes within +- this fraction of each "
                             "seed's steps to target")
    parser.add_argument("--noise-every", type=int, default=d.noise_every,
                        help="online noise-scale reading every N steps at B_ref (0 = off)")
    parser.add_argument("--eval-examples", type=int, default=d.eval_examples,
                        help="size of the fixed held-out subset")
    parser.add_argument("--train-limit", type=int, default=None,
                        help="use only the first N training images")
    parser.add_argument("--data-root", default=None, help="Fashion-MNIST folder")
    parser.add_argument("--threads", type=int, default=d.threads,
                        help="torch threads per process (1: no OpenMP spin-waits on shared cores)")
    parser.add_argument("--jobs", type=int, default=d.jobs,
                        help="settings trained in parallel processes")
    parser.add_argument("--bootstrap", type=int, default=d.bootstrap)
    parser.add_argument("--out", default="runs/sweep", help="folder for results.json")
    parser.add_argument("--report-dir", default=None,
                        help="where report.md, results.json and the PNGs go (default: --out)")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the report from OUT/results.json without training")


def _defaults():
    from hvdscale.study.sweep import StudySettings
    return StudySettings(recipes=[], batch_sizes=[], target=0.0)


def settings_from_args(args):
    from hvdscale.study.sweep import StudySettings, check, parse_batch_sizes

    if not args.recipes:
        raise ConfigError("give at least one RECIPE (one per optimizer setting)")
    for recipe in args.recipes:
        if not Path(recipe).is_file():
            raise ConfigError(f"recipe not found: {recipe}")
    if args.batch_sizes is None:
        raise ConfigError("--batch-sizes is required, e.g. --batch-sizes 32,128,512,2048")
    if args.target is None:
        raise ConfigError("--target is required, e.g. --target 0.82")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        count, micro = (int(v) for v in args.probe.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--seeds/--probe: expected integers ('1,2,3', '64x32'), got "
                          f"{args.seeds!r} / {args.probe!r}") from None
    for name, value, low in (("--eval-examples", args.eval_examples, 100),
                             ("--noise-every", args.noise_every, 0), ("--probe count", count, 2),
                             ("--probe micro", micro, 1), ("--threads", args.threads, 1),
                             ("--jobs", args.jobs, 1),
                             ("--bootstrap", args.bootstrap, 10), ("--max-extend", args.max_extend, 0)):
        if value < low:
            raise ConfigError(f"{name} must be >= {low}, got {value}")
    for name, value in (("--accuracy-epochs", args.accuracy_epochs),
                        ("--expected-epochs", args.expected_epochs),
                        ("--eval-fraction", args.eval_fraction),
                        ("--max-budget-epochs", args.max_budget_epochs),
                        ("--noise-window", args.noise_window)):
        if not value > 0:
            raise ConfigError(f"{name} must be > 0, got {value}")
    settings = StudySettings(
        recipes=list(args.recipes), batch_sizes=parse_batch_sizes(args.batch_sizes),
        target=args.target, seeds=seeds, tune_seed=args.tune_seed,
        accuracy_epochs=args.accuracy_epochs, expected_epochs=args.expected_epochs,
        budget_factor=args.budget_factor, max_budget_epochs=args.max_budget_epochs,
        eval_fraction=args.eval_fraction, warmup_fraction=args.warmup_fraction,
        lr_factor=args.lr_factor, max_extend=args.max_extend, probe_micro=micro,
        probe_count=count, noise_every=args.noise_every, eval_examples=args.eval_examples,
        train_limit=args.train_limit, data_root=args.data_root, threads=args.threads,
        jobs=args.jobs, noise_window=args.noise_window,
        bootstrap=args.bootstrap)
    check(settings)
    return settings


def machine():
    from hvdscale.hardware import cpu_count, cpu_model
    return (f"{platform.node() or 'host'}: {cpu_count()} CPU cores ({cpu_model() or 'unknown CPU'}), "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}")


def _load():
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "?"


def run(args):
    from hvdscale.study import analysis, report, sweep

    out = Path(args.out)
    report_dir = Path(args.report_dir) if args.report_dir else out
    if args.report_only:
        payload = sweep.load_results(out)
    else:
        settings = settings_from_args(args)
        command = "hvdscale sweep " + " ".join(shlex.quote(a) for a in sys.argv[2:]) \
            if len(sys.argv) > 2 and sys.argv[1] == "sweep" else "hvdscale sweep (API)"
        load_start = _load()
        print(f"hvdscale sweep: load average {load_start}", file=sys.stderr)
        start = time.time()
        study = sweep.Study(settings, out, log=lambda m: print(m, file=sys.stderr, flush=True))
        study.run(jobs=settings.jobs)
        results = [analysis.analyse_setting(study.runs, info, bootstrap=settings.bootstrap,
                                            noise_window=settings.noise_window)
                   for info in study.settings_out.values()]
        payload = {
            "meta": {"command": command, "machine": machine(), "load_start": load_start,
                     "load_end": _load(), "date": datetime.date.today().isoformat(),
                     "wall_s": time.time() - start, "cpu_s": study.cpu_s,
                     "jobs": settings.jobs, "runs": len(study.runs),
                     "data": "Fashion-MNIST (" + (f"first {settings.train_limit}"
                                                   if settings.train_limit else "60000")
                             + " training images)",
                     "eval_examples": settings.eval_examples, "target": settings.target,
                     "accuracy_epochs": settings.accuracy_epochs, "seeds": settings.seeds,
                     "tune_seed": settings.tune_seed},
            "study_settings": sweep.settings_dict(settings),
            "settings_results": results,
            "runs": study.runs,
        }
        out.mkdir(parents=True, exist_ok=True)
        sweep.save_results(out / sweep.RESULTS_FILE, payload)
    if report_dir != out:
        report_dir.mkdir(parents=True, exist_ok=True)
        sweep.save_results(report_dir / sweep.RESULTS_FILE, payload)
    path = report.write_report(payload, report_dir)
    headline = {"report": str(path), "runs": payload["meta"]["runs"],
                "wall_s": round(payload["meta"]["wall_s"], 1)}
    for s in payload["settings_results"]:
        headline[s["setting"]] = {
            "b_crit": s["b_crit"], "b_noise": s["b_noise"],
            "predicted_over_measured": s["predicted_over_measured"], "b_max": s["b_max"],
            "positive_control_batch": s["positive_control_batch"]}
    print(json.dumps(headline))
    return 0
