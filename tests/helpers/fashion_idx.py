"""Tiny Fashion-MNIST-format IDX files for the real-data tests (nothing is downloaded).

``write_fashion_idx(folder, train, test)`` writes the four files ``gapjax.data.fashion_mnist``
reads (``IDX_FILES``), holding ``fake_items``: 28x28 uint8 "items" whose class ``k`` is a
textured block of brightness ``40 + 20 k`` on black, so a canvas still tells its class.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from gapjax.data import fashion_mnist


def write_idx(path: Path | str, array: np.ndarray) -> None:
    """``array`` (uint8) as an IDX file: magic ``0 0 8 ndim``, big-endian dimensions, data;
    gzip-compressed when ``path`` ends in ``.gz``."""
    array = np.asarray(array, np.uint8)
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big")
                                                      for d in array.shape)
    with (gzip.open if str(path).endswith(".gz") else open)(path, "wb") as file:
        file.write(header + array.tobytes())


def fake_items(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` items ``uint8 [count, 28, 28]`` and labels ``0..9`` cycling."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 10
    images = np.zeros((count, 28, 28), np.uint8)
    for index, label in enumerate(labels):
        top, left = rng.integers(2, 8, size=2)
        images[index, top:top + 18, left:left + 16] = 40 + 20 * label
        images[index, top:top + 18:3, left:left + 16:3] += 10
    return images, labels


def write_fashion_idx(folder: Path, train: int = 20, test: int = 10) -> Path:
    """The four IDX files of ``train`` and ``test`` items in ``folder``; returns it."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train), ("test", test)):
        images, labels = fake_items(count, seed=count)
        image_file, label_file = fashion_mnist.IDX_FILES[split]
        write_idx(folder / image_file, images)
        write_idx(folder / label_file, labels)
    return folder
