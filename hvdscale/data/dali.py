"""DALI input pipelines: ImageNet-layout image folders and in-memory arrays, one shard per rank.

One API for the engine, whatever the source and framework:

    loader = build_train_loader(cfg.data, "torch", batch_size, rank, size, seed=seed)
    for images, labels in loader:      # one epoch: exactly loader.steps_per_epoch batches
        ...

Images come NCHW for torch and NHWC for TensorFlow, float32 or float16; labels are int64.

Sharding follows DALI's file reader: shard `rank` of `size` is a contiguous slice of the file
list, so shards are disjoint and cover the set. Training shuffles the whole list from the seed
and reshuffles it every epoch (the reader's `shuffle_after_epoch`, identical on every rank),
then every rank runs floor(floor(N/size)/batch) full batches, the same number everywhere, as
the gradient allreduce needs. Evaluation reads each image exactly once across ranks: the
reader pads the last batch and the padding is trimmed away here, so a rank's last batch may be
short and a rank may run one batch fewer than another (evaluation runs no per-step collective;
the engine allreduces correct/count once at the end).

Decoding runs on the GPU (`mixed`) when one is visible and on the CPU otherwise (`decode: auto`),
or as the recipe says. TensorFlow reads through DALI's TF plugin when it is installed and
works; otherwise through `hvdscale.data.tfdata`, the same augmentations written in tf.data.
"""
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from hvdscale.errors import ConfigError, DataError
from hvdscale.registry import DATA_KINDS

IMAGENET_MEAN = (0.485, 0.456, 0.406)     # of pixels scaled to [0, 1]
IMAGENET_STD = (0.229, 0.224, 0.225)
READER = "Reader"
DECODES = ("auto", "cpu", "mixed")
FRAMEWORKS = ("torch", "tensorflow")
TF_BACKENDS = ("auto", "dali", "tfdata")
# Below this size the ImageNet crop range (8 %..100 % of the area) leaves too few pixels
# (a 28-px image would be cropped to 8 px), so small images crop at least 35 % of the area.
SMALL_IMAGE = 128


@dataclass(frozen=True)
class Augment:
    """Training: random-resized-crop to `image_size` + horizontal flip; evaluation: resize the
    shorter side to image_size / eval_crop_fraction, centre crop. Both normalise."""
    image_size: int
    crop_area: tuple = (0.08, 1.0)
    crop_aspect: tuple = (3 / 4, 4 / 3)
    flip: bool = True
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    eval_crop_fraction: float = 0.875

    @property
    def eval_resize(self):
        return int(round(self.image_size / self.eval_crop_fraction))

    @classmethod
    def default(cls, image_size, channels=3, mean=None, std=None):
        area = (0.08, 1.0) if image_size >= SMALL_IMAGE else (0.35, 1.0)
        if channels == 1:
            mean, std = mean or (0.5,), std or (0.5,)
        return cls(image_size, crop_area=area, mean=tuple(mean or IMAGENET_MEAN),
                   std=tuple(std or IMAGENET_STD))


def gpu_count():
    """GPUs DALI can use (0 on a CPU-only machine or a CPU-only DALI build)."""
    try:
        from nvidia.dali.backend import GetCUDADeviceCount
        return int(GetCUDADeviceCount())
    except Exception:  # noqa: BLE001 -- no driver, no CUDA runtime: no GPU for DALI
        return 0


def decode_device(choice="auto", gpus=None):
    """'mixed' (GPU decoding) or 'cpu' for `data.decode` = auto | cpu | mixed."""
    if choice not in DECODES:
        raise ConfigError(f"data.decode must be one of {', '.join(DECODES)}, not {choice!r}")
    gpus = gpu_count() if gpus is None else gpus
    if choice == "auto":
        return "mixed" if gpus > 0 else "cpu"
    if choice == "mixed" and gpus == 0:
        raise ConfigError("data.decode: mixed needs a GPU and none is visible to DALI "
                          "(use decode: cpu or auto)")
    return choice


def reader_shard_bounds(n, shard_id, num_shards):
    """[start, end) of shard `shard_id` in the file list, as DALI's readers cut it."""
    return n * shard_id // num_shards, n * (shard_id + 1) // num_shards


