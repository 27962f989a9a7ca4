"""Worker for the fault tests (tests/test_faults*.py): `hvdscale train` with a few extras.

    python fault_train.py DUMP_DIR [hvdscale train arguments ...]

Before training, each rank writes its process id to DUMP_DIR/pid-rank<r> (so a test can
kill -9 one rank from outside) and its network namespace to DUMP_DIR/netns-rank<r>; after
training (when the engine's run returned: finished, paused or preempted) it writes its
trainable parameters to DUMP_DIR/params-rank<r>.npz. The exit code and stderr are those of
`hvdscale train`.
"""
import argparse
import os
import sys
from pathlib import Path

import numpy as np

from hvdscale.cli import UsageError
from hvdscale.commands import train as train_cmd


def main(dump, argv):
    dump = Path(dump)
    dump.mkdir(parents=True, exist_ok=True)
    parser = argparse.ArgumentParser()
    train_cmd.add_arguments(parser)
    args = parser.parse_args(argv)
    original = train_cmd.build_engine

    def build_and_note(a):
        engine = original(a)
        rank = engine.comm.rank
        (dump / f"pid-rank{rank}").write_text(str(os.getpid()))
        # which network namespace ("host") this rank runs in, for the multi-host test
        (dump / f"netns-rank{rank}").write_text(os.readlink("/proc/self/ns/net"))
        run = engine.run

        def run_and_dump():      # before `hvdscale train` exits (at once after a preemption)
            result = run()
            params = engine.backend.parameters()
            np.savez(dump / f"params-rank{engine.comm.rank}.npz",
                     **{f"p{i:04d}": params[k] for i, k in enumerate(sorted(params))})
            return result
        engine.run = run_and_dump
        return engine

    train_cmd.build_engine = build_and_note
    try:
        code = train_cmd.run(args)
    except UsageError as err:
        print(f"hvdscale train: error: {err}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
