"""Real objects on generated canvases: Fashion-MNIST items with exact boxes, masks, labels.

The composition is generated, the objects are real: every item is a Fashion-MNIST photo
(``gapjax.data.fashion_mnist``) with its own label, so the localization and multi-label
claims rest on real object shapes rather than 8x8 digits. Canvases for training use only
Fashion-MNIST's training images and test canvases only its test images. Generation is
deterministic: example ``i`` of a split draws from ``np.random.default_rng([split_seed,
i])`` (``gapjax.data.canvas.CanvasSplits``).

* ``fashion_canvas`` (localization; the counterpart of ``gapjax_cluttered_digits``): one
  item scaled to a side between 3/8 and 5/8 of the canvas, placed at random, in front of
  clutter: pieces of items of *other* classes (a window of a quarter of the item's area
  centred on one of its pixels), scaled to 1/8-1/4 of the canvas and scattered anywhere,
  plus Gaussian pixel noise. The item is alpha-composited over the clutter with its own
  silhouette (its pixels above ``INK`` / 255), so it occludes what lies behind it. Keys:
  ``image uint8 [S, S, 1]``, ``label`` (the item's class), ``bbox [4]`` (tight box of
  its silhouette on the canvas) and ``segmentation uint8 [S, S]`` (the silhouette).
  Builder configs ``"{clutter}_{size}"``: clutter ``low`` (3 pieces, noise 0.03),
  ``medium`` (6, 0.06) or ``high`` (10, 0.10); size 56 or 64; 10,000 training and 2,000
  test canvases.
* ``fashion_mosaic`` (multi-label; the counterpart of ``gapjax_multilabel_digits``): a
  2x2 grid of cells of which 2-4 random ones hold one item each, items of distinct
  classes, each scaled to 3/4-1 of the cell side and placed at random inside its cell
  (so items never overlap), light noise (0.03). Keys: ``image uint8 [S, S, 1]``,
  ``label`` multi-hot ``[10]``, ``items`` (classes in drawing order) and ``bbox [n, 4]``.
  Builder configs ``"{size}"`` (56 or 64); 10,000 training and 2,000 test canvases.

Keys of ``config.dataset``: ``canvas_size`` (default 64), ``clutter`` (canvas only,
default ``medium``), ``num_train`` / ``num_test`` (other counts get their own config
name) and ``source_dir`` (where Fashion-MNIST's IDX files are, as for ``fashion_mnist``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from gapjax.data import canvas, fashion_mnist
from gapjax.data.pipeline import data_dir
from gapjax.data.spec import DatasetSpec, register

RAW_BYTES = tfds.features.Encoding.BYTES
NUM_CLASSES = len(fashion_mnist.CLASS_NAMES)
CANVAS_SIZES = (56, 64)
DEFAULT_CANVAS_SIZE = 64
NUM_TRAIN, NUM_TEST = 10_000, 2_000
#: A pixel above this value (of 255) belongs to the item's silhouette.
INK = 8
CLUTTER_LEVELS = {"low": (3, 0.03), "medium": (6, 0.06), "high": (10, 0.10)}
DEFAULT_CLUTTER = "medium"
MOSAIC_MIN_ITEMS, MOSAIC_MAX_ITEMS = 2, 4
MOSAIC_NOISE = 0.03
MAX_SHIFT_FRACTION = 1 / 16
# Mean / std in [0, 1] of the 64-pixel training canvases (medium clutter for the canvas).
CANVAS_MEAN, CANVAS_STD = 0.16, 0.28
MOSAIC_MEAN, MOSAIC_STD = 0.17, 0.29


# --------------------------------------------------------------------------------------
# Drawing (NumPy only)
# --------------------------------------------------------------------------------------


def render_item(item: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """A uint8 item ``[h, w]`` scaled to ``side`` squared: ``(pixels, alpha)`` float32 in
    [0, 1], ``alpha`` the scaled silhouette (pixels above ``INK``)."""
    pixels = canvas.render_digit(item, side)
    alpha = canvas.resize((item > INK).astype(np.float32), side, side)
    return pixels, np.clip(alpha, 0.0, 1.0)


def paste_over(target: np.ndarray, pixels: np.ndarray, alpha: np.ndarray, top: int,
               left: int) -> None:
    """Alpha-composites ``pixels`` (with ``alpha``) over ``target [H, W]`` in place at
    ``(top, left)``; ``top`` / ``left`` must keep the patch inside the canvas."""
    height, width = pixels.shape
    region = target[top:top + height, left:left + width]
    region *= 1.0 - alpha
    region += alpha * pixels


def _piece(item: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A window of a quarter of the item's area centred on one of its silhouette pixels."""
    side = item.shape[0] // 2
    rows, cols = np.nonzero(item > INK)
    if rows.size == 0:
        return item[:side, :side]
    pick = int(rng.integers(rows.size))
    top = int(np.clip(rows[pick] - side // 2, 0, item.shape[0] - side))
    left = int(np.clip(cols[pick] - side // 2, 0, item.shape[1] - side))
    return item[top:top + side, left:left + side]


def cluttered_item_canvas(rng: np.random.Generator, images: np.ndarray, labels: np.ndarray,
                          *, canvas_size: int, num_pieces: int, noise: float) -> dict[str, Any]:
    """One ``fashion_canvas`` example from ``images uint8 [N, 28, 28]`` / ``labels [N]``.

    Returns ``image uint8 [S, S, 1]``, ``label`` int, ``bbox float32 [4]`` and
    ``segmentation uint8 [S, S]`` (1 on the item's silhouette).
    """
    size = canvas_size
    target = int(rng.integers(len(labels)))
    side = int(rng.integers((3 * size) // 8, (5 * size) // 8 + 1))
    top, left = (int(v) for v in rng.integers(0, size - side + 1, size=2))

    others = np.flatnonzero(labels != labels[target])
    pixels = np.zeros((size, size), np.float32)
    for _ in range(num_pieces):
        piece = _piece(images[others[rng.integers(len(others))]], rng)
        piece_side = int(rng.integers(size // 8, size // 4 + 1))
        py, px = (int(v) for v in rng.integers(-(piece_side // 2), size - piece_side // 2,
                                               size=2))
        canvas.paste_max(pixels, canvas.render_digit(piece, piece_side), py, px)

    item, alpha = render_item(images[target], side)
    paste_over(pixels, item, alpha, top, left)
    mask = np.zeros((size, size), bool)
    mask[top:top + side, left:left + side] = alpha > 0.5

    pixels += np.float32(noise) * rng.standard_normal(pixels.shape, dtype=np.float32)
    return {
        "image": np.rint(np.clip(pixels, 0.0, 1.0) * 255.0).astype(np.uint8)[..., None],
        "label": int(labels[target]),
        "bbox": canvas.mask_box(mask),
        "segmentation": mask.astype(np.uint8),
    }


def item_mosaic(rng: np.random.Generator, images: np.ndarray, labels: np.ndarray, *,
                canvas_size: int) -> dict[str, Any]:
    """One ``fashion_mosaic`` example: 2-4 items of distinct classes in distinct cells of a
    2x2 grid. Returns ``image uint8 [S, S, 1]``, ``label`` uint8 multi-hot ``[10]``,
    ``items`` int ``[n]`` (classes in drawing order) and ``bbox float32 [n, 4]``."""
    size, cell = canvas_size, canvas_size // 2
    count = int(rng.integers(MOSAIC_MIN_ITEMS, MOSAIC_MAX_ITEMS + 1))
    classes = rng.choice(NUM_CLASSES, size=count, replace=False)
    cells = rng.permutation(4)[:count]
    pixels = np.zeros((size, size), np.float32)
    boxes = []
    for item_class, cell_index in zip(classes, cells):
        candidates = np.flatnonzero(labels == item_class)
        item = images[candidates[rng.integers(len(candidates))]]
        side = int(rng.integers((3 * cell) // 4, cell + 1))
        top = (cell_index // 2) * cell + int(rng.integers(0, cell - side + 1))
        left = (cell_index % 2) * cell + int(rng.integers(0, cell - side + 1))
        patch, alpha = render_item(item, side)
        paste_over(pixels, patch, alpha, top, left)
        mask = np.zeros((size, size), bool)
        mask[top:top + side, left:left + side] = alpha > 0.5
        boxes.append(canvas.mask_box(mask))
    pixels += np.float32(MOSAIC_NOISE) * rng.standard_normal(pixels.shape, dtype=np.float32)
    multi_hot = np.zeros(NUM_CLASSES, np.uint8)
    multi_hot[classes] = 1
    return {
        "image": np.rint(np.clip(pixels, 0.0, 1.0) * 255.0).astype(np.uint8)[..., None],
        "label": multi_hot,
        "items": classes.astype(np.int64),
        "bbox": np.stack(boxes).astype(np.float32),
    }


# --------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class FashionCanvasConfig(tfds.core.BuilderConfig):
    """A canvas variant and where Fashion-MNIST is (``source_dir``, ``data_dir``: they do
    not change the stored data)."""

    canvas_size: int = DEFAULT_CANVAS_SIZE
    num_pieces: int = 6
    noise: float = 0.06
    num_train: int = NUM_TRAIN
    num_test: int = NUM_TEST
    source_dir: str | None = None
    data_dir: str = ""


class _FashionSource(canvas.CanvasSplits):
    def source_split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        config = self.builder_config
        return fashion_mnist.load_split(split, source_dir=config.source_dir,
                                        directory=config.data_dir)


class GapjaxFashionCanvas(_FashionSource, tfds.core.GeneratorBasedBuilder):
    """One Fashion-MNIST item among clutter: image, label, box and silhouette mask."""

    SPLIT_SEEDS: ClassVar[dict[str, int]] = {"train": 11, "test": 12}
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "First release."}
    code_path = epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.canvas_size
        return tfds.core.DatasetInfo(
            builder=self, description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(size, size, 1), dtype=np.uint8,
                                              encoding=RAW_BYTES),
                "label": tfds.features.ClassLabel(names=list(fashion_mnist.CLASS_NAMES)),
                "bbox": tfds.features.BBoxFeature(),
                "segmentation": tfds.features.Tensor(shape=(size, size), dtype=np.uint8,
                                                     encoding=RAW_BYTES),
            }),
            supervised_keys=("image", "label"),
        )

    def draw(self, rng: np.random.Generator, images: np.ndarray, labels: np.ndarray) -> dict:
        config = self.builder_config
        return cluttered_item_canvas(rng, images, labels, canvas_size=config.canvas_size,
                                     num_pieces=config.num_pieces, noise=config.noise)


class GapjaxFashionMosaic(_FashionSource, tfds.core.GeneratorBasedBuilder):
    """2-4 Fashion-MNIST items of distinct classes on a 2x2 grid, multi-hot labels, boxes."""

    SPLIT_SEEDS: ClassVar[dict[str, int]] = {"train": 13, "test": 14}
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "First release."}
    code_path = epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.canvas_size
        return tfds.core.DatasetInfo(
            builder=self, description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(size, size, 1), dtype=np.uint8,
                                              encoding=RAW_BYTES),
                "label": tfds.features.Tensor(shape=(NUM_CLASSES,), dtype=np.uint8),
                "items": tfds.features.Sequence(tfds.features.ClassLabel(
                    names=list(fashion_mnist.CLASS_NAMES))),
                "bbox": tfds.features.Sequence(tfds.features.BBoxFeature()),
            }),
        )

    def draw(self, rng: np.random.Generator, images: np.ndarray, labels: np.ndarray) -> dict:
        return item_mosaic(rng, images, labels, canvas_size=self.builder_config.canvas_size)


def _config(dataset_config: Any, dataset: str, variant: str, **fields: Any) -> FashionCanvasConfig:
    size, num_train, num_test, suffix = canvas.read_canvas_keys(
        dataset_config, dataset, sizes=CANVAS_SIZES, default_size=DEFAULT_CANVAS_SIZE,
        default_counts=(NUM_TRAIN, NUM_TEST))
    # Every config is a custom one (no BUILDER_CONFIGS), so that where Fashion-MNIST is
    # travels with it; the name alone decides where the canvases are stored.
    return FashionCanvasConfig(
        name=f"{variant}{size}{suffix}", description=f"{dataset} {variant}{size}",
        canvas_size=size, num_train=num_train, num_test=num_test,
        source_dir=dataset_config.get("source_dir") or None,
        data_dir=data_dir(dataset_config), **fields)


def canvas_builder_config(dataset_config: Any) -> FashionCanvasConfig:
    """``config.dataset`` -> the ``fashion_canvas`` config (``canvas_size``, ``clutter``,
    ``num_train``, ``num_test``, ``source_dir``)."""
    clutter = dataset_config.get("clutter", DEFAULT_CLUTTER)
    if clutter not in CLUTTER_LEVELS:
        raise ValueError(f"config.dataset.clutter={clutter!r} is not available for "
                         f"fashion_canvas; choose one of: {', '.join(CLUTTER_LEVELS)}")
    num_pieces, noise = CLUTTER_LEVELS[clutter]
    return _config(dataset_config, "fashion_canvas", f"{clutter}_", num_pieces=num_pieces,
                   noise=noise)


def mosaic_builder_config(dataset_config: Any) -> FashionCanvasConfig:
    """``config.dataset`` -> the ``fashion_mosaic`` config (``canvas_size``, ``num_train``,
    ``num_test``, ``source_dir``)."""
    return _config(dataset_config, "fashion_mosaic", "")


CANVAS_SPEC = register(DatasetSpec(
    name="fashion_canvas",
    builder_class=GapjaxFashionCanvas,
    task="classification",
    num_classes=NUM_CLASSES,
    input_shape=(DEFAULT_CANVAS_SIZE, DEFAULT_CANVAS_SIZE, 1),
    builder_config=canvas_builder_config,
    preprocess=canvas.canvas_preprocess(mean=CANVAS_MEAN, std=CANVAS_STD,
                                        max_shift_fraction=MAX_SHIFT_FRACTION, max_boxes=1),
))

MOSAIC_SPEC = register(DatasetSpec(
    name="fashion_mosaic",
    builder_class=GapjaxFashionMosaic,
    task="multilabel",
    num_classes=NUM_CLASSES,
    input_shape=(DEFAULT_CANVAS_SIZE, DEFAULT_CANVAS_SIZE, 1),
    builder_config=mosaic_builder_config,
    preprocess=canvas.canvas_preprocess(mean=MOSAIC_MEAN, std=MOSAIC_STD,
                                        max_shift_fraction=MAX_SHIFT_FRACTION,
                                        max_boxes=MOSAIC_MAX_ITEMS,
                                        keys=("image", "label", "bbox")),
))

__all__ = [
    "CANVAS_SPEC",
    "CLUTTER_LEVELS",
    "MOSAIC_SPEC",
    "GapjaxFashionCanvas",
    "GapjaxFashionMosaic",
    "canvas_builder_config",
    "cluttered_item_canvas",
    "item_mosaic",
    "mosaic_builder_config",
    "paste_over",
    "render_item",
]
