"""Image folders for the DALI tests, made with Pillow: real JPEG/PNG files of varied sizes."""
from pathlib import Path

import numpy as np
from PIL import Image


def natural_image(rng, width, height):
    """A smooth colour field plus noise: compresses and resizes like a photograph, not like
    flat colour or white noise."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = []
    for _ in range(3):
        fx, fy, phase = rng.uniform(0.5, 3.0), rng.uniform(0.5, 3.0), rng.uniform(0, 6.28)
        wave = np.sin(xx / width * fx * 6.28 + phase) * np.cos(yy / height * fy * 6.28)
        channels.append(127 + 100 * wave + rng.normal(0, 12, size=wave.shape))
    return np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8)


def identity_folder(root, n, seed=0, splits=("train", "val"), fmt="jpg"):
    """`n` classes holding one image each, so a label names its image; sizes vary 24..80 px."""
    rng = np.random.default_rng(seed)
    for split in splits:
        for k in range(n):
            folder = Path(root, split, f"c{k:03d}")
            folder.mkdir(parents=True, exist_ok=True)
            width, height = (int(v) for v in rng.integers(24, 81, size=2))
            Image.fromarray(natural_image(rng, width, height)).save(folder / f"img.{fmt}")
    return Path(root)


def flat_image(path, value, width=40, height=30):
    Image.fromarray(np.full((height, width, 3), value, np.uint8)).save(path, quality=100)


def _jpeg_segments(data):
    """(offset, marker) of a JPEG's header segments, SOI excluded, up to the first scan."""
    found, offset = [], 2
    while True:
        marker, length = data[offset + 1], int.from_bytes(data[offset + 2:offset + 4], "big")
        found.append((offset, marker))
        if marker == 0xDA:
            return found
        offset += 2 + length


def undecodable_jpeg(path):
    """A well-formed chain of markers whose first Huffman table is nonsense (every code
    count 255): passes the header check, fails decoding (Pillow and DALI both report it)."""
    path = Path(path)
    flat_image(path, 90)
    data = bytearray(path.read_bytes())
    offset = next(o for o, marker in _jpeg_segments(data) if marker == 0xC4)
    data[offset + 5:offset + 21] = b"\xff" * 16      # after marker, length, table class/id
    path.write_bytes(bytes(data))


def garbage_between_markers(path, seed=0):
    """Insert 64 random bytes into the JPEG at `path` between two header segments (before
    its frame header): Pillow's decoder skips them with a warning, DALI's CPU decoder
    segfaulted on such a file under horovodrun (exit 139)."""
    path = Path(path)
    data = path.read_bytes()
    offset = next(o for o, marker in _jpeg_segments(data) if marker == 0xC0)
    junk = np.random.default_rng(seed).integers(0, 256, 64, dtype=np.uint8).tobytes()
    path.write_bytes(data[:offset] + junk + data[offset:])
