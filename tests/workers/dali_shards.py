"""Worker for tests/test_dali_multiproc.py, run under `horovodrun -np 2`.

Reads an image folder whose every class holds one image (label = image id) through
hvdscale.data.dali and writes, per rank, the labels it saw in each epoch to OUT/rank<r>.json.
An allreduce after every training batch stands in for the gradient allreduce, so a rank that
fails leaves its peer waiting in a collective, as in real training.

usage: dali_shards.py FRAMEWORK DIR OUT BATCH EPOCHS [tf_backend]
"""
import json
import sys
from pathlib import Path
from types import SimpleNamespace


def main():
    framework, root, out, batch, epochs = sys.argv[1:6]
    tf_backend = sys.argv[6] if len(sys.argv) > 6 else "auto"
    batch, epochs = int(batch), int(epochs)
    if framework == "torch":
        import horovod.torch as hvd
        import torch
        torch.set_num_threads(1)
        hvd.init()

        def allreduce(value):
            return float(hvd.allreduce(torch.tensor(float(value)), op=hvd.Sum))
    else:
        import horovod.tensorflow as hvd
        import tensorflow as tf
        hvd.init()

        def allreduce(value):
            return float(hvd.allreduce(tf.constant(float(value)), op=hvd.Sum))

    from hvdscale.cli import UsageError
    from hvdscale.data.dali import build_eval_loader, build_train_loader

    rank, size = hvd.rank(), hvd.size()
    cfg = SimpleNamespace(kind="imagefolder", path=root, image_size=32, num_classes=None,
                          skip_corrupt="skip" in Path(root).name, decode="auto",
                          train_limit=None, test_limit=None)
    try:
        train = build_train_loader(cfg, framework, batch, rank, size, seed=7, tf_backend=tf_backend)
        evaluate = build_eval_loader(cfg, framework, batch, rank, size, tf_backend=tf_backend)
        record = {"rank": rank, "size": size, "train_steps": train.steps_per_epoch,
                  "eval_steps": evaluate.steps_per_epoch, "skipped": len(train.skipped),
                  "loader": type(train).__name__, "train": [], "eval": []}
        for _ in range(epochs):
            seen, shapes = [], set()
            for images, labels in train:
                seen += [int(v) for v in labels.numpy()]
                shapes.add((tuple(images.shape), str(images.dtype)))
                allreduce(len(labels))
            record["train"].append(seen)
            record["train_shapes"] = sorted(map(str, shapes))
            record["eval"].append([int(v) for _, labels in evaluate for v in labels.numpy()])
        record["eval_total"] = allreduce(len(record["eval"][-1]))
    except UsageError as err:
        print(f"rank {rank}: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
