"""Worker for tests/test_train_multiproc.py and tests/test_resume.py.

    python train_worker.py train DUMP_DIR [hvdscale train arguments ...]
        runs `hvdscale train` (under horovodrun or alone) and then writes this rank's
        trainable parameters to DUMP_DIR/params-rank<r>.npz
    python train_worker.py evaluate OUT [hvdscale train arguments ...]
        one process, no Horovod: loads the newest checkpoint in OUT/checkpoints and prints
        {"accuracy": ..., "count": ...} for the whole test set
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

from hvdscale.commands import train as train_cmd


def parse(argv):
    parser = argparse.ArgumentParser()
    train_cmd.add_arguments(parser)
    return parser.parse_args(argv)


def do_train(dump, argv):
    engine = train_cmd.build_engine(parse(argv))
    engine.run()
    dump = Path(dump)
    dump.mkdir(parents=True, exist_ok=True)
    params = engine.backend.parameters()
    np.savez(dump / f"params-rank{engine.comm.rank}.npz",
             **{f"p{i:04d}": params[k] for i, k in enumerate(sorted(params))})


def do_evaluate(out, argv):
    from hvdscale.engine.checkpoint import CheckpointStore
    # --resume: this reads the trained run in `out` (a new run there would be refused)
    args = parse(argv + ["--no-horovod", "--out", out, "--resume"])
    engine = train_cmd.build_engine(args)
    engine.backend.build()
    meta, path = CheckpointStore(Path(out) / "checkpoints").latest()
    engine.backend.load_state_bytes(path.read_bytes())
    correct, count, _ = engine.backend.evaluate(engine.eval_source.batches())
    print(json.dumps({"accuracy": correct / count, "count": count, "step": meta["step"]}))


if __name__ == "__main__":
    mode, where, rest = sys.argv[1], sys.argv[2], sys.argv[3:]
    {"train": do_train, "evaluate": do_evaluate}[mode](where, rest)
