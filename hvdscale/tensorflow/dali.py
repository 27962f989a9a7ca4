"""DALI's output for TensorFlow (this backend's `BackendInfo.dali`): DALI's TF dataset when
DALI's TF plugin works (on /gpu:N with mixed decoding), else the pipeline's host batches as
TF tensors; image folders may instead be read by tf.data (hvdscale.data.tfdata, the same
augmentations), by choice (`tf_backend: tfdata`) or when the plugin does not work."""
from hvdscale.data.dali.loader import DaliLoader, DaliOutput, HOST, reader_batches
from hvdscale.errors import ConfigError


def tf_plugin_problem():
    """None when DALI's TF plugin imports, else why not (one line)."""
    try:
        import nvidia.dali.plugin.tf  # noqa: F401
    except Exception as err:  # noqa: BLE001 -- any failure means: use tf.data
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return None


def folder_reader(choice, decode=None):
    """`tf_backend` auto | dali | tfdata -> what reads image folders: DALI's plugin when it
    works, else tf.data."""
    problem = tf_plugin_problem()
    if choice == "dali" and problem:
        raise ConfigError(f"DALI's TensorFlow plugin is not usable here ({problem})")
    if choice == "auto":
        return "dali" if problem is None else "tfdata"
    return choice


class HostTFLoader(DaliLoader):
    """The pipeline run by hand, its host batches as TF tensors (no DALI plugin needed)."""

    def _epoch(self):
        import tensorflow as tf

        for images, labels in self._host_batches():
            yield tf.convert_to_tensor(images), tf.convert_to_tensor(labels)


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

    def _epoch(self):
        import tensorflow as tf

        left = self.num_samples
        for step in range(reader_batches(self.pipe, self.batch_size)):
            with tf.device(self._device):
                images, labels = next(self._stream)
            keep = self.batch_size if self.train else min(self.batch_size, left)
            left -= keep
            if step >= self.steps_per_epoch or keep <= 0:
                continue
            yield images[:keep], tf.cast(tf.reshape(labels, [-1])[:keep], tf.int64)


class TensorFlowDaliOutput(DaliOutput):
    name = "tensorflow"

    def folder_loader(self, listing, *, train, spec, batch_size, rank, size, seed, num_threads,
                      fp16, channels, decode, tf_backend="auto", **options):
        if folder_reader(tf_backend, decode) != "tfdata":
            return None
        from hvdscale.data.tfdata import TFDataLoader
        return TFDataLoader(listing.files, listing.labels, train, spec, batch_size, rank, size,
                            seed, num_threads, fp16, channels)

    def loader(self, pipe, *, train, steps_per_epoch, num_samples, batch_size, uses_reader,
               fp16, device_id, image_shape, **options):
        args = (pipe, train, steps_per_epoch, num_samples, batch_size, uses_reader, fp16)
        if uses_reader and tf_plugin_problem() is None:
            return DaliTFLoader(*args, device_id=device_id, image_shape=image_shape)
        return HostTFLoader(*args)

    def for_engine(self):
        # DALI's TF dataset when the plugin works; else NumPy batches, which the TF
        # backend's device_batches prefetches through tf.data
        return (self if tf_plugin_problem() is None else HOST), {"tf_backend": "dali"}


OUTPUT = TensorFlowDaliOutput()