def train_steps(n, size, batch_size):
    """Full batches per epoch on every rank: the smallest shard, floor(n/size), in batches."""
    return (n // size) // batch_size


def eval_steps(n, rank, size, batch_size):
    start, end = reader_shard_bounds(n, rank, size)
    return math.ceil((end - start) / batch_size)


def _check_framework(framework):
    # "numpy" (NHWC NumPy batches) is what the training engine's backends take.
    if framework not in FRAMEWORKS + ("numpy",):
        raise ConfigError(f"framework must be one of {', '.join(FRAMEWORKS)}, not {framework!r}")


# ---------------------------------------------------------------------------------------------
# DALI graphs

def _normalise(fn, types, images, spec, layout, fp16, mirror):
    return fn.crop_mirror_normalize(
        images, crop=(spec.image_size, spec.image_size), mirror=mirror,
        mean=[255.0 * m for m in spec.mean], std=[255.0 * s for s in spec.std],
        dtype=types.FLOAT16 if fp16 else types.FLOAT, output_layout=layout)


def _folder_graph(files, labels, shard_id, num_shards, train, spec, decode, layout, fp16,
                  channels=3):
    from nvidia.dali import fn, types

    colour = types.RGB if channels == 3 else types.GRAY
    jpegs, label = fn.readers.file(
        files=files, labels=labels, shard_id=shard_id, num_shards=num_shards,
        shuffle_after_epoch=train, stick_to_shard=not train, pad_last_batch=True, name=READER)
    if train:
        # Decoding only the crop window saves most of the CPU decode cost of a small crop.
        images = fn.decoders.image_random_crop(
            jpegs, device=decode, output_type=colour, random_area=list(spec.crop_area),
            random_aspect_ratio=list(spec.crop_aspect), num_attempts=10)
        images = fn.resize(images, resize_x=spec.image_size, resize_y=spec.image_size)
        mirror = fn.random.coin_flip(probability=0.5) if spec.flip else 0
    else:
        images = fn.decoders.image(jpegs, device=decode, output_type=colour)
        images = fn.resize(images, resize_shorter=spec.eval_resize)
        mirror = 0
    if decode == "mixed":       # labels reach the GPU inside the pipeline, not copied unpinned
        label = label.gpu()
    return _normalise(fn, types, images, spec, layout, fp16, mirror), label


def _array_graph(source, train, spec, layout, fp16, on_gpu):
    from nvidia.dali import fn, types

    images, label = fn.external_source(source=source, num_outputs=2, batch=True, cycle="raise",
                                       layout=["HWC", ""], dtype=[types.UINT8, types.INT64])
    if on_gpu:
        images, label = images.gpu(), label.gpu()
    if train:
        images = fn.random_resized_crop(images, size=(spec.image_size, spec.image_size),
                                        random_area=list(spec.crop_area),
                                        random_aspect_ratio=list(spec.crop_aspect))
        mirror = fn.random.coin_flip(probability=0.5) if spec.flip else 0
    else:
        images = fn.resize(images, resize_shorter=spec.eval_resize)
        mirror = 0
    return _normalise(fn, types, images, spec, layout, fp16, mirror), label


def _pipeline(graph, batch_size, num_threads, device_id, seed, **kwargs):
    from nvidia.dali import pipeline_def

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                  prefetch_queue_depth=2, exec_dynamic=True)
    def pipe():
        return graph(**kwargs)

    return pipe()


