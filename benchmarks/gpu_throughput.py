"""Per-worker training throughput of ResNet-50 (mixed precision, channels_last) on one GPU:

  (a) synthetic   hvdscale's torch trainer on random images already on the device (the ceiling)
  (b) dali        hvdscale's torch trainer fed by its DALI pipeline with mixed (GPU) decoding,
                  from a generated ImageNet-like JPEG folder (~500x375, quality 90)
  (c) peer        the same model in a plain PyTorch loop fed by a DataLoader with Pillow
                  decoding (RandomResizedCrop + flip in the workers), the usual baseline

Each is timed `--repeats` times over `--steps` steps after a warm-up, from the first step to
the device being idle (the trainer's statistics read / torch.cuda.synchronize). Prints a
table, then one JSON line with synthetic_img_s, dali_img_s, peer_img_s (medians),
real_over_synthetic (dali / synthetic), dali_over_peer and the spreads.

    .venv/bin/python benchmarks/gpu_throughput.py [--batch 256] [--out FILE.json]
    .venv/bin/python benchmarks/gpu_throughput.py --smoke      # tiny, runs on a CPU (tests)

--smoke uses resnet20 on 32-px crops of 64x48 JPEGs, a batch of 8 and a few steps; its numbers
only show that the three paths run.
"""
import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------- data
def _write_jpegs(job):
    """Worker: smooth random colour fields plus grain, like photos in JPEG size."""
    import numpy as np
    from PIL import Image

    paths, width, height, quality, seed = job
    rng = np.random.default_rng(seed)
    for path in paths:
        small = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((width, height), Image.BICUBIC)
        pixels = np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, (height, width, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=quality)


def make_jpeg_folder(root, count, width, height, classes=10, quality=90, processes=1):
    """ROOT/train/class_k/i.jpg (count images); returns ROOT."""
    from multiprocessing import Pool

    root = Path(root)
    paths = []
    for i in range(count):
        folder = root / "train" / f"class_{i % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        paths.append(folder / f"{i:06d}.jpg")
    chunks = [paths[i::max(1, processes)] for i in range(max(1, processes))]
    jobs = [(chunk, width, height, quality, 1000 + k) for k, chunk in enumerate(chunks)]
    if processes > 1:
        with Pool(processes) as pool:
            pool.map(_write_jpegs, jobs)
    else:
        for job in jobs:
            _write_jpegs(job)
    return root


class PillowImages:
    """The peer's dataset: decode with Pillow, RandomResizedCrop(size) + flip, normalise."""

    def __init__(self, root, size):
        self.files = sorted(Path(root, "train").glob("*/*.jpg"))
        classes = sorted({f.parent.name for f in self.files})
        self.labels = [classes.index(f.parent.name) for f in self.files]
        self.size = size

    def __len__(self):
        return len(self.files)

    def _crop_box(self, width, height):
        area = width * height
        for _ in range(10):
            target = area * random.uniform(0.08, 1.0)
            ratio = math.exp(random.uniform(math.log(3 / 4), math.log(4 / 3)))
            w = int(round(math.sqrt(target * ratio)))
            h = int(round(math.sqrt(target / ratio)))
            if 0 < w <= width and 0 < h <= height:
                left, top = random.randint(0, width - w), random.randint(0, height - h)
                return left, top, left + w, top + h
        side = min(width, height)
        return (width - side) // 2, (height - side) // 2, (width + side) // 2, (height + side) // 2

    def __getitem__(self, index):
        import numpy as np
        import torch
        from PIL import Image

        with Image.open(self.files[index]) as img:
            img = img.convert("RGB")
            img = img.resize((self.size, self.size), Image.BILINEAR,
                             box=self._crop_box(*img.size))
        if random.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
        x = (x - torch.tensor(MEAN)) / torch.tensor(STD)
        return x.permute(2, 0, 1).contiguous(), self.labels[index]


# ---------------------------------------------------------------------------- ours
def ours_config(args, data_path):
    from hvdscale.config import config_from_dict

    return config_from_dict({
        "name": "gpu_throughput", "framework": "torch",
        "model": {"name": args.model},
        "data": {"kind": "imagefolder", "path": str(data_path), "image_size": args.image_size,
                 "num_classes": args.classes, "channels": 3, "decode": "auto"},
        "batch": {"per_worker": args.batch, "reference": args.batch},
        "optimizer": {"name": "sgd", "base_lr": 0.1, "momentum": 0.9, "weight_decay": 5e-5},
        "lr": {"warmup": "none", "decay": "constant"},
        "train": {"precision": args.precision, "threads": args.threads, "epochs": 1},
        "log": {"progress": False, "tensorboard": False},
    })


def timed_runs(step, finish, args):
    """Images/s of `repeats` runs of `steps` steps after `warmup` steps (first run only)."""
    for _ in range(args.warmup):
        step()
    finish()
    rates = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        finish()
        rates.append(args.batch * args.steps / (time.perf_counter() - t0))
    return rates


def endless(loader):
    while True:
        yield from loader


def run_ours(args, data_path, which):
    import torch
    from hvdscale.comm import Comm
    from hvdscale.torch.trainer import TorchTrainer

    cfg = ours_config(args, data_path)
    trainer = TorchTrainer(cfg, Comm("torch"), args.threads)
    trainer.build()
    if which == "synthetic":
        x = torch.randn(args.batch, 3, args.image_size, args.image_size)
        y = torch.randint(0, args.classes, (args.batch,))
        batch = next(trainer.device_batches([(x, y)]))      # on the device once
        batches = iter(lambda: batch, None)
    else:
        from hvdscale.data import dali
        on_gpu = dali.decode_device("auto") == "mixed"
        loader = dali.build_train_loader(cfg.data, "torch", args.batch, 0, 1, seed=0,
                                         num_threads=args.threads, local_rank=0,
                                         channels_last=on_gpu, check="name")
        batches = trainer.device_batches(endless(loader))
    return timed_runs(lambda: trainer.train_step(next(batches), 0.1), trainer.read_stats, args)


