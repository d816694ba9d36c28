"""``gapjax_cluttered_digits``: one digit on a cluttered canvas, with its box and pixel mask.

The weakly supervised localization benchmark of the project. Each example is a square
canvas (32 or 64 pixels) holding one scikit-learn digit scaled to a random side between
a quarter and a half of the canvas and placed at a random position, plus clutter: pieces
(a random half-by-half window) of digits of *other* classes, scaled alike and scattered
anywhere, and Gaussian pixel noise. The label is the digit's class; the box is the tight
box of its pixels and the mask those pixels (the rendered digit above 30% of its peak).

Builder configs ``"{clutter}_{size}"``: clutter ``low`` (3 pieces, noise 0.05), ``medium``
(6 pieces, noise 0.10) or ``high`` (12 pieces, noise 0.15) on a ``32`` or ``64`` pixel
canvas; 5000 training and 1000 test canvases each. Training canvases use only the
digits' training split and test canvases only its test split, so no test digit is ever
seen in training. Generation is deterministic: example ``i`` of a split draws from
``np.random.default_rng([split_seed, i])``.

Select a variant with ``config.dataset.canvas_size`` (default 64) and
``config.dataset.clutter`` (default ``"medium"``); ``config.dataset.num_train`` /
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
CLUTTER_LEVELS = {"low": (3, 0.05), "medium": (6, 0.10), "high": (12, 0.15)}
DEFAULT_CANVAS_SIZE = 64
DEFAULT_CLUTTER = "medium"
NUM_TRAIN, NUM_TEST = 5000, 1000
MASK_THRESHOLD = 0.3
MAX_SHIFT_FRACTION = 1 / 16
# Canvases are mostly dark: mean / std of the medium_64 training canvases in [0, 1].
MEAN, STD = 0.15, 0.25
_SPLIT_SEEDS = {"train": 1, "test": 2}


@dataclasses.dataclass(eq=False)
class ClutteredDigitsConfig(tfds.core.BuilderConfig):
    """A canvas size and a clutter level."""

    canvas_size: int = DEFAULT_CANVAS_SIZE
    num_pieces: int = 6
    noise: float = 0.10
    num_train: int = NUM_TRAIN
    num_test: int = NUM_TEST


def builder_config(dataset_config: Any) -> ClutteredDigitsConfig:
    """``config.dataset`` -> the builder config, checking every key it reads.

    Keys: ``canvas_size`` (32 or 64, default 64), ``clutter`` (``low`` | ``medium`` |
    ``high``, default ``medium``) and, for quick runs and tests, ``num_train`` /
    ``num_test`` (default 5000 / 1000; other counts get their own config name, so their
    files never mix with the standard ones).
    """
    size, num_train, num_test, suffix = canvas.read_canvas_keys(
        dataset_config, "gapjax_cluttered_digits", sizes=CANVAS_SIZES,
        default_size=DEFAULT_CANVAS_SIZE, default_counts=(NUM_TRAIN, NUM_TEST))
    clutter = dataset_config.get("clutter", DEFAULT_CLUTTER)
    if clutter not in CLUTTER_LEVELS:
        raise ValueError(
            f"config.dataset.clutter={clutter!r} is not available for gapjax_cluttered_digits; "
            f"choose one of: {', '.join(CLUTTER_LEVELS)}"
        )
    name = f"{clutter}_{size}{suffix}"
    num_pieces, noise = CLUTTER_LEVELS[clutter]
    return ClutteredDigitsConfig(
        name=name,
        description=f"{num_pieces} clutter pieces, noise {noise}, {size}x{size}",
        canvas_size=size,
        num_pieces=num_pieces,
        noise=noise,
        num_train=num_train,
        num_test=num_test,
    )


def cluttered_canvas(
    rng: np.random.Generator,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    canvas_size: int,
    num_pieces: int,
    noise: float,
) -> dict[str, Any]:
    """Draws one example from ``images uint8 [N, 8, 8]`` / ``labels [N]``.

    Returns ``image uint8 [S, S, 1]``, ``label`` int, ``bbox float32 [4]`` and
    ``segmentation uint8 [S, S]`` (1 on the digit's pixels).
    """
    size = canvas_size
    target = int(rng.integers(len(labels)))
    side = int(rng.integers(size // 4, size // 2 + 1))
    top, left = (int(v) for v in rng.integers(0, size - side + 1, size=2))

    # Clutter: every piece's source, window, size and position drawn in one go.
    others = np.flatnonzero(labels != labels[target])
    sources = others[rng.integers(len(others), size=num_pieces)]
    windows = rng.integers(0, 5, size=(num_pieces, 2))
    piece_sides = rng.integers(size // 8, size // 4 + 1, size=num_pieces)
    low = -(piece_sides // 2)
    positions = rng.integers(low[:, None], (size + low)[:, None], size=(num_pieces, 2))
    pixels = np.zeros((size, size), np.float32)
    for source, (y, x), piece_side, (py, px) in zip(sources, windows, piece_sides, positions):
        piece = canvas.render_digit(images[source, y : y + 4, x : x + 4], int(piece_side))
        canvas.paste_max(pixels, piece, int(py), int(px))

    drawn = np.zeros((size, size), np.float32)
    canvas.paste_max(drawn, canvas.render_digit(images[target], side), top, left)
    mask = drawn > MASK_THRESHOLD * drawn.max()
    np.maximum(pixels, drawn, out=pixels)

    pixels += np.float32(noise) * rng.standard_normal(pixels.shape, dtype=np.float32)
    image = np.rint(np.clip(pixels, 0.0, 1.0) * 255.0).astype(np.uint8)
    return {
        "image": image[..., None],
        "label": int(labels[target]),
        "bbox": canvas.mask_box(mask),
        "segmentation": mask.astype(np.uint8),
    }


class GapjaxClutteredDigits(canvas.CanvasSplits, tfds.core.GeneratorBasedBuilder):
    """One scaled digit among clutter: image, label, box and pixel mask."""

    SPLIT_SEEDS: ClassVar[dict[str, int]] = _SPLIT_SEEDS
    VERSION = tfds.core.Version("1.1.0")
    # TFDS finds a builder's source file through an optional backport (importlib_resources)
    # for builders inside packages; naming the file directly avoids needing it.
    code_path = epath.Path(__file__)
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "Development builds, superseded.",
        "1.1.0": "Pixels and masks stored as raw bytes; clutter drawn in one batch.",
    }
    BUILDER_CONFIGS: ClassVar[list[ClutteredDigitsConfig]] = [
        builder_config({"canvas_size": size, "clutter": level})
        for size in CANVAS_SIZES
        for level in CLUTTER_LEVELS
    ]
    DEFAULT_BUILDER_CONFIG_NAME = f"{DEFAULT_CLUTTER}_{DEFAULT_CANVAS_SIZE}"

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
                    "label": tfds.features.ClassLabel(num_classes=10),
                    "bbox": tfds.features.BBoxFeature(),
                    "segmentation": tfds.features.Tensor(
                        shape=(size, size), dtype=np.uint8, encoding=RAW_BYTES
                    ),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def draw(self, rng: np.random.Generator, images: np.ndarray, labels: np.ndarray) -> dict:
        config = self.builder_config
        return cluttered_canvas(rng, images, labels, canvas_size=config.canvas_size,
                                num_pieces=config.num_pieces, noise=config.noise)


_preprocess = canvas.canvas_preprocess(
    mean=MEAN, std=STD, max_shift_fraction=MAX_SHIFT_FRACTION, max_boxes=1)


SPEC = register(
    DatasetSpec(
        name="gapjax_cluttered_digits",
        builder_class=GapjaxClutteredDigits,
        task="classification",
        num_classes=10,
        input_shape=(DEFAULT_CANVAS_SIZE, DEFAULT_CANVAS_SIZE, 1),
        builder_config=builder_config,
        preprocess=_preprocess,
    )
)

__all__ = ["SPEC", "ClutteredDigitsConfig", "GapjaxClutteredDigits", "cluttered_canvas"]
