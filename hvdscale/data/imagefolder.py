"""Image directories in the ImageNet layout (`<split>/<class>/<image>`): listing them with
clear errors, and writing one from Fashion-MNIST so the JPEG path has real data to read.

Labels are the positions of the class folders in sorted order, so every rank and every
framework maps a folder to the same label without any extra metadata file.
"""
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hvdscale.errors import DataError

CHECKS = ("name", "markers", "decode")
# (start bytes, bytes that must occur near the end or None, format name)
SIGNATURES = ((b"\xff\xd8\xff", b"\xff\xd9", "JPEG"), (b"\x89PNG\r\n\x1a\n", b"IEND", "PNG"),
              (b"BM", None, "BMP"), (b"II*\x00", None, "TIFF"), (b"MM\x00*", None, "TIFF"),
              (b"RIFF", None, "WebP"))
TAIL_BYTES = 64    # encoders may pad a few bytes after the end marker
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
FASHION_MNIST_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat",
                         "sandal", "shirt", "sneaker", "bag", "ankle-boot")


@dataclass
class ImageList:
    """The images of one split: paths (absolute, sorted by class then name) and labels."""
    root: Path
    classes: list
    files: list
    labels: np.ndarray                       # int32 [N], index into `classes`
    skipped: list = field(default_factory=list)   # unreadable files left out (skip_corrupt)

    def __len__(self):
        return len(self.files)


