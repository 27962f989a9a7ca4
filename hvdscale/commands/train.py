"""`hvdscale train RECIPE [--set key=value ...] [--out DIR] [--resume] [--tau-ref X]`.

Thin: read the environment and arguments, validate the recipe (before any framework import),
start Horovod, build data and the framework trainer, and hand over to the engine.
"""
import os
import sys
from pathlib import Path

from hvdscale.config import DEFAULT_RECIPE, load_config
from hvdscale.hardware import cpu_count, cpu_model
from hvdscale.errors import ConfigError, NonFiniteLossError

# Errors about these settings came from these flags (hvdscale.cli prefixes the flag).
SETTING_FLAGS = {"checkpoint": "--resume", "overrides": "--set", "out": "--out"}

# Variables by which MPI, Horovod's launchers and PMI tell a process how many ranks there are.
WORLD_SIZE_VARS = ("HOROVOD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE")
RANK_VARS = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")


def add_arguments(parser):
    import argparse
    from hvdscale.registry import help_text
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = help_text()
    parser.add_argument("recipe", nargs="?", default=str(DEFAULT_RECIPE),
                        help="YAML recipe (default: pipelines/fashion_mnist_lamb.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a recipe value, e.g. "
                        "--set framework=tensorflow --set optimizer.base_lr=0.004")
    parser.add_argument("--out", default=None,
                        help="output directory (default: runs/<recipe>-<framework>-np<K>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest checkpoint in OUT/checkpoints")
    parser.add_argument("--overwrite", action="store_true",
                        help="start a new run in an OUT that holds an earlier one: the "
                             "earlier run is moved into OUT/previous-<n>/, never deleted")
    parser.add_argument("--tau-ref", default=None, metavar="IMG_S|FILE",
                        help="one worker's images/s (number, or the JSON file written by "
                             "`hvdscale bench --save-ref`) for scaling efficiency")
    parser.add_argument("--stop-after-steps", type=int, default=None, metavar="N",
                        help="end this session after N steps with a checkpoint, as a "
                             "preempted job would (continue with --resume)")
    parser.add_argument("--no-horovod", action="store_true",
                        help="run as one plain process without initialising Horovod")
    parser.add_argument("--elastic", action="store_true",
                        help="elastic training: carry on when workers leave or join; "
                             "launch with horovodrun --min-np/--max-np --host-discovery-script "
                             "(state committed every elastic.commit_every steps)")


def launched_world_size(environ=None):
    environ = os.environ if environ is None else environ
    for var in WORLD_SIZE_VARS:
        if environ.get(var, "").isdigit():
            return int(environ[var])
    return 1


def launched_rank(environ=None):
    """This process's rank as the launcher set it (before Horovod starts), or None."""
    environ = os.environ if environ is None else environ
    for var in RANK_VARS:
        if environ.get(var, "").isdigit():
            return int(environ[var])
    return 0 if launched_world_size(environ) == 1 else None


def read_tau_ref(value):
    """A number, or a JSON file with `tau_ref` (what `hvdscale bench --save-ref` writes)."""
    if value is None:
        return None
    try:
        tau = float(value)
    except ValueError:
        import json
        path = Path(value)
        if not path.is_file():
            raise ConfigError(f"--tau-ref {value!r} is neither a number nor a file") from None
        try:
            tau = float(json.loads(path.read_text())["tau_ref"])
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"--tau-ref {path}: no numeric 'tau_ref' in it ({err})") from None
    if not tau > 0:
        raise ConfigError(f"--tau-ref must be a positive images/s figure, got {tau}")
    return tau


def hardware_name(device, workers):
    if device != "cpu":
        return f"{workers}x {device}"
    return f"{cpu_model() or 'cpu'} ({cpu_count()} cores), {workers} worker{'s' * (workers > 1)}"


def check_supported(cfg):
    """Recipe features that validate but that this engine does not run yet."""
    if cfg.faults.nonfinite == "skip" and cfg.horovod.adasum:
        raise ConfigError("faults.nonfinite: skip cannot be combined with horovod.adasum "
                          "(Adasum has no separate synchronize step to check before)")


def make_trainer(cfg, comm, threads, model_fn=None):
    from hvdscale.registry import BACKENDS
    return BACKENDS.get(cfg.framework).build_trainer(cfg, comm, threads, model_fn=model_fn)


