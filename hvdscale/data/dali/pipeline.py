"""The DALI pipeline definition: augmentation settings, where decoding runs, and the two graphs
(image files through DALI's file reader; in-memory arrays through an external source).

Both graphs end in one crop_mirror_normalize writing the layout the framework's output asks
for (CHW, or HWC for NHWC tensors and torch's channels_last), float32 or float16."""
from dataclasses import dataclass

from hvdscale.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)     # of pixels scaled to [0, 1]
IMAGENET_STD = (0.229, 0.224, 0.225)
READER = "Reader"                          # the file reader's name, for reader_meta()
DECODES = ("auto", "cpu", "mixed")
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


def _normalise(fn, types, images, spec, layout, fp16, mirror):
    return fn.crop_mirror_normalize(
        images, crop=(spec.image_size, spec.image_size), mirror=mirror,
        mean=[255.0 * m for m in spec.mean], std=[255.0 * s for s in spec.std],
        dtype=types.FLOAT16 if fp16 else types.FLOAT, output_layout=layout)


def folder_graph(files, labels, shard_id, num_shards, train, spec, decode, layout, fp16,
                 channels=3):
    """Image files -> (images, labels): DALI's sharded file reader, decoding (of the crop
    window only, when training), augmentation, normalisation."""
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


def array_graph(source, train, spec, layout, fp16, on_gpu):
    """uint8 NHWC batches from `source` (inputs.ArrayEpochs) -> augmented, normalised."""
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


def build_pipeline(graph, batch_size, num_threads, device_id, seed, **kwargs):
    """A built DALI pipeline running `graph(**kwargs)`."""
    from nvidia.dali import pipeline_def

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                  prefetch_queue_depth=2, exec_dynamic=True)
    def pipe():
        return graph(**kwargs)

    pipe = pipe()
    pipe.build()
    return pipe
