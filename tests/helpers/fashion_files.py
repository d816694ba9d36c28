"""Tiny Fashion-MNIST IDX files for tests: the four standard files with a few synthetic
"items", so nothing needs Debian's dataset-fashion-mnist package."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from gapjax.data import fashion_mnist


def write_idx(path, array) -> None:
    """``array`` (uint8) as an IDX file; gzip-compressed when ``path`` ends in ``.gz``."""
    array = np.asarray(array, np.uint8)
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big")
                                                      for d in array.shape)
    with (gzip.open if str(path).endswith(".gz") else open)(path, "wb") as file:
        file.write(header + array.tobytes())


def fake_items(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """28x28 "items": class k is a block of brightness 40 + 20 k with a random texture, on
    black, so a canvas tells which class it drew."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 10
    images = np.zeros((count, 28, 28), np.uint8)
    for index, label in enumerate(labels):
        top, left = rng.integers(2, 8, size=2)
        images[index, top:top + 18, left:left + 16] = 40 + 20 * label
        images[index, top:top + 18:3, left:left + 16:3] += 10
    return images, labels


def write_fashion_source(folder: Path, train: int = 20, test: int = 10) -> Path:
    """The four IDX files in ``folder`` (train gzip-compressed, test plain); returns it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for split, count, suffix in (("train", train, ".gz"), ("test", test, "")):
        images, labels = fake_items(count, seed=count)
        image_file, label_file = fashion_mnist.IDX_FILES[split]
        write_idx(folder / f"{image_file}{suffix}", images)
        write_idx(folder / f"{label_file}{suffix}", labels)
    return folder
