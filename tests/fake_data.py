"""A CIFAR-10 zip in the offline export's layout, made of random JPEGs, for tests that
exercise the data path without reading the real 60 MB zip."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from train import data as data_lib


def write_cifar_zip(path: Path, per_class: int) -> Path:
    """A zip in the offline CIFAR-10 layout: random 32x32 JPEGs, a few per class."""
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w") as archive:
        for split in ("train", "test"):
            for name in data_lib.CIFAR10_CLASSES:
                for i in range(per_class):
                    pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                    buffer = io.BytesIO()
                    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
                    archive.writestr(f"cifar10/{split}/{name}/{i:04d}.jpg", buffer.getvalue())
    return path
