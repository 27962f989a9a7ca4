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


def undecodable_jpeg(path):
    """Right start and end markers, nonsense between: passes the cheap check, fails decoding."""
    Path(path).write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8 + b"\xff\xd9")
