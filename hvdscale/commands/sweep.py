"""`hvdscale sweep RECIPE [RECIPE ...] --batch-sizes 64,...,16384 --target ACC`: the critical
batch size, measured. One recipe per optimizer setting (one curve each); every global batch size
is trained by `hvdscale train` in its own process, then report.md and PNG plots are written.
"""
import datetime
import json
import platform
import shlex
import sys
from pathlib import Path

from hvdscale.errors import ConfigError


def add_arguments(parser):
    parser.add_argument("recipes", nargs="*", metavar="RECIPE",
                        help="one YAML recipe per optimizer setting (e.g. pipelines/sweep_*.yaml)")
    parser.add_argument("--batch-sizes", help="comma list of global batch sizes")
    parser.add_argument("--target", type=float, help="target test accuracy, e.g. 0.85")
    parser.add_argument("--seeds", default="42", help="comma list of seeds (repeats per point)")
    parser.add_argument("--np", type=int, default=1, dest="workers",
                        help="Horovod workers per run (horovodrun -np K when > 1)")
    parser.add_argument("--out", default="runs/sweep", help="folder for the runs and results.json")
    parser.add_argument("--report-dir", default=None,
                        help="where report.md and the PNGs go (default: --out)")
    parser.add_argument("--epochs", type=float, default=3.0,
                        help="fixed epoch budget: every run trains at least this long, and the "
                             "accuracy plot reads accuracy at this budget")
    parser.add_argument("--min-steps", type=int, default=60,
                        help="step floor of a run's budget (for the large batches)")
    parser.add_argument("--max-per-worker", type=int, default=512,
                        help="largest micro-batch per worker; beyond it, gradient accumulation")
    parser.add_argument("--eval-examples", type=int, default=4096,
                        help="evaluate every this many training examples (resolution of steps "
                             "to target)")
    parser.add_argument("--noise-every", type=int, default=10,
                        help="online noise scale every N steps (0 = off)")
    parser.add_argument("--noise-ema", type=float, default=0.95)
    parser.add_argument("--train-limit", type=int, default=None,
                        help="use only the first N training images")
    parser.add_argument("--set", action="append", default=[], dest="extra_sets", metavar="KEY=VALUE",
                        help="extra recipe override applied to every run")
    parser.add_argument("--run-timeout", type=int, default=1200,
                        help="seconds per run (runs in their own process only)")
    parser.add_argument("--subprocess", action="store_true",
                        help="run each single-worker training as its own `hvdscale train` "
                             "process (always so with --np > 1)")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the report from OUT/results.json without training")
    parser.add_argument("--no-progress", action="store_true")


def _settings(args):
    from hvdscale.study.sweep import SweepSettings, parse_batch_sizes

    if not args.recipes:
        raise ConfigError("give at least one RECIPE (one per optimizer setting)")
    for recipe in args.recipes:
        if not Path(recipe).is_file():
            raise ConfigError(f"recipe not found: {recipe}")
    if args.batch_sizes is None:
        raise ConfigError("--batch-sizes is required, e.g. --batch-sizes 64,256,1024,4096")
    if args.target is None:
        raise ConfigError("--target is required, e.g. --target 0.85")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds: expected comma-separated integers, got {args.seeds!r}") \
            from None
    for name, value, low in (("--np", args.workers, 1), ("--min-steps", args.min_steps, 1),
                             ("--max-per-worker", args.max_per_worker, 1),
                             ("--eval-examples", args.eval_examples, 1),
                             ("--noise-every", args.noise_every, 0)):
        if value < low:
            raise ConfigError(f"{name} must be >= {low}, got {value}")
    if not args.epochs > 0:
        raise ConfigError(f"--epochs must be > 0, got {args.epochs}")
    if not 0 <= args.noise_ema < 1:
        raise ConfigError(f"--noise-ema must be in [0, 1), got {args.noise_ema}")
    return SweepSettings(
        recipes=list(args.recipes), batch_sizes=parse_batch_sizes(args.batch_sizes),
        target=args.target, seeds=seeds or [42], workers=args.workers,
        max_per_worker=args.max_per_worker, epochs=args.epochs, min_steps=args.min_steps,
        eval_examples=args.eval_examples, noise_every=args.noise_every, noise_ema=args.noise_ema,
        train_limit=args.train_limit, extra_sets=list(args.extra_sets),
        run_timeout=args.run_timeout, in_process=not args.subprocess)


def machine():
    from hvdscale.hardware import cpu_count, cpu_model
    return (f"{platform.node() or 'host'}: {cpu_count()} CPU cores ({cpu_model() or 'unknown CPU'}), "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}")


def run(args):
    from hvdscale.study import report, sweep

    out = Path(args.out)
    if args.report_only:
        stored = sweep.load_results(out)
        settings = sweep.SweepSettings(**stored["settings"])
        records = stored["runs"]
        command = stored.get("command")
    else:
        settings = _settings(args)
        sweep.plan(settings, out)        # validates the whole plan before the first run
        command = "hvdscale sweep " + " ".join(shlex.quote(a) for a in sys.argv[2:]) \
            if len(sys.argv) > 2 else "hvdscale sweep"
        records = sweep.run_sweep(settings, out, progress=not args.no_progress)
        stored = json.loads((out / sweep.RESULTS_FILE).read_text())
        stored["command"] = command
        stored["machine"] = machine()
        (out / sweep.RESULTS_FILE).write_text(json.dumps(stored, indent=1))
    meta = {
        "title": "batch-size sweep, " + ", ".join(dict.fromkeys(r["setting"] for r in records)),
        "command": command or "?",
        "machine": stored.get("machine") or machine(),
        "date": datetime.date.today().isoformat(),
        "data": f"{_data_note(settings)}",
        "target": settings.target,
        "epoch_budget": settings.epochs,
    }
    report_dir = Path(args.report_dir) if args.report_dir else out
    path = report.write_report(records, report_dir, meta)
    analysis = report.analyse(records)
    _print_table(analysis)
    print(f"report: {path}")
    headline = {"report": str(path), "runs": len(records),
                "failed": sum(1 for r in records if r.get("status") != "ok")}
    for setting, a in analysis.items():
        m = a["measured"]
        headline[setting] = {"b_crit_measured": m.b_crit, "status": m.status,
                             "b_simple_predicted": a["predicted"]}
    print(json.dumps(headline))
    return 0 if headline["failed"] == 0 else 1


def _data_note(settings):
    limit = f"first {settings.train_limit} training images" if settings.train_limit else \
        "60000 training images"
    return f"Fashion-MNIST ({limit}, 10000 test images)"


def _print_table(analysis):
    header = f"{'setting':<18}{'batch':>7}{'steps':>9}{'S/S_perf':>10}{'time/step':>11}{'best acc':>10}"
    print(header)
    print("-" * len(header))
    for setting, a in analysis.items():
        for row in a["rows"]:
            steps = f"{row['steps_to_target']:.0f}" if row["reached"] else f">{row['steps_run']}"
            ratio = a["measured"].excess.get(row["batch_size"])
            tps = f"{row['time_per_step_s']:.3f}s" if row["time_per_step_s"] else "-"
            acc = f"{row['best_accuracy']:.4f}" if row["best_accuracy"] is not None else "-"
            print(f"{setting:<18}{row['batch_size']:>7}{steps:>9}"
                  f"{(f'{ratio:.2f}' if ratio else '-'):>10}{tps:>11}{acc:>10}")
        print(f"{setting}: {a['measured'].describe()}; B_simple predicted: "
              f"{'-' if a['predicted'] is None else format(a['predicted'], '.0f')}")