class ArrayEpochs:
    """External-source input: every iter() is the next epoch of this rank's batches
    (sharding.shard_indices: a seeded shuffle per epoch for training, exactly once for eval)."""

    def __init__(self, x, y, rank, size, batch_size, seed, train):
        from hvdscale.data.sharding import shard_indices

        self._shard = shard_indices
        self.x = x if x.ndim == 4 else x[..., None]
        self.y = np.asarray(y, dtype=np.int64)
        self.rank, self.size, self.batch_size = rank, size, batch_size
        self.seed, self.train, self.epoch = seed, train, 0
        n_rank = len(self._indices(0))
        self.steps = n_rank // batch_size if train else math.ceil(n_rank / batch_size)
        self.num_samples = self.steps * batch_size if train else n_rank

    def _indices(self, epoch):
        return self._shard(len(self.y), self.rank, self.size, epoch=epoch, seed=self.seed,
                           shuffle=self.train, drop_last=self.train)

    def __iter__(self):
        idx = self._indices(self.epoch)
        self.epoch += 1
        for step in range(self.steps):
            take = np.sort(idx[step * self.batch_size:(step + 1) * self.batch_size])
            yield np.ascontiguousarray(self.x[take]), self.y[take]


# ---------------------------------------------------------------------------------------------
# loaders

class DaliLoader:
    """This rank's batches of one split. Each iteration is one epoch of `steps_per_epoch`
    (images, labels) batches; `num_samples` is how many real images this rank sees in it."""

    def __init__(self, pipe, framework, train, steps_per_epoch, num_samples, batch_size,
                 uses_reader, fp16=False):
        self.pipe, self.framework, self.train = pipe, framework, train
        self.steps_per_epoch, self.num_samples = steps_per_epoch, num_samples
        self.batch_size, self.fp16 = batch_size, fp16
        self.layout = "NCHW" if framework == "torch" else "NHWC"     # numpy: NHWC
        self.channels_last = False    # torch: HWC from DALI, handed out as an NCHW view
        self._uses_reader = uses_reader
        self._iterator = None
        self._files = None            # set for folder pipelines, to name a file DALI cannot read

    def __len__(self):
        return self.steps_per_epoch

    def __iter__(self):
        try:
            if self.framework == "torch":
                yield from self._torch_epoch()
            elif self.framework == "numpy":
                yield from self._host_batches()
            else:
                yield from self._numpy_epoch()
        except RuntimeError as err:
            raise self._decode_error(err) from None

    def _torch_epoch(self):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        if self._iterator is None:
            policy = LastBatchPolicy.DROP if self.train else LastBatchPolicy.PARTIAL
            kwargs = {"reader_name": READER} if self._uses_reader else {}
            self._iterator = DALIGenericIterator(self.pipe, ["images", "labels"], auto_reset=True,
                                                 last_batch_policy=policy, **kwargs)
        count = 0
        for out in self._iterator:
            images, labels = out[0]["images"], out[0]["labels"]
            if len(labels) == 0:      # padding-only batch on a rank with the smaller shard
                continue
            count += 1
            if self.channels_last:    # NCHW shape, NHWC memory (torch.channels_last): no copy
                images = images.permute(0, 3, 1, 2)
            yield images, labels.reshape(-1).long()
        if count != self.steps_per_epoch:
            raise DataError(f"DALI gave {count} batches in an epoch, expected "
                            f"{self.steps_per_epoch}")

    def _numpy_epoch(self):
        """Run the pipeline by hand (TF without the plugin needs no DALI iterator)."""
        import tensorflow as tf

        for images, labels in self._host_batches():
            yield tf.convert_to_tensor(images), tf.convert_to_tensor(labels)

    def _host_batches(self):
        """One epoch as NumPy batches, with the padding trimmed (evaluation) or the tail
        drained and dropped (training), exactly as the DALI PyTorch iterator does."""
        if not self._uses_reader:
            while True:
                try:
                    images, labels = self.pipe.run()
                except StopIteration:
                    self.pipe.reset()
                    return
                yield _host(images), _host(labels).reshape(-1).astype(np.int64)
        left = self.num_samples
        for step in range(_reader_batches(self.pipe, self.batch_size)):
            images, labels = self.pipe.run()
            keep = self.batch_size if self.train else min(self.batch_size, left)
            left -= keep
            if step >= self.steps_per_epoch or keep <= 0:
                continue            # drain the rest of this epoch so the next starts fresh
            yield _host(images)[:keep], _host(labels).reshape(-1)[:keep].astype(np.int64)

    def _decode_error(self, err):
        """DALI reports a bad file without its name: find it with Pillow and name it."""
        text = str(err)
        if self._files is None or "pipeline" not in text.lower():
            return err
        from hvdscale.data.imagefolder import decode_problem

        for path in self._files:
            problem = decode_problem(path)
            if problem:
                return DataError(f"{path}: {problem} (DALI could not decode it; "
                                 f"data.skip_corrupt: true skips such files)")
        return DataError(f"DALI pipeline failed: {text.splitlines()[-1] if text else err}")


