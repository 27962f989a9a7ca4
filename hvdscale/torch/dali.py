"""DALI's output for PyTorch (this backend's `BackendInfo.dali`): DALI's torch iterator, NCHW
tensors (CUDA ones with mixed decoding) that the trainer uses as they are."""
from hvdscale.data.dali.loader import DaliLoader, DaliOutput
from hvdscale.data.dali.pipeline import READER
from hvdscale.errors import DataError


class TorchDaliLoader(DaliLoader):
    """Batches from DALIGenericIterator; with channels_last the pipeline writes HWC and each
    batch is handed out as an NCHW view of that memory (torch.channels_last), not copied."""

    layout = "NCHW"

    def __init__(self, *args, channels_last=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.channels_last = channels_last
        self._iterator = None

    def _epoch(self):
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


class TorchDaliOutput(DaliOutput):
    name = "torch"

    def pipeline_layout(self, channels_last=False):
        return "HWC" if channels_last else "CHW"

    def loader(self, pipe, *, train, steps_per_epoch, num_samples, batch_size, uses_reader,
               fp16, device_id, image_shape, channels_last=False, **options):
        return TorchDaliLoader(pipe, train, steps_per_epoch, num_samples, batch_size,
                               uses_reader, fp16, channels_last=channels_last)

    def for_engine(self):
        # the trainer runs convolutions channels_last: let DALI write NHWC memory
        return self, {"channels_last": True}


OUTPUT = TorchDaliOutput()
