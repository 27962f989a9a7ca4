"""The `hvdscale` command: one sub-command per module under hvdscale/commands/.

Each command module exposes ``add_arguments(parser)`` and ``run(args) -> int`` and is
imported only when chosen, so `hvdscale doctor` works even where a framework is broken.
"""
import argparse
import importlib
import sys

COMMANDS = {
    "doctor": "check this node's install: versions, Horovod build, GPUs",
    "train": "train a recipe (YAML under pipelines/) on K Horovod workers",
    "bench": "measure images/s per worker on synthetic data",
    "sweep": "find the critical batch size by a batch-size sweep",
    "data": "make or check image-folder data sets",
    "launch": "build and run the horovodrun / mpirun / srun command for a layout",
}


class UsageError(Exception):
    """Bad input found before any compute: printed as one line, exit code 2."""


def _load(name):
    return importlib.import_module(f"hvdscale.commands.{name}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="hvdscale", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            _load(name).add_arguments(p)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(_load(args.command).run(args) or 0)
    except UsageError as err:
        print(f"hvdscale {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # `python -m hvdscale.cli` runs this file as __main__; call the importable module's main
    # so that UsageError is the class hvdscale.errors subclasses (else errors escape as 1).
    from hvdscale.cli import main as _main
    sys.exit(_main())