# ---------------------------------------------------------------------------- peer
def run_peer(args, data_path):
    import torch
    import torch.nn.functional as F
    from hvdscale.torch.models import build_model

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    torch.manual_seed(0)
    model = build_model(args.model, args.classes, 3, args.image_size).to(device)
    if cuda:
        torch.backends.cudnn.benchmark = True
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-5)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    scaler = torch.amp.GradScaler("cuda") if args.precision == "fp16" else None
    loader = torch.utils.data.DataLoader(
        PillowImages(data_path, args.image_size), batch_size=args.batch, shuffle=True,
        drop_last=True, num_workers=args.loader_workers, pin_memory=cuda,
        persistent_workers=args.loader_workers > 0,
        prefetch_factor=4 if args.loader_workers > 0 else None)
    batches = endless(loader)

    def step():
        x, y = next(batches)
        x = x.to(device, non_blocking=True)
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(x).float(), y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()

    finish = torch.cuda.synchronize if cuda else (lambda: None)
    return timed_runs(step, finish, args)


# ---------------------------------------------------------------------------- driver
def summarise(rates):
    if not rates:
        return None
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates),
            "runs": [round(r, 2) for r in rates]}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny CPU version (tests)")
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--precision", default=None, choices=("fp32", "bf16", "fp16"),
                   help="default: bf16 (autocast; on a GPU no loss scaler is needed)")
    p.add_argument("--images", type=int, default=4000, help="JPEGs to generate")
    p.add_argument("--jpeg-size", default="500x375")
    p.add_argument("--jpeg-dir", default=None, help="reuse/create the JPEG folder here")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=15)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="DALI / torch CPU threads")
    p.add_argument("--loader-workers", type=int, default=None, help="the peer's DataLoader")
    p.add_argument("--skip", default="", help="comma list of paths not to run: dali,peer")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    if args.smoke:
        args.model, args.batch, args.image_size, args.classes = "resnet20", 8, 32, 10
        args.images, args.jpeg_size, args.steps, args.warmup = 48, "64x48", 3, 1
        args.repeats = 1
        args.loader_workers = 0 if args.loader_workers is None else args.loader_workers
    args.precision = args.precision or "bf16"
    args.threads = args.threads or max(1, cores)
    if args.loader_workers is None:
        args.loader_workers = max(1, cores - 1)
    return args


def main(argv=None):
    args = parse(argv)
    import torch

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else "cpu"
    if not cuda:
        torch.set_num_threads(args.threads)
    width, height = (int(v) for v in args.jpeg_size.split("x"))
    tmp = None
    if args.jpeg_dir and Path(args.jpeg_dir, "train").is_dir():
        data_path = Path(args.jpeg_dir)
    else:
        if args.jpeg_dir is None:
            tmp = tempfile.TemporaryDirectory(prefix="gpu-throughput-")
        data_path = make_jpeg_folder(args.jpeg_dir or tmp.name, args.images, width, height,
                                     classes=args.classes, processes=min(8, args.threads))
    skip = {s for s in args.skip.split(",") if s}
    results, notes = {}, {}
    results["synthetic"] = run_ours(args, data_path, "synthetic")
    for name, run in (("dali", lambda: run_ours(args, data_path, "dali")),
                      ("peer", lambda: run_peer(args, data_path))):
        if name in skip:
            notes[name] = "skipped"
            continue
        try:
            results[name] = run()
        except ImportError as err:       # e.g. no DALI in this environment
            notes[name] = f"{type(err).__name__}: {err}"
    stats = {k: summarise(v) for k, v in results.items()}
    med = lambda k: stats[k]["median"] if stats.get(k) else None
    syn, dal, peer = med("synthetic"), med("dali"), med("peer")
    result = {
        "device": device, "model": args.model, "batch": args.batch,
        "image_size": args.image_size, "precision": args.precision,
        "channels_last": cuda, "images": args.images, "jpeg_size": args.jpeg_size,
        "steps": args.steps, "repeats": args.repeats, "smoke": args.smoke,
        "synthetic_img_s": syn, "dali_img_s": dal, "peer_img_s": peer,
        "real_over_synthetic": dal / syn if dal and syn else None,
        "dali_over_peer": dal / peer if dal and peer else None,
        "spread": stats, "notes": notes,
    }
    rows = [("synthetic (ceiling)", stats.get("synthetic")), ("dali, ours", stats.get("dali")),
            ("peer: DataLoader+Pillow", stats.get("peer"))]
    print(f"{args.model} batch {args.batch} {args.image_size}px {args.precision} on {device}")
    for label, s in rows:
        text = (f"{s['median']:9.1f} img/s  (min {s['min']:.1f}, max {s['max']:.1f})"
                if s else "   -")
        print(f"  {label:<24} {text}")
    if result["real_over_synthetic"] is not None:
        print(f"  dali / synthetic = {result['real_over_synthetic']:.3f}")
    if tmp is not None:
        tmp.cleanup()
    line = json.dumps(result)
    if args.out:
        Path(args.out).write_text(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
