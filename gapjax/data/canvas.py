"""Image helpers shared by the embedded datasets and the input pipeline (NumPy only).

The source of every embedded image dataset is scikit-learn's bundled 8x8 handwritten
digits (1797 images, values 0..16). These helpers load them, split them, resize them,
composite them onto canvases and derive boxes and masks from what was drawn.

Conventions: images are ``[H, W]`` or ``[H, W, C]`` arrays; boxes are
``(ymin, xmin, ymax, xmax)`` normalised to [0, 1] (the TFDS ``BBoxFeature`` convention),
with ``ymax``/``xmax`` the far edge of the last covered pixel.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

# The digits' own split: within each class a permutation seeded with DIGITS_SPLIT_SEED
# sends round(20%) of the images to test. This gives 1438 training and 359 test images
# and is the split every embedded dataset draws from (the cluttered and multi-label test
# canvases use only test digits).
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


def _bundled_digits_file() -> Path | None:
    """The CSV that ``sklearn.datasets.load_digits`` reads, located without importing
    scikit-learn (whose import costs seconds on a small machine)."""
    spec = importlib.util.find_spec("sklearn")
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            return path
    return None


@functools.cache
def sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits as ``(images uint8 [1797, 8, 8] in 0..255, labels [1797])``.

    Values 0..16 are scaled by 255/16 and rounded. No download: the data ships with
    scikit-learn. Rows are what ``sklearn.datasets.load_digits()`` returns, in its order.
    """
    path = _bundled_digits_file()
    if path is not None:
        with gzip.open(path, "rt") as file:
            table = np.loadtxt(file, delimiter=",")
        pixels, labels = table[:, :-1].reshape(-1, 8, 8), table[:, -1]
    else:
        from sklearn.datasets import load_digits

        digits = load_digits()
        pixels, labels = digits.images, digits.target
    images = np.rint(pixels * (255.0 / 16.0)).astype(np.uint8)
    return images, labels.astype(np.int64)


@functools.cache
def digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The fixed ``"train"`` (1438) or ``"test"`` (359) part of the digits, stratified by class.

    Returns ``(images uint8 [N, 8, 8], labels int64 [N])`` in the order of the full set.
    """
    if split not in ("train", "test"):
        raise ValueError(f"digits split must be 'train' or 'test'; got {split!r}")
    images, labels = sklearn_digits()
    rng = np.random.default_rng(DIGITS_SPLIT_SEED)
    is_test = np.zeros(len(labels), bool)
    for digit_class in range(10):
        members = rng.permutation(np.flatnonzero(labels == digit_class))
        is_test[members[: round(DIGITS_TEST_FRACTION * len(members))]] = True
    index = np.flatnonzero(is_test if split == "test" else ~is_test)
    return images[index], labels[index]


@functools.lru_cache(maxsize=512)
def _resize_weights(in_size: int, out_size: int) -> np.ndarray:
    """Row-stochastic ``[out_size, in_size]`` matrix of a triangle (bilinear) filter.

    When shrinking, the filter widens by the scale factor so that every input pixel
    contributes (antialiasing), the same rule as ``jax.image.resize(..., antialias=True)``.
    Cached and shared, hence read-only.
    """
    scale = out_size / in_size
    width = max(1.0, 1.0 / scale)
    centres = (np.arange(out_size) + 0.5) / scale - 0.5
    distance = np.abs(np.arange(in_size)[None, :] - centres[:, None]) / width
    weights = np.maximum(0.0, 1.0 - distance)
    weights = (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)
    weights.flags.writeable = False
    return weights


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear (antialiased when shrinking) resize of ``[H, W]`` or ``[H, W, C]`` to float32.

    Separable: two small matrix products, so it is cheap enough to run per example.
    """
    image = np.asarray(image, np.float32)
    rows = _resize_weights(image.shape[0], height)
    cols = _resize_weights(image.shape[1], width)
    if image.ndim == 2:
        return rows @ image @ cols.T
    # Channels first for two batched matrix products, then back to [H, W, C].
    return np.ascontiguousarray((rows @ image.transpose(2, 0, 1) @ cols.T).transpose(1, 2, 0))


def paste_max(canvas: np.ndarray, patch: np.ndarray, top: int, left: int) -> None:
    """Composites ``patch [h, w]`` onto ``canvas [H, W]`` in place with a pixel-wise max.

    Max compositing keeps strokes visible where digits or fragments overlap, as ink would.
    Parts of the patch outside the canvas are clipped.
    """
    height, width = canvas.shape
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + patch.shape[0], height), min(left + patch.shape[1], width)
    if y1 <= y0 or x1 <= x0:
        return
    region = patch[y0 - top : y1 - top, x0 - left : x1 - left]
    np.maximum(canvas[y0:y1, x0:x1], region, out=canvas[y0:y1, x0:x1])


