"""Fashion-MNIST from Debian's `dataset-fashion-mnist` package (idx files, gzip), no network."""
import gzip
import struct
from pathlib import Path

import numpy as np

from hvdscale.errors import DataError

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "x_train": ("train-images-idx3-ubyte", 60000),
    "y_train": ("train-labels-idx1-ubyte", 60000),
    "x_test": ("t10k-images-idx3-ubyte", 10000),
    "y_test": ("t10k-labels-idx1-ubyte", 10000),
}
# Per-pixel statistics of the training images (scaled to [0, 1]), for normalisation.
MEAN, STD = 0.2860, 0.3530
IDX_DTYPES = {0x08: np.uint8}


def _find(root, stem):
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise DataError(f"Fashion-MNIST file {stem}[.gz] not found in {root} "
                    f"(install Debian's dataset-fashion-mnist or set data.path)")


def read_idx(path):
    """An idx array (the MNIST container: magic, dims, big-endian sizes, raw data)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as err:
        raise DataError(f"{path}: cannot read ({err})") from None
    if len(data) < 4:
        raise DataError(f"{path}: truncated idx header")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code not in IDX_DTYPES or ndim == 0:
        raise DataError(f"{path}: not an idx file of unsigned bytes")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated idx header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        raise DataError(f"{path}: holds {len(data) - header} bytes of data, "
                        f"its header says {expected} for shape {shape}")
    return np.frombuffer(data, dtype=IDX_DTYPES[dtype_code], offset=header).reshape(shape)


def load_fashion_mnist(root=None):
    """(x_train, y_train, x_test, y_test): uint8 [N, 28, 28] images and int64 labels."""
    root = Path(root) if root is not None else DEFAULT_ROOT
    if not root.is_dir():
        raise DataError(f"Fashion-MNIST directory not found: {root} "
                        f"(install Debian's dataset-fashion-mnist or set data.path)")
    out = {}
    for key, (stem, count) in FILES.items():
        arr = read_idx(_find(root, stem))
        want = (count, 28, 28) if key.startswith("x") else (count,)
        if arr.shape != want:
            raise DataError(f"{root}/{stem}: shape {arr.shape}, expected {want}")
        out[key] = arr if key.startswith("x") else arr.astype(np.int64)
    for key in ("y_train", "y_test"):
        if out[key].max() > 9:
            raise DataError(f"{root}: {key} has labels outside 0..9")
    return out["x_train"], out["y_train"], out["x_test"], out["y_test"]


def load_raw(data_cfg, seed=0):
    """data.kind fashion_mnist as the data layer's RawArrays (its registry entry's `arrays`)."""
    from hvdscale.data.arrays import RawArrays
    x_train, y_train, x_test, y_test = load_fashion_mnist(getattr(data_cfg, "path", None))
    return RawArrays(x_train, y_train, x_test, y_test, (MEAN,), (STD,))