def threads_warning(threads, workers_here, cores):
    """One line when train.threads asks for more threads than this machine has cores, or
    None. (Threads beyond the cores take turns: 1000 threads on 2 cores made each step 38x
    slower.)"""
    if threads is None or threads * workers_here <= cores:
        return None
    return (f"train.threads {threads} x {workers_here} worker(s) on this machine is more than "
            f"its {cores} cores: the threads will take turns and every step slows down; "
            f"leave train.threads unset (cores // workers = {max(1, cores // workers_here)})")


def start_workers(cfg, horovod=True, agree=None):
    """Horovod, threads per worker and the framework trainer: what train and bench share.
    agree(comm): run once Horovod is up, before the trainer is built (train: the verdict on
    the run directory). Returns (comm, trainer)."""
    from hvdscale.comm import init_comm
    from hvdscale.data import check_data
    check_data(cfg.data)
    launched = launched_world_size()
    comm = init_comm(cfg.framework, horovod=horovod)
    if launched > 1 and comm.size != launched:
        raise ConfigError(f"launched as {launched} processes but Horovod for {cfg.framework} "
                          f"is {'disabled' if not horovod else 'not available'} here")
    if agree is not None:
        agree(comm)
    threads = cfg.train.threads or max(1, cpu_count() // comm.local_size)
    warning = threads_warning(cfg.train.threads, comm.local_size, cpu_count())
    if warning and comm.is_root:
        print(f"hvdscale: warning: {warning}", file=sys.stderr, flush=True)
    return comm, make_trainer(cfg, comm, threads)


def build_engine(args):
    """Everything `hvdscale train` does before the loop: returns the ready Engine."""
    cfg = load_config(args.recipe, args.overrides)
    check_supported(cfg)
    tau_ref = read_tau_ref(args.tau_ref)
    if args.stop_after_steps is not None and args.stop_after_steps < 1:
        raise ConfigError(f"--stop-after-steps must be >= 1, got {args.stop_after_steps}")
    if args.elastic:
        from hvdscale.engine.elastic import check_elastic
        check_elastic(cfg, stop_after_steps=args.stop_after_steps, no_horovod=args.no_horovod)
    requeue = requeue_exit_code()
    out = output_dir(args, cfg)
    owner = RunDirOwner(out, args, cfg)     # before any framework import or Horovod
    try:
        engine = _engine(args, cfg, out, owner, tau_ref, requeue)
    except BaseException:
        owner.release()       # a job that cannot start hands the directory back at once
        raise
    engine.owner = owner        # holds the run directory's lock for the life of the job
    return engine


def _engine(args, cfg, out, owner, tau_ref, requeue):
    from hvdscale.engine import Engine
    from hvdscale.data import build_sources, check_sources
    from hvdscale.registry import build_callbacks
    callbacks = build_callbacks(cfg)
    comm, trainer = start_workers(cfg, horovod=not args.no_horovod, agree=owner.agree)
    train_source, eval_source = build_sources(cfg, comm.rank, comm.size)
    if not args.elastic:    # elastic: no collective before Horovod's first sync
        check_sources(comm, cfg.data.kind, train_source, eval_source)
    return Engine(cfg, comm, trainer, train_source, eval_source, out, resume=args.resume,
                  tau_ref=tau_ref, stop_after=args.stop_after_steps,
                  requeue_exit_code=requeue, elastic=args.elastic, sources=build_sources,
                  callbacks=callbacks,
                  hardware=hardware_name(trainer.device_description, comm.size))


def output_dir(args, cfg):
    """--out, or runs/<recipe>-<framework>-np<K> (K from the launcher: Horovod is not up)."""
    if args.out:
        return Path(args.out)
    kind = "elastic" if args.elastic else f"np{launched_world_size()}"
    return Path("runs") / f"{cfg.name}-{cfg.framework}-{kind}"


class RunDirOwner:
    """Claims the run directory (hvdscale/engine/rundir.py) on rank 0 before the frameworks
    start, and makes every rank agree on the verdict: a lone process refuses at once (under
    a second); in a multi-process job rank 0 keeps its refusal until Horovod is up and then
    broadcasts it, so that every rank exits with the same line and none waits in a
    collective for a rank that has gone."""

    def __init__(self, out, args, cfg):
        from hvdscale.engine import rundir
        self.out, self.lock, self.refusal = out, None, None
        self._claim = lambda: rundir.claim(out, resume=args.resume, overwrite=args.overwrite,
                                           tensorboard=cfg.log.tensorboard)
        self.elastic, self._resume, self._recipe = args.elastic, args.resume, cfg.to_dict()
        if self.elastic:
            # Workers of an elastic job come and go, and one that joins a running job may be
            # given rank 0 there: it would find the job's own lock and files. Only the checks
            # that write nothing apply (every worker; no collective before the elastic sync).
            rundir.check_usable(out, cfg.log.tensorboard)
            return
        if launched_rank() == 0:
            self._try()
            if self.refusal is not None and launched_world_size() == 1:
                raise self.refusal       # alone: at once

    def _try(self):
        try:
            self.lock = self._claim()
            if self._resume:
                self._check_resume()
        except ConfigError as err:
            self.refusal = err

    def _check_resume(self):
        """A setting the newest checkpoint cannot honour is refused here, before the
        frameworks start (the engine checks again and applies the rest after loading)."""
        from hvdscale.engine.checkpoint import CheckpointStore
        from hvdscale.engine.resume import check_resume
        try:
            hit = CheckpointStore(self.out / "checkpoints").latest()
        except (ConfigError, OSError):
            return           # the engine refuses it with the file's name
        if hit is not None:
            check_resume(hit[0], self._recipe)

    def release(self):
        """Hand the directory back (the end of a job run in-process, e.g. by tests or tools
        that call hvdscale.cli.main more than once; a process that ends releases it anyway)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def agree(self, comm):
        if self.elastic:
            return
        if comm.is_root and self.lock is None and self.refusal is None:
            self._try()            # the launcher did not say which rank this is
        elif not comm.is_root and self.lock is not None:
            self.lock.release()    # (idem) another process is rank 0
            self.lock = None
        refusal = self.refusal
        verdict = comm.broadcast_object(None if refusal is None else
                                        (str(refusal), refusal.setting))
        if verdict is not None:
            raise ConfigError(verdict[0], setting=verdict[1])


REQUEUE_VAR = "HVDSCALE_REQUEUE_EXIT_CODE"
CHECKPOINT_EXIT_CODE = 6     # a checkpoint could not be written (checkpoint.on_error: stop)


def requeue_exit_code(environ=None):
    """HVDSCALE_REQUEUE_EXIT_CODE (set by a requeueing batch script), or None."""
    environ = os.environ if environ is None else environ
    value = environ.get(REQUEUE_VAR, "").strip()
    if not value:
        return None
    if not value.isdigit() or not 1 <= int(value) <= 255:
        raise ConfigError(f"{REQUEUE_VAR}={value!r}: must be an exit code in 1..255")
    return int(value)


def run(args):
    engine = build_engine(args)
    try:
        return _run(engine)
    finally:
        engine.owner.release()


def _run(engine):
    from hvdscale.engine.faults import lost_worker_message, worker_lost
    from hvdscale.engine.checkpointing import CheckpointError
    try:
        result = engine.run()
    except NonFiniteLossError as err:
        print(f"hvdscale train: error: rank {engine.comm.rank}: {err}", file=sys.stderr)
        return 3
    except CheckpointError as err:
        print(f"hvdscale train: error: rank {engine.comm.rank}: {err}", file=sys.stderr,
              flush=True)
        return CHECKPOINT_EXIT_CODE
    except Exception as err:  # noqa: BLE001 - only Horovod's peer-lost shutdown is handled
        if not worker_lost(err):
            raise
        print(f"hvdscale train: error: rank {engine.comm.rank}: "
              f"{lost_worker_message(engine.step, engine.checkpoints.last_step)}",
              file=sys.stderr, flush=True)
        return 4
    if engine.comm.is_root:
        print(f"metrics: {engine.out / 'metrics.jsonl'}")
    if result.preempted is not None:
        leave_now(engine.comm, result.exit_code)
    return result.exit_code


def leave_now(comm, code):
    """Exit at once after a preemption checkpoint. The launcher kills the ranks soon after
    its signal (horovodrun: SIGKILL 5 s after SIGTERM), and the interpreter's own teardown
    of torch/TensorFlow took 2-9 s on a busy 2-core host; the checkpoint is already on disk
    (fsynced), logs are closed, and Horovod is shut down in agreement with the other ranks."""
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        comm.shutdown()
    finally:
        os._exit(code)
