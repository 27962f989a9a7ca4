"""The image-folder pipeline in tf.data, for TensorFlow where DALI's TF plugin is not installed.

Same augmentations as hvdscale.data.dali (random-resized-crop + flip for training; resize the
shorter side and centre-crop for evaluation; the same normalisation, NHWC, optional fp16) and
the same counts: training runs floor(floor(N/size)/batch) full batches on every rank;
evaluation reads every image exactly once across ranks. Sharding is
hvdscale.data.sharding.shard_indices (a seeded reshuffle per epoch), and the random crops and
flips are stateless functions of (seed, rank, epoch, position), so a run is reproducible.
"""
import math

import numpy as np


class TFDataLoader:
    """This rank's batches of one split; each iteration is one epoch (see module doc)."""

    layout = "NHWC"

    def __init__(self, files, labels, train, spec, batch_size, rank, size, seed, num_threads=1,
                 fp16=False, channels=3):
        from hvdscale.data.sharding import shard_indices

        self._shard = shard_indices
        self.files = np.asarray(files)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.train, self.spec, self.batch_size = train, spec, batch_size
        self.rank, self.size, self.seed = rank, size, seed
        self.num_threads, self.fp16, self.epoch = num_threads, fp16, 0
        self.channels = channels
        n_rank = len(self._indices(0))
        self.steps_per_epoch = n_rank // batch_size if train else math.ceil(n_rank / batch_size)
        self.num_samples = self.steps_per_epoch * batch_size if train else n_rank

    def __len__(self):
        return self.steps_per_epoch

    def _indices(self, epoch):
        return self._shard(len(self.labels), self.rank, self.size, epoch=epoch, seed=self.seed,
                           shuffle=self.train, drop_last=self.train)

    def __iter__(self):
        dataset = self.epoch_dataset(self.epoch)
        self.epoch += 1
        yield from dataset

    def epoch_dataset(self, epoch):
        import tensorflow as tf

        idx = self._indices(epoch)[: self.num_samples]
        ds = tf.data.Dataset.from_tensor_slices((self.files[idx], self.labels[idx]))
        base = np.int64(self.seed) * 1_000_003 + self.rank * 10_007 + epoch
        ds = ds.enumerate().map(
            lambda i, pair: self._load(pair[0], pair[1], tf.stack([base, i])),
            num_parallel_calls=self.num_threads, deterministic=True)
        ds = ds.batch(self.batch_size, drop_remainder=self.train).prefetch(2)
        options = tf.data.Options()
        options.threading.private_threadpool_size = self.num_threads
        return ds.with_options(options)

    def _load(self, path, label, seed):
        import tensorflow as tf

        spec = self.spec
        image = tf.io.decode_image(tf.io.read_file(path), channels=self.channels,
                                    expand_animations=False)
        size = spec.image_size
        if self.train:
            begin, crop, _ = tf.image.stateless_sample_distorted_bounding_box(
                tf.shape(image), bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
                seed=seed, area_range=spec.crop_area, aspect_ratio_range=spec.crop_aspect,
                max_attempts=10, use_image_if_no_bounding_boxes=True)
            image = tf.slice(image, begin, crop)
            image = tf.image.resize(image, (size, size), method="bilinear", antialias=True)
            if spec.flip:
                image = tf.image.stateless_random_flip_left_right(image, seed=seed + 1)
        else:
            shape = tf.cast(tf.shape(image)[:2], tf.float32)
            scale = spec.eval_resize / tf.reduce_min(shape)
            new = tf.cast(tf.round(shape * scale), tf.int32)
            image = tf.image.resize(image, new, method="bilinear", antialias=True)
            top = (new[0] - size) // 2
            left = (new[1] - size) // 2
            image = image[top:top + size, left:left + size, :]
        mean = tf.constant([255.0 * m for m in spec.mean], tf.float32)
        std = tf.constant([255.0 * s for s in spec.std], tf.float32)
        image = tf.clip_by_value(tf.cast(image, tf.float32), 0.0, 255.0)
        image = (image - mean) / std
        image = tf.ensure_shape(image, (size, size, self.channels))
        return tf.cast(image, tf.float16 if self.fp16 else tf.float32), label
