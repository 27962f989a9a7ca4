"""Worker for tests/test_elastic.py, started (and restarted) by horovodrun --elastic.

    python fault_elastic.py DUMP_DIR [hvdscale train arguments ...]

Runs `hvdscale train --elastic` (the one Engine loop in its elastic mode). At start it
writes its process id to DUMP_DIR/pid-<HOROVOD_HOSTNAME> (the test kills a worker by host);
when the engine's run returns each rank writes DUMP_DIR/params-rank<r>.npz with its rank in
the final world.
The exit code is that of `hvdscale train`.
"""
import argparse
import os
import sys
from pathlib import Path

import numpy as np

from hvdscale.errors import UsageError
from hvdscale.commands import train as train_cmd


def main(dump, argv):
    dump = Path(dump)
    dump.mkdir(parents=True, exist_ok=True)
    (dump / f"pid-{os.environ.get('HOROVOD_HOSTNAME', 'local')}").write_text(str(os.getpid()))
    parser = argparse.ArgumentParser()
    train_cmd.add_arguments(parser)
    args = parser.parse_args(["--elastic", *argv])
    original = train_cmd.build_engine

    def build_and_note(a):
        engine = original(a)
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