def _reader_batches(pipe, batch_size):
    """Batches the padded reader gives each shard per epoch: its largest shard, rounded up."""
    meta = pipe.reader_meta(READER)
    return math.ceil(meta["epoch_size_padded"] / meta["number_of_shards"] / batch_size)


def _host(tensor_list):
    if hasattr(tensor_list, "as_cpu"):
        tensor_list = tensor_list.as_cpu()
    return tensor_list.as_array()


class DaliTFLoader(DaliLoader):
    """TensorFlow through DALI's TF plugin: a DALIDataset, trimmed and counted like the others."""

    def __init__(self, *args, device_id=None, image_shape=None, **kwargs):
        super().__init__(*args, **kwargs)
        import tensorflow as tf
        import nvidia.dali.plugin.tf as dali_tf

        dtype = tf.float16 if self.fp16 else tf.float32
        device = "/cpu:0" if device_id is None else f"/gpu:{device_id}"
        with tf.device(device):
            self.dataset = dali_tf.DALIDataset(
                pipeline=self.pipe, batch_size=self.batch_size, device_id=device_id,
                output_shapes=((self.batch_size, *image_shape), (self.batch_size, 1)),
                output_dtypes=(dtype, tf.int64 if not self._uses_reader else tf.int32))
        self._stream = iter(self.dataset)
        self._device = device

    def __iter__(self):
        import tensorflow as tf

        left = self.num_samples
        for step in range(_reader_batches(self.pipe, self.batch_size)):
            with tf.device(self._device):
                images, labels = next(self._stream)
            keep = self.batch_size if self.train else min(self.batch_size, left)
            left -= keep
            if step >= self.steps_per_epoch or keep <= 0:
                continue
            yield images[:keep], tf.cast(tf.reshape(labels, [-1])[:keep], tf.int64)


def tf_plugin_problem():
    """None when DALI's TF plugin imports, else why not (one line)."""
    try:
        import nvidia.dali.plugin.tf  # noqa: F401
    except Exception as err:  # noqa: BLE001 -- any failure means: use tf.data
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return None


def _cfg(cfg_data, name, default=None):
    return getattr(cfg_data, name, default)


def build_train_loader(cfg_data: Any, framework: str, batch_size: int, rank: int = 0,
                       size: int = 1, *, seed: int = 0, **options: Any) -> Any:
    """This rank's training batches for `cfg_data.kind` imagefolder | fashion_mnist | synthetic."""
    return _build(cfg_data, framework, batch_size=batch_size, rank=rank, size=size, seed=seed,
                  train=True, **options)


def build_eval_loader(cfg_data: Any, framework: str, batch_size: int, rank: int = 0,
                      size: int = 1, *, seed: int = 0, **options: Any) -> Any:
    """This rank's evaluation batches: every image on exactly one rank, once."""
    return _build(cfg_data, framework, batch_size=batch_size, rank=rank, size=size, seed=seed,
                  train=False, **options)


