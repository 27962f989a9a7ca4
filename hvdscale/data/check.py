"""`hvdscale data check`: what is in an image directory before a long run reads it."""
from pathlib import Path

import numpy as np

from hvdscale.data.imagefolder import image_size, list_images
from hvdscale.errors import DataError


def check_split(split_root, threads=1):
    """Class counts, unreadable files (fully decoded by Pillow) and image-size statistics."""
    listing = list_images(split_root, check="decode", skip_corrupt=True, threads=threads)
    counts = {name: int(np.sum(listing.labels == k)) for k, name in enumerate(listing.classes)}
    sizes = np.array([image_size(path) for path in listing.files], dtype=np.int64)  # (w, h)
    shorter = sizes.min(axis=1)
    return {
        "root": str(listing.root),
        "images": len(listing),
        "classes": len(listing.classes),
        "class_counts": counts,
        "unreadable": [{"file": path, "problem": why} for path, why in listing.skipped],
        "width": _stats(sizes[:, 0]),
        "height": _stats(sizes[:, 1]),
        "shorter_side": _stats(shorter),
    }


def _stats(values):
    return {"min": int(values.min()), "median": float(np.median(values)),
            "mean": round(float(values.mean()), 1), "max": int(values.max())}


def check_directory(path, threads=1):
    """Reports for `path/train` and `path/val` when present, else for `path` as one split."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"image directory not found: {root}")
    splits = [s for s in ("train", "val") if (root / s).is_dir()]
    if not splits:
        return {root.name or str(root): check_split(root, threads)}
    return {split: check_split(root / split, threads) for split in splits}


def format_report(reports):
    lines = []
    for split, rep in reports.items():
        lines.append(f"{split}: {rep['images']} images in {rep['classes']} classes ({rep['root']})")
        counts = rep["class_counts"].values()
        lines.append(f"  per class: min {min(counts)}, max {max(counts)}")
        for name, count in rep["class_counts"].items():
            lines.append(f"    {name:<24} {count}")
        for key in ("width", "height", "shorter_side"):
            s = rep[key]
            lines.append(f"  {key:<13} min {s['min']}  median {s['median']:g}  mean {s['mean']:g}  "
                         f"max {s['max']}")
        lines.append(f"  unreadable: {len(rep['unreadable'])}")
        for bad in rep["unreadable"]:
            lines.append(f"    {bad['file']}: {bad['problem']}")
    return "\n".join(lines)
