"""A plain PyTorch training loop on Horovod, with hvdscale used as a library.

    horovodrun -np 2 python examples/torch_horovod_lamb.py --optimizer lamb --epochs 2

Nothing here is hvdscale's trainer: the loop, the model and the data are the user's. hvdscale
supplies four pieces, each usable alone:
  - hvdscale.core.global_batch / scale_lr: the peak learning rate for the global batch
    (workers x batch x accumulation) from a rate tuned at a reference batch;
  - hvdscale.core.build_lr_schedule + hvdscale.torch.LRScheduleAdapter: warm-up and decay as a
    function of the update step, the same numbers `hvdscale train` uses;
  - hvdscale.torch.LAMB / LARS: layer-wise optimizers that horovod.torch.DistributedOptimizer
    wraps like any torch optimizer;
  - hvdscale.study.gns + gns_torch: the online gradient noise scale B_simple (McCandlish et al.
    2018) from this worker's micro-batch gradients and the allreduced one, one scalar
    allreduce per estimate.
With --out DIR, rank r writes DIR/rank<r>.json (losses, learning rates, noise-scale readings)
and DIR/rank<r>.pt (the final parameters) so a test can check the ranks agree.
"""
import argparse
import json
from pathlib import Path

import horovod.torch as hvd
import torch
import torch.nn.functional as F

from hvdscale.core import LRScheduleSpec, build_lr_schedule, global_batch, scale_lr
from hvdscale.data.fashion_mnist import MEAN, STD, load_fashion_mnist
from hvdscale.study.gns import OnlineNoiseScale
from hvdscale.study.gns_torch import LocalGradientProbe, grad_sq_norm
from hvdscale.torch import LAMB, LARS, LRScheduleAdapter


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--optimizer", choices=("lamb", "lars"), default="lamb")
    p.add_argument("--epochs", type=float, default=2)
    p.add_argument("--batch-size", type=int, default=64, help="per worker, per backward pass")
    p.add_argument("--accumulation", type=int, default=1, help="backward passes per update")
    p.add_argument("--base-lr", type=float, default=None,
                   help="lr tuned at --reference-batch (default: 1e-2 LAMB, 0.5 LARS)")
    p.add_argument("--reference-batch", type=int, default=64)
    p.add_argument("--train-rows", type=int, default=60000, help="use the first N images")
    p.add_argument("--noise-every", type=int, default=10, help="0 switches the estimate off")
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args()


def main():
    args = parse_args()
    hvd.init()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    rank, size = hvd.rank(), hvd.size()

    # data: every worker reads the file, keeps every size-th row (its shard)
    x, y, _, _ = load_fashion_mnist()
    x = (torch.from_numpy(x[:args.train_rows]).float() / 255.0 - MEAN) / STD
    y = torch.from_numpy(y[:args.train_rows])
    x, y = x[rank::size].unsqueeze(1), y[rank::size]

    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(32 * 7 * 7, 10))

    # hvdscale.core: the global batch and the peak learning rate for it
    accumulation, batch = args.accumulation, args.batch_size
    samples_per_update = batch * accumulation
    steps_per_epoch = len(x) // samples_per_update
    total_steps = max(1, int(args.epochs * steps_per_epoch))
    big_batch = global_batch(size, batch, accumulation)
    if args.optimizer == "lamb":   # Adam-type: square-root scaling
        base_lr = args.base_lr or 1e-2
        peak_lr = scale_lr(base_lr, args.reference_batch, big_batch, rule="sqrt")
        optimizer = LAMB(model.parameters(), lr=peak_lr, weight_decay=0.01)
    else:                          # SGD-type: linear scaling (Goyal et al.)
        base_lr = args.base_lr or 0.5
        peak_lr = scale_lr(base_lr, args.reference_batch, big_batch, rule="linear")
        optimizer = LARS(model.parameters(), lr=peak_lr, momentum=0.9, weight_decay=5e-4,
                         trust_coefficient=0.02)
    schedule = build_lr_schedule(
        LRScheduleSpec(warmup="linear", warmup_epochs=0.25, decay="polynomial", power=2.0),
        base_lr, peak_lr, steps_per_epoch, total_steps)

    # Horovod as usual: wrap, then start every worker from rank 0's state
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                         backward_passes_per_step=accumulation)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    # a fresh optimizer has no state to broadcast; after loading a checkpoint, also call
    # hvd.broadcast_optimizer_state (on a fresh LAMB it would take a zero-gradient step,
    # which weight decay turns into a real update)
    scheduler = LRScheduleAdapter(optimizer, schedule)   # lr = schedule(update step)

    # the noise scale needs two gradients of different batch sizes: one worker's micro-batch
    # and the allreduced one (so two workers, or accumulation >= 2)
    noise = None
    if args.noise_every and size * accumulation >= 2:
        noise = OnlineNoiseScale(
            args.noise_every, 0.9, batch, accumulation, size,
            average_across_workers=lambda v: hvd.allreduce(
                torch.tensor(v, dtype=torch.float64), op=hvd.Average, name="gns.small").item())
    params = [p for p in model.parameters() if p.requires_grad]
    probe = LocalGradientProbe(params)

    log = {"loss": [], "lr": [], "noise": [], "global_batch": big_batch, "peak_lr": peak_lr}
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))
    for step in range(total_steps):
        start = (step % steps_per_epoch) * samples_per_update
        rows = order[start:start + samples_per_update]
        due = False
        if noise is not None:
            noise.begin_step(accumulation)      # counts updates; due every --noise-every
            due = noise.due_now
        if due:
            probe.arm()        # records each backward pass's local gradient norm
        optimizer.zero_grad()
        loss_sum = 0.0
        for piece in rows.split(batch):
            loss = F.cross_entropy(model(x[piece]), y[piece]) / accumulation
            loss.backward()
            loss_sum += loss.item()
        log["lr"].append(optimizer.param_groups[0]["lr"])
        if due:
            optimizer.synchronize()                   # the allreduce has finished here
            big = grad_sq_norm(params)                # |allreduced gradient|^2
            with optimizer.skip_synchronize():
                optimizer.step()
            small = probe.collect([1.0 / accumulation] * accumulation)
            log["noise"].append(dict(noise.record(small, big), step=step))
        else:
            optimizer.step()
        scheduler.step()
        log["loss"].append(hvd.allreduce(torch.tensor(loss_sum), name="loss").item())
        if rank == 0 and (step + 1) % steps_per_epoch == 0:
            reading = log["noise"][-1]["b_simple"] if log["noise"] else None
            print(f"epoch {(step + 1) // steps_per_epoch}: loss {log['loss'][-1]:.4f} "
                  f"lr {log['lr'][-1]:.5f} B_simple {reading}", flush=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"rank{rank}.json").write_text(json.dumps(log))
        torch.save([p.detach() for p in model.parameters()], args.out / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