def _build(cfg_data, framework, *, batch_size, rank, size, seed, train, num_threads=1,
           local_rank=0, fp16=False, augment=None, tf_backend="auto", check="markers",
           check_threads=1, channels_last=False):
    """Options: num_threads (DALI CPU threads), local_rank (GPU for mixed decoding), fp16,
    augment (an Augment), tf_backend (auto | dali | tfdata), check (imagefolder file check
    when skip_corrupt is off: name | markers | decode), channels_last (torch: NCHW-shaped
    tensors in NHWC memory, what channels_last convolutions read)."""
    _check_framework(framework)
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, not {batch_size}")
    if not 0 <= rank < size:
        raise ConfigError(f"rank {rank} is not in a world of size {size}")
    if tf_backend not in TF_BACKENDS:
        raise ConfigError(f"tf_backend must be one of {', '.join(TF_BACKENDS)}, not {tf_backend!r}")
    kind = _cfg(cfg_data, "kind", "imagefolder")
    decode = decode_device(_cfg(cfg_data, "decode", "auto"))
    if kind == "imagefolder":
        loader = _folder_loader(cfg_data, framework, batch_size=batch_size, rank=rank, size=size,
                                seed=seed, train=train, decode=decode, num_threads=num_threads,
                                local_rank=local_rank, fp16=fp16, augment=augment,
                                tf_backend=tf_backend, check=check, check_threads=check_threads,
                                channels_last=channels_last)
    elif kind in DATA_KINDS and DATA_KINDS.get(kind).arrays is not None:   # in memory
        loader = _array_loader(cfg_data, framework, batch_size=batch_size, rank=rank, size=size,
                               seed=seed, train=train, decode=decode, num_threads=num_threads,
                               local_rank=local_rank, fp16=fp16, augment=augment,
                               channels_last=channels_last)
    else:
        raise ConfigError(f"data.kind {kind!r} has no DALI pipeline (imagefolder, or a kind "
                          f"with in-memory arrays)")
    if isinstance(loader, DaliLoader):
        loader.channels_last = channels_last and framework == "torch"
    return loader


def list_split(cfg_data, train, check="markers", threads=1):
    """The validated, limited file list of the train or val split of `cfg_data.path`."""
    from hvdscale.data.imagefolder import list_images, split_dir

    if not _cfg(cfg_data, "path"):
        raise ConfigError("data.path must name the image directory for data.kind: imagefolder")
    split = "train" if train else "val"
    skip = bool(_cfg(cfg_data, "skip_corrupt", False))
    listing = list_images(split_dir(cfg_data.path, split), check="decode" if skip else check,
                          skip_corrupt=skip, threads=threads)
    limit = _cfg(cfg_data, "train_limit" if train else "test_limit")
    if limit and limit < len(listing):
        # An evenly spaced subset keeps every class (the list is sorted by class).
        keep = np.linspace(0, len(listing) - 1, limit).round().astype(int)
        listing.files = [listing.files[i] for i in keep]
        listing.labels = listing.labels[keep]
    classes = _cfg(cfg_data, "num_classes")
    if classes and len(listing.classes) != classes:
        raise DataError(f"{listing.root}: {len(listing.classes)} class folders, "
                        f"but data.num_classes is {classes}")
    return listing


def _folder_loader(cfg_data, framework, *, batch_size, rank, size, seed, train, decode,
                   num_threads, local_rank, fp16, augment, tf_backend, check, check_threads,
                   channels_last=False):
    listing = list_split(cfg_data, train, check, check_threads)
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
    channels = _cfg(cfg_data, "channels") or 3
    spec = augment or Augment.default(cfg_data.image_size, channels)
    if framework == "tensorflow" and _tf_backend(tf_backend, decode) == "tfdata":
        from hvdscale.data.tfdata import TFDataLoader
        loader = TFDataLoader(listing.files, listing.labels, train, spec, batch_size, rank, size,
                              seed, num_threads, fp16, channels)
        loader.skipped, loader.num_examples = listing.skipped, n
        return loader
    layout = "CHW" if framework == "torch" and not channels_last else "HWC"
    device_id = local_rank if decode == "mixed" else None
    pipe = _pipeline(_folder_graph, batch_size, num_threads, device_id, seed + rank,
                     files=files, labels=[int(v) for v in labels], shard_id=rank,
                     num_shards=size, train=train, spec=spec, decode=decode, layout=layout,
                     fp16=fp16, channels=channels)
    pipe.build()
    if framework == "tensorflow" and tf_plugin_problem() is None:
        loader = DaliTFLoader(pipe, framework, train, steps, num_samples, batch_size, True, fp16,
                              device_id=device_id,
                              image_shape=(spec.image_size, spec.image_size, channels))
    else:
        loader = DaliLoader(pipe, framework, train, steps, num_samples, batch_size, True, fp16)
    loader._files = files
    loader.skipped = listing.skipped
    loader.classes = listing.classes
    loader.num_examples = n
    return loader


