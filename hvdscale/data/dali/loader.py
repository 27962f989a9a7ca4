"""Loaders over a built pipeline, and what a framework makes of them.

A loader is this rank's batches of one split: each iteration is one epoch of exactly
`steps_per_epoch` (images, labels) batches; `num_samples` is how many real images this rank
sees in it. The base loader hands out NHWC NumPy batches (evaluation: the reader's padding
trimmed; training: the epoch's tail drained and dropped, as DALI's framework iterators do).

`DaliOutput` is what one framework turns a pipeline into. The base class is the NumPy output
(`framework="numpy"`); each backend registers its own subclass as `BackendInfo.dali`
(hvdscale/torch/dali.py: DALI's torch iterator; hvdscale/tensorflow/dali.py: DALI's TF
dataset, or tf.data where DALI's TF plugin does not work), so this package never names a
framework.
"""
import math
from typing import Any, Dict, Optional, Tuple

import numpy as np

from hvdscale.data.dali.pipeline import READER
from hvdscale.errors import DataError


class DaliLoader:
    """This rank's batches of one split from a built pipeline (see the module doc)."""

    layout = "NHWC"
    channels_last = False

    def __init__(self, pipe, train, steps_per_epoch, num_samples, batch_size, uses_reader,
                 fp16=False):
        self.pipe, self.train = pipe, train
        self.steps_per_epoch, self.num_samples = steps_per_epoch, num_samples
        self.batch_size, self.fp16 = batch_size, fp16
        self._uses_reader = uses_reader
        self._files = None            # set for folder pipelines, to name a file DALI cannot read

    def __len__(self):
        return self.steps_per_epoch

    def __iter__(self):
        try:
            yield from self._epoch()
        except RuntimeError as err:
            raise self._decode_error(err) from None

    def _epoch(self):
        """One epoch in this loader's output (here: NumPy)."""
        return self._host_batches()

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
                yield host_array(images), host_array(labels).reshape(-1).astype(np.int64)
        left = self.num_samples
        for step in range(reader_batches(self.pipe, self.batch_size)):
            images, labels = self.pipe.run()
            keep = self.batch_size if self.train else min(self.batch_size, left)
            left -= keep
            if step >= self.steps_per_epoch or keep <= 0:
                continue            # drain the rest of this epoch so the next starts fresh
            yield host_array(images)[:keep], host_array(labels).reshape(-1)[:keep].astype(np.int64)

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


def reader_batches(pipe, batch_size):
    """Batches the padded reader gives each shard per epoch: its largest shard, rounded up."""
    meta = pipe.reader_meta(READER)
    return math.ceil(meta["epoch_size_padded"] / meta["number_of_shards"] / batch_size)


def host_array(tensor_list):
    """A DALI TensorList (CPU or GPU) as one NumPy array."""
    if hasattr(tensor_list, "as_cpu"):
        tensor_list = tensor_list.as_cpu()
    return tensor_list.as_array()


class DaliOutput:
    """What a framework makes of a DALI pipeline. This base is the NumPy output: NHWC host
    batches. A backend's subclass (its `BackendInfo.dali`) overrides what differs.

    Options a loader builder passes on (`**options`): channels_last (torch: NCHW-shaped
    tensors in NHWC memory), tf_backend (TensorFlow: auto | dali | tfdata); an output uses
    those that apply to it."""

    name = "numpy"

    def pipeline_layout(self, channels_last: bool = False) -> str:
        """The layout the pipeline writes each image in: HWC or CHW."""
        return "HWC"

    def folder_loader(self, listing: Any, **settings: Any) -> Optional[Any]:
        """A loader that reads `listing` without DALI, or None to use the DALI pipeline.
        `settings`: train, spec, batch_size, rank, size, seed, num_threads, fp16, channels,
        decode, and the options."""
        return None

    def loader(self, pipe: Any, *, train: bool, steps_per_epoch: int, num_samples: int,
               batch_size: int, uses_reader: bool, fp16: bool, device_id: Optional[int],
               image_shape: Tuple[int, int, int], **options: Any) -> DaliLoader:
        """This output's loader over a built pipeline."""
        return DaliLoader(pipe, train, steps_per_epoch, num_samples, batch_size, uses_reader,
                          fp16)

    def for_engine(self) -> Tuple["DaliOutput", Dict[str, Any]]:
        """The output and options `hvdscale train` reads DALI with for this framework."""
        return self, {}


HOST = DaliOutput()