def mask_box(mask: np.ndarray) -> np.ndarray:
    """Tight normalised box ``float32 [4]`` around the True pixels of ``mask [H, W]``.

    An empty mask gives the all ``-1`` box used for padding.
    """
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return np.full(4, -1.0, np.float32)
    height, width = mask.shape
    return np.array(
        [rows[0] / height, cols[0] / width, (rows[-1] + 1) / height, (cols[-1] + 1) / width],
        np.float32,
    )


def box_overlap(box: np.ndarray, other: np.ndarray) -> float:
    """Intersection area over the smaller box's area (0 = disjoint, 1 = one inside the other)."""
    height = min(box[2], other[2]) - max(box[0], other[0])
    width = min(box[3], other[3]) - max(box[1], other[1])
    if height <= 0 or width <= 0:
        return 0.0
    area = (box[2] - box[0]) * (box[3] - box[1])
    other_area = (other[2] - other[0]) * (other[3] - other[1])
    smaller = min(area, other_area)
    return float(height * width / max(smaller, 1e-12))


def shift(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Translates ``image [H, W, ...]`` by ``(dy, dx)`` pixels, filling with zeros.

    Equivalent to zero-padding and cropping at an offset: the "random crop with padding"
    augmentation with the image size unchanged.
    """
    out = np.zeros_like(image)
    height, width = image.shape[:2]
    src_y = slice(max(0, -dy), min(height, height - dy))
    dst_y = slice(max(0, dy), min(height, height + dy))
    src_x = slice(max(0, -dx), min(width, width - dx))
    dst_x = slice(max(0, dx), min(width, width + dx))
    out[dst_y, dst_x] = image[src_y, src_x]
    return out


def shift_boxes(boxes: np.ndarray, dy: int, dx: int, height: int, width: int) -> np.ndarray:
    """Moves normalised ``boxes [..., 4]`` with a ``shift`` of the image, clipping to [0, 1].

    Padding boxes (all -1) stay padding; a box shifted wholly off the canvas becomes padding.
    """
    boxes = np.asarray(boxes, np.float32)
    offset = np.array([dy / height, dx / width, dy / height, dx / width], np.float32)
    moved = np.clip(boxes + offset, 0.0, 1.0)
    empty = (moved[..., 2] <= moved[..., 0]) | (moved[..., 3] <= moved[..., 1])
    padding = np.all(boxes < 0, axis=-1)
    return np.where((empty | padding)[..., None], np.float32(-1.0), moved)


def preprocess_image_example(
    example: dict,
    rng: np.random.Generator | None,
    *,
    mean: float,
    std: float,
    size: tuple[int, int] | None = None,
    max_shift: int = 0,
    max_boxes: int | None = None,
) -> dict[str, np.ndarray]:
    """Turns one raw embedded-dataset example into model-ready arrays.

    Args:
      example: ``image uint8 [H, W, C]``, ``label`` (int, or multi-hot ``[K]``), optional
        ``bbox [4]`` or ``[M, 4]`` and ``segmentation uint8 [H, W]``.
      rng: per-example generator for augmentation, or None for none (evaluation).
      mean, std: normalisation of the [0, 1] intensities.
      size: ``(height, width)`` to resize to first, or None to keep the stored size.
      max_shift: augmentation translates by up to this many pixels each way (random crop
        after zero padding by ``max_shift``); no flips, since digits are not symmetric.
      max_boxes: boxes are padded with all -1 rows (or truncated) to this many.

    Returns:
      ``image float32 [h, w, C]``, ``label`` (int32 scalar or float32 ``[K]``), and where
      present ``bbox float32 [max_boxes, 4]`` and ``segmentation float32 [h, w]``.
    """
    image = np.asarray(example["image"], np.float32) * np.float32(1.0 / 255.0)
    segmentation = example.get("segmentation")
    if segmentation is not None:
        segmentation = np.asarray(segmentation, np.float32)
    if size is not None and tuple(image.shape[:2]) != tuple(size):
        image = resize(image, *size)
        if segmentation is not None:
            segmentation = resize(segmentation, *size)
    boxes = example.get("bbox")
    if boxes is not None:
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        count = max_boxes or boxes.shape[0]
        padded = np.full((count, 4), -1.0, np.float32)
        padded[: min(count, boxes.shape[0])] = boxes[:count]
        boxes = padded
    if rng is not None and max_shift > 0:
        dy, dx = (int(v) for v in rng.integers(-max_shift, max_shift + 1, size=2))
        height, width = image.shape[:2]
        image = shift(image, dy, dx)
        if segmentation is not None:
            segmentation = shift(segmentation, dy, dx)
        if boxes is not None:
            boxes = shift_boxes(boxes, dy, dx, height, width)
    out = {"image": (image - np.float32(mean)) * np.float32(1.0 / std)}
    label = np.asarray(example["label"])
    out["label"] = label.astype(np.int32) if label.ndim == 0 else label.astype(np.float32)
    if boxes is not None:
        out["bbox"] = boxes
    if segmentation is not None:
        out["segmentation"] = segmentation
    return out


# --------------------------------------------------------------------------------------
# What the canvas datasets (cluttered and multi-label digits) share
# --------------------------------------------------------------------------------------


def render_digit(digit: np.ndarray, side: int) -> np.ndarray:
    """Upsamples a uint8 digit (8x8 or a piece of one) to a ``[side, side]`` float32 patch
    in [0, 1]. Bilinear weights are non-negative and sum to one, so values stay in [0, 1]."""
    return resize(digit * np.float32(1.0 / 255.0), side, side)


def read_canvas_keys(
    dataset_config: Any, dataset: str, *, sizes: tuple[int, ...], default_size: int,
    default_counts: tuple[int, int],
) -> tuple[int, int, int, str]:
    """Reads and checks ``canvas_size``, ``num_train`` and ``num_test`` of ``config.dataset``.

    Returns ``(size, num_train, num_test, suffix)``; ``suffix`` (``"_{train}x{test}"`` for
    non-default counts, else ``""``) keeps such variants' files apart from the standard ones.
    """
    size = dataset_config.get("canvas_size", default_size)
    num_train = dataset_config.get("num_train", default_counts[0])
    num_test = dataset_config.get("num_test", default_counts[1])
    if size not in sizes:
        raise ValueError(
            f"config.dataset.canvas_size={size!r} is not available for {dataset}; "
            f"choose one of: {', '.join(map(str, sizes))}"
        )
    for key, value in (("num_train", num_train), ("num_test", num_test)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(
                f"config.dataset.{key}={value!r} is not valid for {dataset}; "
                "choose a positive integer"
            )
    suffix = "" if (num_train, num_test) == default_counts else f"_{num_train}x{num_test}"
    return size, num_train, num_test, suffix


class CanvasSplits:
    """Split generation of a canvas builder (mixed into a ``GeneratorBasedBuilder``).

    Example ``i`` of a split is drawn by ``draw(rng, images, labels)`` with a generator
    seeded by ``(SPLIT_SEEDS[split], i)`` from that split's source images only (the
    digits' split; ``source_split`` may pick others), so every example is reproducible on
    its own. The builder config has ``num_train`` and ``num_test``.
    """

    SPLIT_SEEDS: ClassVar[dict[str, int]] = {}

    def draw(self, rng: np.random.Generator, images: np.ndarray, labels: np.ndarray) -> dict:
        raise NotImplementedError

    def source_split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """The ``(images, labels)`` that ``split``'s canvases are drawn from."""
        return digits_split(split)

    def _split_generators(self, dl_manager):
        del dl_manager
        config = self.builder_config
        counts = {"train": config.num_train, "test": config.num_test}
        return {split: self._generate_examples(split, count) for split, count in counts.items()}

    def _generate_examples(self, split: str, count: int):
        images, labels = self.source_split(split)
        for index in range(count):
            rng = np.random.default_rng([self.SPLIT_SEEDS[split], index])
            yield index, self.draw(rng, images, labels)


def canvas_preprocess(
    *, mean: float, std: float, max_shift_fraction: float, max_boxes: int,
    keys: tuple[str, ...] | None = None,
) -> Callable[[dict, np.random.Generator | None], dict[str, np.ndarray]]:
    """The ``DatasetSpec.preprocess`` of a canvas dataset: normalise, shift by up to
    ``max_shift_fraction`` of the side, pad boxes to ``max_boxes``; ``keys`` selects the
    example's fields (None = all)."""

    def preprocess(example: dict, rng: np.random.Generator | None) -> dict[str, np.ndarray]:
        size = np.shape(example["image"])[0]
        fields = example if keys is None else {key: example[key] for key in keys}
        return preprocess_image_example(
            fields, rng, mean=mean, std=std, max_shift=int(size * max_shift_fraction),
            max_boxes=max_boxes,
        )

    return preprocess
