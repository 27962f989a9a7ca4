"""Worker for test_noise_scale_multiproc.py: one data-parallel step with Horovod's
DistributedOptimizer (in-place async allreduce, 2 accumulated micro-batches per rank) and the
online noise-scale helper; writes what the helper logged plus the rank's data."""
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import horovod.torch as hvd
import torch

from hvdscale.comm import Comm
from hvdscale.study.gns_torch import TorchNoiseScale


def model_and_data(rank):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(16, 6, generator=gen)
    y = torch.zeros(16, dtype=torch.long)   # one class: a consistent gradient, |G|^2 > 0
    y[: 4 + rank] = torch.randint(0, 3, (4 + rank,), generator=gen)
    return model, x, y


def main(out):
    hvd.init()
    torch.set_num_threads(1)
    model, x, y = model_and_data(hvd.rank())
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                   named_parameters=model.named_parameters(),
                                   backward_passes_per_step=2)
    noise = TorchNoiseScale(SimpleNamespace(every=1, ema=0.0),
                            SimpleNamespace(per_worker=8, accumulation=2), Comm("torch", hvd), model)
    pieces = noise.micro_batches(2)
    for xb, yb in zip(x.chunk(pieces), y.chunk(pieces)):
        (torch.nn.functional.cross_entropy(model(xb), yb) / pieces).backward()
    log = noise.step(opt, [1 / pieces] * pieces)
    Path(out, f"rank{hvd.rank()}.json").write_text(json.dumps(
        {"rank": hvd.rank(), "size": hvd.size(), "pieces": pieces, "log": log,
         "b_small": noise.online.b_small, "b_big": noise.online.b_big}))


if __name__ == "__main__":
    main(sys.argv[1])
