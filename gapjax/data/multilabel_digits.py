"""``gapjax_multilabel_digits``: 2 to 4 distinct digits per canvas, multi-hot labels, boxes.

The multi-label benchmark for the gradient-flow study (GAP versus GMP). Each example is a
square canvas (32 or 64 pixels) holding between 2 and 4 scikit-learn digits of distinct
classes, each scaled to a random side between a quarter and 3/8 of the canvas and placed
at a random position where its square overlaps every earlier one by at most 15% of the
smaller square (rejection sampling; after 100 failed draws the last one is kept so
generation always ends). Labels are multi-hot over the 10 classes; each digit's box is
the tight box of its pixels (above 30% of the rendered digit's peak). Light Gaussian
noise (0.03) keeps the background from being exactly constant.

Builder configs ``"{size}"`` (``32`` or ``64``), 5000 training and 1000 test canvases;
training canvases use only the digits' training split, test canvases only its test
split. Deterministic: example ``i`` of a split draws from
``np.random.default_rng([split_seed, i])``.

Select with ``config.dataset.canvas_size`` (default 64); ``config.dataset.num_train`` /
``num_test`` make smaller (or larger) variants under their own config name.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from gapjax.data import canvas
from gapjax.data.spec import DatasetSpec, register

# Arrays stored as raw bytes: one field per array, instead of one int64 per pixel.
RAW_BYTES = tfds.features.Encoding.BYTES

CANVAS_SIZES = (32, 64)
DEFAULT_CANVAS_SIZE = 64
NUM_TRAIN, NUM_TEST = 5000, 1000
MIN_DIGITS, MAX_DIGITS = 2, 4
MAX_OVERLAP = 0.15
PLACEMENT_TRIES = 100
NOISE = 0.03
MASK_THRESHOLD = 0.3
MAX_SHIFT_FRACTION = 1 / 16
# Mean / std of the 64x64 training canvases in [0, 1].
MEAN, STD = 0.10, 0.22
_SPLIT_SEEDS = {"train": 3, "test": 4}


@dataclasses.dataclass(eq=False)
class MultilabelDigitsConfig(tfds.core.BuilderConfig):
    """A canvas size and the number of examples per split."""

    canvas_size: int = DEFAULT_CANVAS_SIZE
    num_train: int = NUM_TRAIN
    num_test: int = NUM_TEST


def builder_config(dataset_config: Any) -> MultilabelDigitsConfig:
    """``config.dataset`` -> the builder config.

    Keys: ``canvas_size`` (32 or 64, default 64) and ``num_train`` / ``num_test``
    (default 5000 / 1000; other counts get their own config name).
    """
    size, num_train, num_test, suffix = canvas.read_canvas_keys(
        dataset_config, "gapjax_multilabel_digits", sizes=CANVAS_SIZES,
        default_size=DEFAULT_CANVAS_SIZE, default_counts=(NUM_TRAIN, NUM_TEST))
    name = f"{size}{suffix}"
    return MultilabelDigitsConfig(
        name=name,
        description=f"{MIN_DIGITS}-{MAX_DIGITS} digits on {size}x{size}",
        canvas_size=size,
        num_train=num_train,
        num_test=num_test,
    )


def _place(rng: np.random.Generator, size: int, side: int, placed: list[np.ndarray]):
    """A ``(top, left)`` for a ``side`` square overlapping each of ``placed`` by little."""
    for _ in range(PLACEMENT_TRIES):
        top, left = (int(v) for v in rng.integers(0, size - side + 1, size=2))
        square = np.array([top, left, top + side, left + side], np.float32)
        if all(canvas.box_overlap(square, other) <= MAX_OVERLAP for other in placed):
            break
    placed.append(square)
    return top, left


def multilabel_canvas(
    rng: np.random.Generator, images: np.ndarray, labels: np.ndarray, *, canvas_size: int
) -> dict[str, Any]:
    """Draws one example from ``images uint8 [N, 8, 8]`` / ``labels [N]``.

    Returns ``image uint8 [S, S, 1]``, ``label`` uint8 multi-hot ``[10]``, ``digits`` int
    ``[n]`` (classes in drawing order) and ``bbox float32 [n, 4]`` (their boxes), with
    ``2 <= n <= 4``.
    """
    size = canvas_size
    count = int(rng.integers(MIN_DIGITS, MAX_DIGITS + 1))
    classes = rng.choice(10, size=count, replace=False)
    pixels = np.zeros((size, size), np.float32)
    placed: list[np.ndarray] = []
    boxes = []
    for digit_class in classes:
        candidates = np.flatnonzero(labels == digit_class)
        digit = images[candidates[rng.integers(len(candidates))]]
        side = int(rng.integers(size // 4, (3 * size) // 8 + 1))
        top, left = _place(rng, size, side, placed)
        patch = canvas.render_digit(digit, side)
        drawn = np.zeros((size, size), np.float32)
        canvas.paste_max(drawn, patch, top, left)
        boxes.append(canvas.mask_box(drawn > MASK_THRESHOLD * drawn.max()))
        np.maximum(pixels, drawn, out=pixels)
    pixels += np.float32(NOISE) * rng.standard_normal(pixels.shape, dtype=np.float32)
    multi_hot = np.zeros(10, np.uint8)
    multi_hot[classes] = 1
    return {
        "image": np.rint(np.clip(pixels, 0.0, 1.0) * 255.0).astype(np.uint8)[..., None],
        "label": multi_hot,
        "digits": classes.astype(np.int64),
        "bbox": np.stack(boxes).astype(np.float32),
    }


class GapjaxMultilabelDigits(canvas.CanvasSplits, tfds.core.GeneratorBasedBuilder):
    """2-4 distinct digits per canvas: image, multi-hot label, classes and boxes."""

    SPLIT_SEEDS: ClassVar[dict[str, int]] = _SPLIT_SEEDS
    VERSION = tfds.core.Version("1.1.0")
    # TFDS finds a builder's source file through an optional backport (importlib_resources)
    # for builders inside packages; naming the file directly avoids needing it.
    code_path = epath.Path(__file__)
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "Development builds, superseded.",
        "1.1.0": "Pixels stored as raw bytes.",
    }
    BUILDER_CONFIGS: ClassVar[list[MultilabelDigitsConfig]] = [
        builder_config({"canvas_size": size}) for size in CANVAS_SIZES
    ]
    DEFAULT_BUILDER_CONFIG_NAME = str(DEFAULT_CANVAS_SIZE)

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.canvas_size
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(
                        shape=(size, size, 1), dtype=np.uint8, encoding=RAW_BYTES
                    ),
                    "label": tfds.features.Tensor(shape=(10,), dtype=np.uint8),
                    "digits": tfds.features.Sequence(tfds.features.ClassLabel(num_classes=10)),
                    "bbox": tfds.features.Sequence(tfds.features.BBoxFeature()),
                }
            ),
        )

    def draw(self, rng: np.random.Generator, images: np.ndarray, labels: np.ndarray) -> dict:
        return multilabel_canvas(rng, images, labels,
                                 canvas_size=self.builder_config.canvas_size)


_preprocess = canvas.canvas_preprocess(
    mean=MEAN, std=STD, max_shift_fraction=MAX_SHIFT_FRACTION, max_boxes=MAX_DIGITS,
    keys=("image", "label", "bbox"))


SPEC = register(
    DatasetSpec(
        name="gapjax_multilabel_digits",
        builder_class=GapjaxMultilabelDigits,
        task="multilabel",
        num_classes=10,
        input_shape=(DEFAULT_CANVAS_SIZE, DEFAULT_CANVAS_SIZE, 1),
        builder_config=builder_config,
        preprocess=_preprocess,
    )
)
