"""The training engine's sources over DALI loaders (hvdscale.data.build_sources calls
build_sources for data kind imagefolder)."""
import os

from hvdscale.data.dali.build import build_eval_loader, build_train_loader, output_for
from hvdscale.data.dali.pipeline import gpu_count


class EngineTrainSource:
    """The engine's training-source protocol over a DALI loader: num_examples,
    steps_per_epoch and epoch(epoch, start) -> (images, labels) batches in what the
    backend's DaliOutput hands out (BackendInfo.dali).

    DALI's reader keeps its own epoch count, so epochs must be asked for in order; a resumed
    run (start > 0, or a later epoch first) gets DALI's next epoch, with `start` batches
    skipped, not the exact order the interrupted run would have read."""

    def __init__(self, loader):
        self.loader = loader
        self.steps_per_epoch = loader.steps_per_epoch
        self.num_examples = loader.num_examples

    def epoch(self, epoch, start=0):
        for step, batch in enumerate(self.loader):
            if step >= start:
                yield batch


class EngineEvalSource:
    """The engine's evaluation-source protocol: num_examples and batches() over this rank's
    exactly-once share."""

    def __init__(self, loader):
        self.loader = loader
        self.num_examples = loader.num_examples

    def batches(self):
        return iter(self.loader)


def build_sources(cfg, rank, size, eval_batch=500):
    """(train source, eval source) for `hvdscale train` with data.kind imagefolder.

    DALI threads: train.threads, else this node's cores shared among the ranks on this node
    (the launcher's local size). Decoding follows data.decode; with mixed decoding images
    and labels stay on the GPU. The backend's DaliOutput.for_engine() says what it reads
    (torch: its iterator, channels_last; TensorFlow: DALI's TF dataset, or NumPy batches
    that the TF backend prefetches through tf.data when the plugin does not work)."""
    from hvdscale.comm import launched_local_size

    threads = cfg.train.threads or max(1, (os.cpu_count() or 1) // launched_local_size(size))
    local = rank % max(1, gpu_count())
    per_step = cfg.batch.per_worker * cfg.batch.accumulation
    output, options = output_for(cfg.framework).for_engine()
    common = dict(num_threads=threads, local_rank=local, **options)
    train = build_train_loader(cfg.data, output.name, per_step, rank, size, seed=cfg.train.seed,
                               **common)
    evaluate = build_eval_loader(cfg.data, output.name, max(eval_batch, cfg.batch.per_worker),
                                 rank, size, seed=cfg.train.seed, **common)
    return EngineTrainSource(train), EngineEvalSource(evaluate)
