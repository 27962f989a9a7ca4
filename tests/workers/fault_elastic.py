"""Worker for tests/test_elastic.py, started (and restarted) by horovodrun --elastic.

    python fault_elastic.py DUMP_DIR [hvdscale train --elastic arguments ...]

At start it writes its process id to DUMP_DIR/pid-<HOROVOD_HOSTNAME> (the test kills a
worker by host); at the end each rank writes DUMP_DIR/params-rank<r>.npz. Runs the same
code path as `hvdscale train --elastic`.
"""
import argparse
import os
import sys
from pathlib import Path

import numpy as np

from hvdscale.cli import UsageError
from hvdscale.commands import train as train_cmd
from hvdscale.engine.elastic import run_elastic


def main(dump, argv):
    dump = Path(dump)
    dump.mkdir(parents=True, exist_ok=True)
    (dump / f"pid-{os.environ.get('HOROVOD_HOSTNAME', 'local')}").write_text(str(os.getpid()))
    parser = argparse.ArgumentParser()
    train_cmd.add_arguments(parser)
    try:
        code, job = run_elastic(parser.parse_args(["--elastic", *argv]))
    except UsageError as err:
        print(f"hvdscale train: error: {err}", file=sys.stderr)
        return 2
    params = job.parameters()
    np.savez(dump / f"params-rank{job.hvd.rank()}.npz",
             **{f"p{i:04d}": params[k] for i, k in enumerate(sorted(params))})
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
