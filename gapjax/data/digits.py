"""``gapjax_digits``: scikit-learn's bundled 8x8 handwritten digits as a TFDS dataset.

1797 images of the digits 0-9 (the rows of ``sklearn.datasets.load_digits()``), split
once and for all by class-stratified sampling: within each class a permutation seeded
with 0 sends round(20%) of the images to test (``canvas.digits_split``), giving 1438
training and 359 test images. Pixel values 0..16 are stored as uint8 0..255.

Builder configs by resolution: ``"8"`` (native), ``"16"`` (the default) and ``"32"``
(bilinear upsampling done once at build time, so the pipeline does no resizing).
Select with ``config.dataset.image_size``. 16x16 gives a small CNN room for two 2x
downsamplings before its global pool while still seeing the whole digit. Training
augmentation translates by up to an eighth of the side (zero padding then a random
crop; 2 pixels at 16x16); no flips, since digits are not symmetric.
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

IMAGE_SIZES = (8, 16, 32)
DEFAULT_IMAGE_SIZE = 16
# Mean and standard deviation of the training images in [0, 1] (upsampling keeps the mean
# and smooths the spread a little; one normalisation serves every resolution).
MEAN, STD = 0.3054, 0.3760


@dataclasses.dataclass(eq=False)
class DigitsConfig(tfds.core.BuilderConfig):
    """The stored resolution."""

    image_size: int = DEFAULT_IMAGE_SIZE


def builder_config(dataset_config: Any) -> str:
    """``config.dataset`` -> builder config name, checking ``image_size`` (default 16)."""
    size = dataset_config.get("image_size", DEFAULT_IMAGE_SIZE)
    if size is None:
        size = DEFAULT_IMAGE_SIZE
    if size not in IMAGE_SIZES:
        raise ValueError(
            f"config.dataset.image_size={size!r} is not available for gapjax_digits; "
            f"choose one of: {', '.join(map(str, IMAGE_SIZES))}"
        )
    return str(size)


class GapjaxDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's digits: ``image uint8 [S, S, 1]`` (S = 8, 16 or 32), ``label`` 0..9."""

    VERSION = tfds.core.Version("1.1.0")
    # TFDS finds a builder's source file through an optional backport (importlib_resources)
    # for builders inside packages; naming the file directly avoids needing it.
    code_path = epath.Path(__file__)
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "Development builds, superseded.",
        "1.1.0": "Pixels stored as raw bytes; stratified 80/20 split (1438/359), seed 0.",
    }
    BUILDER_CONFIGS: ClassVar[list[DigitsConfig]] = [
        DigitsConfig(name=str(size), description=f"{size}x{size} pixels", image_size=size)
        for size in IMAGE_SIZES
    ]
    DEFAULT_BUILDER_CONFIG_NAME = str(DEFAULT_IMAGE_SIZE)

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    # Tensor, not Image: Image encodes PNG through TensorFlow.
                    "image": tfds.features.Tensor(
                        shape=(size, size, 1), dtype=np.uint8, encoding=RAW_BYTES
                    ),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # everything is generated locally
        return {split: self._generate_examples(split) for split in ("train", "test")}

    def _generate_examples(self, split: str):
        size = self.builder_config.image_size
        images, labels = canvas.digits_split(split)
        for index, (image, label) in enumerate(zip(images, labels)):
            if size != image.shape[0]:
                upsampled = np.clip(canvas.resize(image, size, size), 0.0, 255.0)
                image = np.rint(upsampled).astype(np.uint8)
            yield index, {"image": image[..., None], "label": int(label)}


def _preprocess(example: dict, rng: np.random.Generator | None) -> dict[str, np.ndarray]:
    size = np.shape(example["image"])[0]
    return canvas.preprocess_image_example(
        example, rng, mean=MEAN, std=STD, max_shift=max(1, size // 8)
    )


SPEC = register(
    DatasetSpec(
        name="gapjax_digits",
        builder_class=GapjaxDigits,
        task="classification",
        num_classes=10,
        input_shape=(DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE, 1),
        builder_config=builder_config,
        preprocess=_preprocess,
    )
)
