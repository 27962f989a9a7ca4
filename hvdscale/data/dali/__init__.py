"""DALI input pipelines: ImageNet-layout image folders and in-memory arrays, one shard per rank.

One API for the engine, whatever the source and framework:

    loader = build_train_loader(cfg.data, "torch", batch_size, rank, size, seed=seed)
    for images, labels in loader:      # one epoch: exactly loader.steps_per_epoch batches
        ...

Images come NCHW for torch and NHWC for TensorFlow and "numpy", float32 or float16; labels
are int64. Training shuffles the whole file list from the seed and reshuffles it every epoch
(the reader's `shuffle_after_epoch`, identical on every rank); every rank runs the same number
of full batches. Evaluation reads each image exactly once across ranks: the reader pads the
last batch and the padding is trimmed away, so a rank's last batch may be short and a rank may
run one batch fewer than another (evaluation runs no per-step collective; the engine
allreduces correct/count once at the end).

Decoding runs on the GPU (`mixed`) when one is visible and on the CPU otherwise (`decode: auto`),
or as the recipe says. TensorFlow reads through DALI's TF plugin when it is installed and
works; otherwise through `hvdscale.data.tfdata`, the same augmentations written in tf.data.

    pipeline.py  Augment, the decode device, the two DALI graphs (file reader, arrays)
    inputs.py    file lists of a kind on disk, the arrays' external source, per-rank counts
    loader.py    loaders over a built pipeline (NumPy batches) and DaliOutput, the interface
                 each backend implements in its own package (BackendInfo.dali)
    build.py     build_train_loader / build_eval_loader from the data kind's and the
                 framework's registry entries
    sources.py   the training engine's sources (build_sources)
"""
from hvdscale.data.dali.build import build_eval_loader, build_train_loader, output_for
from hvdscale.data.dali.inputs import (eval_steps, list_split, reader_shard_bounds,
                                       train_steps)
from hvdscale.data.dali.loader import HOST, DaliLoader, DaliOutput
from hvdscale.data.dali.pipeline import (IMAGENET_MEAN, IMAGENET_STD, Augment, decode_device,
                                         gpu_count)
from hvdscale.data.dali.sources import EngineEvalSource, EngineTrainSource, build_sources

__all__ = ["Augment", "DaliLoader", "DaliOutput", "EngineEvalSource", "EngineTrainSource",
           "HOST", "IMAGENET_MEAN", "IMAGENET_STD", "build_eval_loader", "build_sources",
           "build_train_loader", "decode_device", "eval_steps", "gpu_count", "list_split",
           "output_for", "reader_shard_bounds", "train_steps"]
