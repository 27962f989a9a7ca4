"""build_train_loader / build_eval_loader: a data kind's pipeline for one framework's output.

The data kind's registry entry says what the pipeline reads (`DataKindInfo.files`: image files
through DALI's reader; `DataKindInfo.arrays`: in-memory arrays through an external source);
the framework's entry says what becomes of the output (`BackendInfo.dali`, a DaliOutput)."""
from typing import Any

import numpy as np

from hvdscale import registry
from hvdscale.data.dali.inputs import (ArrayEpochs, eval_steps, reader_shard_bounds, setting,
                                       train_steps)
from hvdscale.data.dali.loader import HOST, DaliOutput
from hvdscale.data.dali.pipeline import (Augment, array_graph, build_pipeline, decode_device,
                                         folder_graph)
from hvdscale.errors import ConfigError, DataError

TF_BACKENDS = ("auto", "dali", "tfdata")


def build_train_loader(cfg_data: Any, framework: str, batch_size: int, rank: int = 0,
                       size: int = 1, *, seed: int = 0, **options: Any) -> Any:
    """This rank's training batches for `cfg_data.kind` (imagefolder, or a kind with
    in-memory arrays: fashion_mnist, synthetic)."""
    return _build(cfg_data, framework, batch_size=batch_size, rank=rank, size=size, seed=seed,
                  train=True, **options)


def build_eval_loader(cfg_data: Any, framework: str, batch_size: int, rank: int = 0,
                      size: int = 1, *, seed: int = 0, **options: Any) -> Any:
    """This rank's evaluation batches: every image on exactly one rank, once."""
    return _build(cfg_data, framework, batch_size=batch_size, rank=rank, size=size, seed=seed,
                  train=False, **options)


def output_for(framework: str) -> DaliOutput:
    """The DaliOutput of a registered backend (its BackendInfo.dali), or NumPy's."""
    if framework == HOST.name:
        return HOST
    if framework in registry.BACKENDS and registry.BACKENDS.get(framework).dali is not None:
        return registry.resolve(registry.BACKENDS.get(framework).dali)
    known = [b.name for b in registry.BACKENDS if b.dali is not None] + [HOST.name]
    raise ConfigError(f"framework must be one of {', '.join(known)}, not {framework!r}")


def _build(cfg_data, framework, *, batch_size, rank, size, seed, train, num_threads=1,
           local_rank=0, fp16=False, augment=None, tf_backend="auto", check="markers",
           check_threads=1, channels_last=False):
    """Options: num_threads (DALI CPU threads), local_rank (GPU for mixed decoding), fp16,
    augment (an Augment), tf_backend (TensorFlow: auto | dali | tfdata), check (imagefolder
    file check when skip_corrupt is off: name | markers | decode), channels_last (torch:
    NCHW-shaped tensors in NHWC memory, what channels_last convolutions read)."""
    output = output_for(framework)
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, not {batch_size}")
    if not 0 <= rank < size:
        raise ConfigError(f"rank {rank} is not in a world of size {size}")
    if tf_backend not in TF_BACKENDS:
        raise ConfigError(f"tf_backend must be one of {', '.join(TF_BACKENDS)}, not {tf_backend!r}")
    kind = setting(cfg_data, "kind", "imagefolder")
    info = registry.DATA_KINDS.get(kind) if kind in registry.DATA_KINDS else None
    decode = decode_device(setting(cfg_data, "decode", "auto"))
    common = dict(batch_size=batch_size, rank=rank, size=size, seed=seed, train=train,
                  decode=decode, num_threads=num_threads, local_rank=local_rank, fp16=fp16,
                  augment=augment, options=dict(tf_backend=tf_backend,
                                                channels_last=channels_last))
    if info is not None and info.files is not None:
        listing = registry.resolve(info.files)(cfg_data, train, check, check_threads)
        return _folder_loader(cfg_data, output, listing, **common)
    if info is not None and info.arrays is not None:   # in memory
        return _array_loader(cfg_data, output, **common)
    raise ConfigError(f"data.kind {kind!r} has no DALI pipeline (a kind with image files, or "
                      f"with in-memory arrays)")


def _folder_loader(cfg_data, output, listing, *, batch_size, rank, size, seed, train, decode,
                   num_threads, local_rank, fp16, augment, options):
    n = len(listing)
    if train:
        steps = train_steps(n, size, batch_size)
        if steps == 0:
            raise DataError(f"{listing.root}: {n} images are too few for one batch of "
                            f"{batch_size} on each of {size} workers")
        num_samples = steps * batch_size
    else:
        steps = eval_steps(n, rank, size, batch_size)
        start, end = reader_shard_bounds(n, rank, size)
        num_samples = end - start
    files, labels = listing.files, listing.labels
    if train:
        # The reader's own reshuffle ignores the seed, so the seed orders the list it starts from.
        order = np.random.default_rng(seed).permutation(n)
        files, labels = [files[i] for i in order], labels[order]
    channels = setting(cfg_data, "channels") or 3
    spec = augment or Augment.default(cfg_data.image_size, channels)
    other = output.folder_loader(listing, train=train, spec=spec, batch_size=batch_size,
                                 rank=rank, size=size, seed=seed, num_threads=num_threads,
                                 fp16=fp16, channels=channels, decode=decode, **options)
    if other is not None:
        other.skipped, other.num_examples = listing.skipped, n
        return other
    device_id = local_rank if decode == "mixed" else None
    pipe = build_pipeline(folder_graph, batch_size, num_threads, device_id, seed + rank,
                          files=files, labels=[int(v) for v in labels], shard_id=rank,
                          num_shards=size, train=train, spec=spec, decode=decode,
                          layout=output.pipeline_layout(options["channels_last"]), fp16=fp16,
                          channels=channels)
    loader = output.loader(pipe, train=train, steps_per_epoch=steps, num_samples=num_samples,
                           batch_size=batch_size, uses_reader=True, fp16=fp16,
                           device_id=device_id,
                           image_shape=(spec.image_size, spec.image_size, channels), **options)
    loader._files = files
    loader.skipped = listing.skipped
    loader.classes = listing.classes
    loader.num_examples = n
    return loader


def _array_loader(cfg_data, output, *, batch_size, rank, size, seed, train, decode,
                  num_threads, local_rank, fp16, augment, options):
    from hvdscale.data.arrays import load_raw
    raw = load_raw(cfg_data, seed)          # the kind's own arrays and normalisation
    x, y = (raw.x_train, raw.y_train) if train else raw.evaluation()
    source = ArrayEpochs(x, y, rank, size, batch_size, seed, train)
    if source.steps == 0:
        raise DataError(f"{cfg_data.kind}: {len(y)} examples are too few for one batch of "
                        f"{batch_size} on each of {size} workers")
    channels = source.x.shape[-1]
    spec = augment or Augment.default(cfg_data.image_size, channels, raw.mean, raw.std)
    on_gpu = decode == "mixed"
    device_id = local_rank if on_gpu else None
    pipe = build_pipeline(array_graph, batch_size, num_threads, device_id, seed + rank,
                          source=source, train=train, spec=spec,
                          layout=output.pipeline_layout(options["channels_last"]), fp16=fp16,
                          on_gpu=on_gpu)
    loader = output.loader(pipe, train=train, steps_per_epoch=source.steps,
                           num_samples=source.num_samples, batch_size=batch_size,
                           uses_reader=False, fp16=fp16, device_id=device_id,
                           image_shape=(spec.image_size, spec.image_size, channels), **options)
    loader.skipped, loader.num_examples = [], len(y)
    return loader