def split_dir(path, split):
    """`path/split` of an ImageNet-layout directory, or a DataError naming what is missing."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"image directory not found: {root}")
    sub = root / split
    if not sub.is_dir():
        raise DataError(f"image directory {root} has no '{split}' folder "
                        f"(expected {root}/{split}/<class>/<image>)")
    return sub


def list_images(split_root, check="markers", skip_corrupt=False, threads=1):
    """Every image under `split_root/<class>/`, labelled by sorted class-folder position.

    A missing folder, a folder without class sub-folders and an empty class folder are errors
    naming the folder. Each file is checked to the level `check`: "name" (suffix only),
    "markers" (suffix, then the format's start and end markers: catches non-images and
    truncated files while reading a few bytes), "decode" (Pillow decodes every file: finds
    everything, costs a full decode). A bad file is an error naming it, or is left out and
    recorded in `skipped` when `skip_corrupt` is set.
    """
    if check not in CHECKS:
        raise ValueError(f"check must be one of {CHECKS}, not {check!r}")
    root = Path(split_root)
    if not root.is_dir():
        raise DataError(f"image directory not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: no class folders (expected {root}/<class>/<image>)")
    candidates = []
    for label, name in enumerate(classes):
        folder = root / name
        entries = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        if not entries:
            raise DataError(f"{folder}: empty class folder")
        candidates += [(path, label) for path in entries]
    probe = {"name": _suffix_problem, "markers": marker_problem, "decode": decode_problem}[check]
    if threads > 1:
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(threads) as pool:   # Pillow and file reads release the GIL
            problems = list(pool.map(probe, [path for path, _ in candidates]))
    else:
        problems = [probe(path) for path, _ in candidates]
    files, labels, skipped = [], [], []
    for (path, label), problem in zip(candidates, problems):
        if problem is None:
            files.append(str(path.resolve()))
            labels.append(label)
        elif skip_corrupt:
            skipped.append((str(path), problem))
        else:
            raise DataError(f"{path}: {problem} (data.skip_corrupt: true skips such files)")
    if not files:
        raise DataError(f"{root}: no readable images")
    return ImageList(root, classes, files, np.asarray(labels, dtype=np.int32), skipped)


def _suffix_problem(path):
    if Path(path).suffix.lower() not in IMAGE_SUFFIXES:
        return f"not an image file (suffix {Path(path).suffix or 'none'})"
    return None


def marker_problem(path):
    """None when `path` starts and ends like an image of its format, else a short reason.

    Reads 16 bytes at each end: JPEG must start with SOI and end with EOI, PNG with its
    signature and IEND chunk; other formats are checked by their signature only.
    """
    problem = _suffix_problem(path)
    if problem:
        return problem
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
            fh.seek(0, 2)
            length = fh.tell()
            fh.seek(max(0, length - TAIL_BYTES))
            tail = fh.read()
    except OSError as err:
        return f"cannot read ({err.strerror or err})"
    if length == 0:
        return "empty file"
    for magic, trailer, name in SIGNATURES:
        if head.startswith(magic):
            if trailer is not None and trailer not in tail:
                return f"truncated {name} (no end marker)"
            if name == "JPEG":
                return jpeg_header_problem(path)
            return None
    return "not a readable image (unknown file header)"


# JPEG markers without a length field, and the frame headers (SOF0-3, 5-7, 9-11, 13-15)
_STANDALONE = {0x01, *range(0xD0, 0xD8)}
_FRAMES = {*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0)}


def jpeg_header_problem(path):
    """None when the JPEG's header is a well-formed chain of marker segments from SOI to the
    first scan (SOS) with a frame header of non-zero size, else a short reason.

    Bytes that are not a marker where one must start ("garbage between markers") are
    skipped by Pillow's decoder with a warning, but crashed DALI's CPU decoder with a
    segmentation fault (a crash no exception handler can catch, which took the rank down
    unnamed). Reading the header segments costs a few small reads per file."""
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, 2)
            offset, frame = 2, False
            while True:
                fh.seek(offset)
                head = fh.read(4)
                if len(head) < 2:
                    return "JPEG header ends before the image data"
                if head[0] != 0xFF:
                    return f"JPEG header: garbage where a marker must start (byte {offset})"
                marker = head[1]
                if marker == 0xFF:          # fill byte before a marker
                    offset += 1
                    continue
                if marker in _STANDALONE or marker in (0x00, 0xD8):
                    return f"JPEG header: unexpected marker 0x{marker:02X} (byte {offset})"
                if marker == 0xD9:
                    return "JPEG header ends (EOI) before the image data"
                length = int.from_bytes(head[2:4], "big") if len(head) == 4 else 0
                if length < 2 or offset + 2 + length > size:
                    return f"JPEG header: segment 0x{marker:02X} at byte {offset} has a bad " \
                           f"length"
                if marker in _FRAMES:
                    dims = fh.read(5)
                    if len(dims) < 5 or not int.from_bytes(dims[1:3], "big") \
                            or not int.from_bytes(dims[3:5], "big"):
                        return "JPEG header: the frame has no width or height"
                    frame = True
                if marker == 0xDA:          # the first scan: entropy-coded data follows
                    return None if frame else "JPEG header: image data before a frame header"
                offset += 2 + length
    except OSError as err:
        return f"cannot read ({err.strerror or err})"


def decode_problem(path):
    """None when Pillow can fully decode `path`, else a short reason."""
    from PIL import Image, UnidentifiedImageError

    problem = marker_problem(path)
    if problem:
        return problem

    try:
        with Image.open(path) as img:
            img.load()
    except UnidentifiedImageError:
        return "not a readable image"
    except (OSError, SyntaxError, ValueError) as err:
        return f"corrupt image ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
    return None


def image_size(path):
    """(width, height) from the header only."""
    from PIL import Image

    with Image.open(path) as img:
        return img.size


def write_fashion_mnist(out, size=28, train_limit=None, val_limit=None, quality=90, root=None):
    """Write Fashion-MNIST as JPEGs: OUT/train/<label>_<name>/<index>.jpg and OUT/val/...

    `size` > 28 upscales (bicubic) to make realistically sized JPEGs for the decode benchmark.
    A limit takes N images of the split, visiting the classes in turn, so every class folder
    gets images (the labels of train and val must line up). Returns {split: count}.
    """
    from PIL import Image

    from hvdscale.data.fashion_mnist import load_fashion_mnist

    if size < 8:
        raise DataError(f"image size {size} is too small (at least 8 pixels)")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out}: exists and is not empty (choose a new directory)")
    classes = len(FASHION_MNIST_CLASSES)
    for limit in (train_limit, val_limit):
        if limit is not None and limit < classes:
            raise DataError(f"a limit of {limit} images cannot fill {classes} class folders")
    x_train, y_train, x_test, y_test = load_fashion_mnist(root)
    counts = {}
    for split, x, y, limit in (("train", x_train, y_train, train_limit),
                               ("val", x_test, y_test, val_limit)):
        take = np.arange(len(y)) if limit is None else np.sort(_classes_in_turn(y)[:limit])
        folders = [out / split / f"{k}_{name}" for k, name in enumerate(FASHION_MNIST_CLASSES)]
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
        for index in take.tolist():      # the file name is the index in the source set
            pixels, label = x[index], y[index]
            img = Image.fromarray(pixels, mode="L")
            if size != pixels.shape[0]:
                img = img.resize((size, size), Image.BICUBIC)
            img.save(folders[int(label)] / f"{index:05d}.jpg", quality=quality)
        counts[split] = len(take)
    return counts


def _classes_in_turn(labels):
    """Indices ordered one of each class, then the second of each, ... (stable within a class)."""
    seen = {}
    turn = np.empty(len(labels), dtype=np.int64)
    for i, label in enumerate(labels.tolist()):
        turn[i] = seen.get(label, 0)
        seen[label] = turn[i] + 1
    return np.lexsort((labels, turn))
