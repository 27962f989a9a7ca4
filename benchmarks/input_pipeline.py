"""Images/s of the training input pipeline: hvdscale's DALI pipeline against a PyTorch
DataLoader doing the same work with Pillow, on the same JPEGs, with the same CPU budget.

Both do: decode JPEG -> random-resized-crop (area 8..100 %, aspect 3/4..4/3) to SIZE ->
random horizontal flip -> normalise (ImageNet mean/std) -> float32 NCHW torch batch.
DALI runs `--threads` CPU threads; the DataLoader runs `--threads` worker processes. The first
epoch of each is a warm-up and is not timed. With a GPU visible, DALI's mixed (GPU) decoding is
measured as well.

    python benchmarks/input_pipeline.py [--images 1024] [--width 400 --height 350] [--threads 2]

The last line printed is one JSON object: dali_img_s, dataloader_img_s, ratio (DALI / DataLoader).
"""
import argparse
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255
STD = np.array([0.229, 0.224, 0.225], np.float32) * 255


def make_jpegs(root, count, width, height, seed=0, quality=90):
    """Photograph-like RGB JPEGs in 10 class folders: smooth colour fields plus sensor-like
    noise, so they cost what camera JPEGs of that size cost to decode."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for i in range(count):
        folder = Path(root, "train", f"c{i % 10}")
        folder.mkdir(parents=True, exist_ok=True)
        planes = []
        for _ in range(3):
            fx, fy, phase = rng.uniform(0.5, 4.0, 2).tolist() + [rng.uniform(0, 6.3)]
            planes.append(127 + 90 * np.sin(xx / width * fx * 6.28 + phase)
                          * np.cos(yy / height * fy * 6.28))
        pixels = np.stack(planes, -1) + rng.normal(0, 10, (height, width, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
            folder / f"{i:05d}.jpg", quality=quality)
    return Path(root)


class PilImageFolder:
    """The DataLoader side: Pillow decode, random-resized-crop, flip, normalise."""

    def __init__(self, files, labels, size):
        self.files, self.labels, self.size = files, labels, size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        import torch
        from PIL import Image

        with Image.open(self.files[index]) as img:
            img = img.convert("RGB")
            box = random_resized_box(img.width, img.height)
            img = img.resize((self.size, self.size), Image.BILINEAR, box=box)
        if random.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        x = (np.asarray(img, np.float32) - MEAN) / STD
        return torch.from_numpy(x.transpose(2, 0, 1).copy()), int(self.labels[index])


def random_resized_box(width, height, area=(0.08, 1.0), ratio=(3 / 4, 4 / 3), attempts=10):
    """The crop box torchvision's RandomResizedCrop samples (same area and log-ratio ranges)."""
    total = width * height
    for _ in range(attempts):
        target = total * random.uniform(*area)
        aspect = math.exp(random.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            x0, y0 = random.randint(0, width - w), random.randint(0, height - h)
            return (x0, y0, x0 + w, y0 + h)
    side = min(width, height)      # fallback: centre square
    x0, y0 = (width - side) // 2, (height - side) // 2
    return (x0, y0, x0 + side, y0 + side)


def images_per_second(loader, epochs):
    """Warm-up epoch, then `epochs` timed epochs; returns (img/s, images timed)."""
    for _ in loader:
        pass
    count, start = 0, time.perf_counter()
    for _ in range(epochs):
        for images, labels in loader:
            count += len(labels)
    return count / (time.perf_counter() - start), count


def measure_dali(root, args, decode):
    from hvdscale.data.dali import Augment, build_train_loader

    cfg = SimpleNamespace(kind="imagefolder", path=str(root), image_size=args.size,
                          num_classes=10, skip_corrupt=False, decode=decode,
                          train_limit=None, test_limit=None)
    spec = Augment(args.size, crop_area=(0.08, 1.0))
    loader = build_train_loader(cfg, "torch", args.batch, 0, 1, seed=0,
                                num_threads=args.threads, augment=spec)
    return images_per_second(loader, args.epochs)


def measure_dataloader(root, args):
    import torch

    from hvdscale.data.imagefolder import list_images

    listing = list_images(Path(root, "train"))
    data = PilImageFolder(listing.files, listing.labels, args.size)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch, shuffle=True,
                                         num_workers=args.threads, drop_last=True,
                                         persistent_workers=True, prefetch_factor=2)
    return images_per_second(loader, args.epochs)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--width", type=int, default=400)
    parser.add_argument("--height", type=int, default=350)
    parser.add_argument("--size", type=int, default=224, help="crop side")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2,
                        help="DALI CPU threads = DataLoader workers")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs after one warm-up")
    parser.add_argument("--repeats", type=int, default=2, help="alternate the two pipelines "
                        "this many times and keep each one's best (the machine is shared)")
    parser.add_argument("--data", default=None, help="existing folder with train/ (default: "
                        "generate --images JPEGs in a temporary folder)")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    torch.set_num_threads(1)
    from hvdscale.data.dali import gpu_count

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data) if args.data else make_jpegs(tmp, args.images, args.width,
                                                            args.height)
        runs = {"dali cpu": lambda: measure_dali(root, args, "cpu"),
                "dataloader+pil": lambda: measure_dataloader(root, args)}
        if gpu_count() > 0:
            runs["dali mixed (gpu)"] = lambda: measure_dali(root, args, "mixed")
        rows = {}
        for _ in range(args.repeats):
            for name, run in runs.items():
                rows[name] = max(rows.get(name, (0.0, 0)), run())
    peer = rows["dataloader+pil"][0]
    print(f"input pipeline: decode + random-resized-crop {args.size} + flip + normalise, "
          f"{args.images if not args.data else 'given'} JPEGs {args.width}x{args.height}, "
          f"batch {args.batch}, {args.threads} threads/workers, {os.cpu_count()} cores, "
          f"best of {args.repeats}")
    print(f"{'pipeline':<20} {'img/s':>9} {'images timed':>13} {'vs DataLoader':>14}")
    for name, (rate, count) in rows.items():
        print(f"{name:<20} {rate:9.1f} {count:13d} {rate / peer:13.2f}x")
    result = {"dali_img_s": round(rows["dali cpu"][0], 1), "dataloader_img_s": round(peer, 1),
              "ratio": round(rows["dali cpu"][0] / peer, 2), "threads": args.threads,
              "images": args.images, "jpeg": f"{args.width}x{args.height}", "crop": args.size,
              "cores": os.cpu_count(), "machine": platform.machine()}
    if "dali mixed (gpu)" in rows:
        result["dali_mixed_img_s"] = round(rows["dali mixed (gpu)"][0], 1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