def _tf_backend(choice, decode):
    """TF reads through DALI's plugin when it works, else through tf.data."""
    problem = tf_plugin_problem()
    if choice == "dali" and problem:
        raise ConfigError(f"DALI's TensorFlow plugin is not usable here ({problem})")
    if choice == "auto":
        return "dali" if problem is None else "tfdata"
    return choice


def _array_loader(cfg_data, framework, *, batch_size, rank, size, seed, train, decode,
                  num_threads, local_rank, fp16, augment, channels_last=False):
    from hvdscale.data.arrays import load_raw
    raw = load_raw(cfg_data, seed)          # the kind's own arrays and normalisation
    mean, std = raw.mean, raw.std
    x, y = (raw.x_train, raw.y_train) if train else raw.evaluation()
    source = ArrayEpochs(x, y, rank, size, batch_size, seed, train)
    if source.steps == 0:
        raise DataError(f"{cfg_data.kind}: {len(y)} examples are too few for one batch of "
                        f"{batch_size} on each of {size} workers")
    channels = source.x.shape[-1]
    spec = augment or Augment.default(cfg_data.image_size, channels, mean, std)
    layout = "CHW" if framework == "torch" and not channels_last else "HWC"
    on_gpu = decode == "mixed"
    pipe = _pipeline(_array_graph, batch_size, num_threads, local_rank if on_gpu else None,
                     seed + rank, source=source, train=train, spec=spec, layout=layout, fp16=fp16,
                     on_gpu=on_gpu)
    pipe.build()
    loader = DaliLoader(pipe, framework, train, source.steps, source.num_samples, batch_size,
                        False, fp16)
    loader.skipped, loader.num_examples = [], len(y)
    return loader


# ---------------------------------------------------------------------------------------------
# the training engine's sources (hvdscale.data.build_sources calls this for imagefolder)

class EngineTrainSource:
    """The engine's training-source protocol over a DALI loader: num_examples,
    steps_per_epoch and epoch(epoch, start) -> (images, labels) batches in the backend's
    layout: torch tensors from DALI's torch iterator (on the GPU with mixed decoding), TF
    tensors from DALI's TF dataset, or NHWC NumPy batches for TensorFlow without the plugin.

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


def engine_output(framework, plugin_problem=None):
    """What DALI hands the engine's backend for `framework`: "torch" (DALI's torch iterator:
    NCHW tensors, CUDA ones with mixed decoding, used by the trainer as they are),
    "tensorflow" (DALI's TF dataset, placed on /gpu:N with mixed decoding) when the TF plugin
    works, else "numpy" (NHWC host batches that the TF backend prefetches through tf.data)."""
    if framework == "torch":
        return "torch"
    problem = tf_plugin_problem() if plugin_problem is None else plugin_problem
    return "tensorflow" if not problem else "numpy"


def build_sources(cfg, rank, size, eval_batch=500):
    """(train source, eval source) for `hvdscale train` with data.kind imagefolder.

    DALI threads: train.threads, else this node's cores shared among the ranks on this node
    (the launcher's local size). Decoding follows data.decode; with mixed decoding images
    and labels stay on the GPU (see engine_output)."""
    import os

    from hvdscale.comm import launched_local_size

    threads = cfg.train.threads or max(1, (os.cpu_count() or 1) // launched_local_size(size))
    local = rank % max(1, gpu_count())
    per_step = cfg.batch.per_worker * cfg.batch.accumulation
    # the torch trainer runs convolutions channels_last: let DALI write NHWC memory
    common = dict(num_threads=threads, local_rank=local, channels_last=cfg.framework == "torch",
                  tf_backend="dali" if cfg.framework == "tensorflow" else "auto")
    output = engine_output(cfg.framework)
    train = build_train_loader(cfg.data, output, per_step, rank, size, seed=cfg.train.seed,
                               **common)
    evaluate = build_eval_loader(cfg.data, output, max(eval_batch, cfg.batch.per_worker), rank,
                                 size, seed=cfg.train.seed, **common)
    return EngineTrainSource(train), EngineEvalSource(evaluate)
