"""``gapjax_digits``: scikit-learn's bundled 8x8 handwritten digits as a TFDS dataset.

1797 images of the digits 0-9, split once and for all by class-stratified sampling
(``sklearn.model_selection.train_test_split(test_size=0.2, stratify=labels,
random_state=0)``): 1437 training and 360 test images. Pixel values 0..16 are stored as
uint8 0..255 at the native 8x8 resolution.

The input pipeline bilinearly upsamples to 16x16 (``IMAGE_SIZE``) so that a small CNN
has room for two stride-2 stages before its global pool, and augments by translating up
to 2 pixels at that resolution (one native pixel; no flips: digits are not symmetric).
"""

from __future__ import annotations

import functools
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from gapjax.data import canvas
from gapjax.data.spec import DatasetSpec, register

IMAGE_SIZE = 16
MAX_SHIFT = 2
# Mean and standard deviation of the training images in [0, 1] after upsampling to 16x16.
MEAN, STD = 0.3054, 0.3189


class GapjaxDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's 8x8 digits: ``image uint8 [8, 8, 1]``, ``label`` in 0..9."""

    VERSION = tfds.core.Version("1.0.0")
    # TFDS finds a builder's source file through an optional backport (importlib_resources)
    # for builders inside packages; naming the file directly avoids needing it.
    code_path = epath.Path(__file__)
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "Stratified 80/20 split of sklearn's digits, random_state=0."
    }

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    # Tensor, not Image: Image encodes PNG through TensorFlow.
                    "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
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
        images, labels = canvas.digits_split(split)
        for index, (image, label) in enumerate(zip(images, labels)):
            yield index, {"image": image[..., None], "label": int(label)}


SPEC = register(
    DatasetSpec(
        name="gapjax_digits",
        builder_class=GapjaxDigits,
        task="classification",
        num_classes=10,
        input_shape=(IMAGE_SIZE, IMAGE_SIZE, 1),
        preprocess=functools.partial(
            canvas.preprocess_image_example,
            mean=MEAN,
            std=STD,
            size=(IMAGE_SIZE, IMAGE_SIZE),
            max_shift=MAX_SHIFT,
        ),
    )
)
