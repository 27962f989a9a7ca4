"""The `hvdscale` command: one sub-command per module under hvdscale/commands/.

Each command module exposes ``add_arguments(parser)`` and ``run(args) -> int`` and is
imported only when chosen, so `hvdscale doctor` works even where a framework is broken.
"""
import argparse
import importlib
import sys

from hvdscale.errors import UsageError  # noqa: F401 - re-exported for older callers

COMMANDS = {
    "doctor": "check this node's install: versions, Horovod build, GPUs",
    "train": "train a recipe (YAML under pipelines/) on K Horovod workers",
    "bench": "measure images/s per worker on synthetic data",
    "sweep": "find the critical batch size by a batch-size sweep",
    "data": "make or check image-folder data sets",
    "launch": "build and run the horovodrun / mpirun / srun command for a layout",
    "report": "an HTML page with plots comparing runs on time to accuracy",
}


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
    command = _load(args.command)
    try:
        return int(command.run(args) or 0)
    except KeyboardInterrupt:
        # Ctrl-C before a run's own handler is in place (start-up): one line, no traceback
        print(f"hvdscale {args.command}: interrupted", file=sys.stderr)
        return 130
    except UsageError as err:
        # the library names the setting; the command knows which flag supplied it
        flag = getattr(command, "SETTING_FLAGS", {}).get(getattr(err, "setting", None))
        print(f"hvdscale {args.command}: error: {f'{flag}: ' if flag else ''}{err}",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
