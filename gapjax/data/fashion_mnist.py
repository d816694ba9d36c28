"""``fashion_mnist``: Zalando's Fashion-MNIST, prepared offline from its four IDX files.

70,000 grayscale 28x28 photos of clothing in 10 classes (Xiao, Rasul and Vollgraf, 2017):
60,000 for training and 10,000 for testing, the split, the class order and the feature
keys of TFDS's ``fashion_mnist`` (``image uint8 [28, 28, 1]``, ``label`` 0..9 named in
``CLASS_NAMES``). Nothing is downloaded. On first use the four IDX files are parsed
(``read_idx``: NumPy, magic numbers and sizes checked) and written once as ArrayRecord
(the TFDS builder ``gapjax_fashion_mnist`` under the data directory), from, in order:

1. ``config.dataset.source_dir``, when set: a folder holding ``train-images-idx3-ubyte``,
   ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``
   (each optionally ``.gz``);
2. ``/usr/share/datasets/fashion-mnist``, where Debian's package ``dataset-fashion-mnist``
   installs them;
3. else a TFDS ``fashion_mnist`` already prepared as ArrayRecord in the data directory is
   read as it is.

Once prepared, the files are no longer needed. Keys of ``config.dataset``:
``source_dir``; ``image_size`` 28 (default) or 32 (zero-padded by 2 pixels, the usual
input of CIFAR-stem ResNets); ``max_shift`` (training translation in pixels, default 3:
zero padding then a random crop) and ``flip`` (random left-right flips in training,
default True: garments are close to mirror-symmetric). ``dataset.augment = False``
turns both off.

``load_split(split, ...)`` gives the raw arrays to other builders (the Fashion-MNIST
canvases of ``gapjax.data.fashion_canvas``).
"""

from __future__ import annotations

import dataclasses
import gzip
import os
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from gapjax.data import canvas, wrapped
from gapjax.data.pipeline import DatasetError, prepare_embedded
from gapjax.data.spec import DatasetSpec, register

NAME = "fashion_mnist"
CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
IMAGE_SIDE = 28
#: split -> (images file, labels file), without the optional ``.gz``.
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
#: The IDX magic numbers: two zero bytes, the type code 0x08 (unsigned byte), the rank.
IDX_MAGIC = {3: 0x00000803, 1: 0x00000801}
IMAGE_SIZES = (28, 32)
DEFAULT_MAX_SHIFT = 3
# Mean / std of the training images in [0, 1] (also the pipeline's table for TFDS's).
MEAN, STD = 0.2860, 0.3530
# Raw bytes: one field per array instead of one int64 per pixel.
RAW_BYTES = tfds.features.Encoding.BYTES


# --------------------------------------------------------------------------------------
# IDX files (NumPy only)
# --------------------------------------------------------------------------------------


def read_idx(path: str, rank: int) -> np.ndarray:
    """An unsigned-byte IDX array of ``rank`` dimensions (``.gz`` or plain) as uint8.

    Raises:
      DatasetError: one line naming ``path`` when it cannot be read, is not gzip where its
        name says so, has the wrong magic number, or holds more or fewer bytes than its
        header promises.
    """
    compressed = path.endswith(".gz")
    try:
        with (gzip.open if compressed else open)(path, "rb") as file:
            data = file.read()
    except (OSError, EOFError) as error:  # BadGzipFile is an OSError; truncation an EOFError
        kind = "gzip-compressed IDX" if compressed else "IDX"
        raise DatasetError(f"{path}: not a readable {kind} file ({error})") from None
    magic = int.from_bytes(data[:4], "big")
    if len(data) >= 4 and magic != IDX_MAGIC[rank]:
        raise DatasetError(f"{path}: magic number {magic:#010x}, expected "
                           f"{IDX_MAGIC[rank]:#010x} (unsigned bytes, {rank} dimensions)")
    header = 4 + 4 * rank
    if len(data) < header:
        raise DatasetError(f"{path}: truncated IDX file ({len(data)} bytes, shorter than the "
                           f"{header}-byte header)")
    shape = tuple(int(d) for d in np.frombuffer(data[4:header], ">u4"))
    expected = int(np.prod(shape, dtype=np.int64))
    if len(data) - header != expected:
        raise DatasetError(f"{path}: truncated or wrong IDX file: {len(data) - header} bytes "
                           f"of data, its header {shape} says {expected}")
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def _existing(directory: str, stem: str) -> str | None:
    for candidate in (f"{stem}.gz", stem):
        path = os.path.join(directory, candidate)
        if os.path.isfile(path):
            return path
    return None


def idx_paths(directory: str) -> tuple[dict[str, tuple[str, str]] | None, list[str]]:
    """``({split: (images path, labels path)}, [])`` when ``directory`` holds all four
    files (each ``.gz`` or plain), else ``(None, [missing file names])``."""
    found, missing = {}, []
    for split, stems in IDX_FILES.items():
        paths = [_existing(directory, stem) for stem in stems]
        missing += [f"{stem}[.gz]" for stem, path in zip(stems, paths) if path is None]
        found[split] = tuple(paths)
    return (None, missing) if missing else (found, [])


def load_idx_split(paths: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [N, 28, 28], labels int64 [N])`` from an images and a labels file,
    checking the image size, the counts and the label range (one line naming the file)."""
    images_path, labels_path = paths
    images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
    if images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise DatasetError(f"{images_path}: images of {images.shape[1]}x{images.shape[2]} "
                           f"pixels, expected {IMAGE_SIDE}x{IMAGE_SIDE}")
    if len(images) != len(labels):
        raise DatasetError(f"{labels_path}: {len(labels)} labels for the {len(images)} images "
                           f"of {images_path}")
    if labels.size and labels.max() >= len(CLASS_NAMES):
        raise DatasetError(f"{labels_path}: label {int(labels.max())} outside 0..9")
    return images, labels.astype(np.int64)


# --------------------------------------------------------------------------------------
# The ArrayRecord builder
# --------------------------------------------------------------------------------------


class GapjaxFashionMnist(tfds.core.GeneratorBasedBuilder):
    """Fashion-MNIST from its IDX files: ``image uint8 [28, 28, 1]``, ``label`` (10 names)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "First release."}
    # TFDS finds a builder's source file through an optional backport (importlib_resources)
    # for builders inside packages; naming the file directly avoids needing it.
    code_path = epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(IMAGE_SIDE, IMAGE_SIDE, 1),
                                              dtype=np.uint8, encoding=RAW_BYTES),
                "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
            }),
            supervised_keys=("image", "label"),
            homepage="https://github.com/zalandoresearch/fashion-mnist",
        )

    #: The folder of the four IDX files, set on an instance before building (the stored
    #: data does not depend on where the files were, so it is no config of the builder).
    source_dir: str = DEBIAN_DIR

    def _split_generators(self, dl_manager):
        del dl_manager  # the files are local
        paths, missing = idx_paths(self.source_dir)
        if paths is None:
            raise DatasetError(f"{self.source_dir}: missing {', '.join(missing)}")
        return {split: self._generate_examples(paths[split]) for split in IDX_FILES}

    def _generate_examples(self, paths: tuple[str, str]):
        images, labels = load_idx_split(paths)
        for index, (image, label) in enumerate(zip(images, labels)):
            yield index, {"image": image[..., None], "label": int(label)}


def _idx_builder(source_dir: str, directory: str) -> GapjaxFashionMnist:
    builder = GapjaxFashionMnist(data_dir=directory, file_format="array_record")
    builder.source_dir = source_dir
    return builder


def _tfds_prepared(directory: str) -> Any | None:
    """TFDS's own ``fashion_mnist`` when prepared as ArrayRecord in ``directory``."""
    try:
        builder = tfds.builder(NAME, data_dir=directory, file_format="array_record")
        builder.as_data_source(split="train")  # fails unless prepared as ArrayRecord
    except Exception:  # not prepared, another format, unreadable: not a source
        return None
    return builder


def find_source(source_dir: str | None, directory: str) -> Any:
    """The TFDS builder Fashion-MNIST is read from: ``gapjax_fashion_mnist`` (prepared, or
    to prepare from the IDX files of ``source_dir``, else of ``DEBIAN_DIR``), else TFDS's
    prepared ``fashion_mnist`` in ``directory``.

    Raises:
      DatasetError: one line naming every place looked in and how to get the files.
    """
    looked = []
    if source_dir:
        folders = [(os.path.expanduser(str(source_dir)), "config.dataset.source_dir")]
    else:
        folders = [(DEBIAN_DIR, "Debian's dataset-fashion-mnist")]
    for folder, what in folders:
        paths, missing = idx_paths(folder)
        builder = _idx_builder(folder, directory)
        if builder.is_prepared() or paths is not None:
            return builder
        looked.append(f"{folder} ({what}: missing {', '.join(missing)})")
    if not source_dir:
        tfds_builder = _tfds_prepared(directory)
        if tfds_builder is not None:
            return tfds_builder
        looked.append(f"{directory} (no TFDS fashion_mnist prepared as ArrayRecord)")
    raise DatasetError(
        f"config.dataset.name={NAME!r}: no Fashion-MNIST found; looked in "
        f"{'; '.join(looked)}. Get the four IDX files with `apt-get install "
        "dataset-fashion-mnist` or pass --config.dataset.source_dir=DIR with "
        f"{', '.join(f'{stem}.gz' for stems in IDX_FILES.values() for stem in stems)}")


def load_split(split: str, *, source_dir: str | None, directory: str) -> tuple[np.ndarray,
                                                                             np.ndarray]:
    """Fashion-MNIST's ``split`` as ``(images uint8 [N, 28, 28], labels int64 [N])``, from
    the same places as the dataset (``find_source``), preparing it first if needed."""
    if split not in IDX_FILES:
        raise ValueError(f"Fashion-MNIST split must be one of: {', '.join(IDX_FILES)}; "
                         f"got {split!r}")
    builder = find_source(source_dir, directory)
    if isinstance(builder, GapjaxFashionMnist) and not builder.is_prepared():
        builder = prepare_embedded(FashionMnistBuilder, builder_config(
            {"source_dir": source_dir}), directory).inner
    source = builder.as_data_source(split=split)
    examples = wrapped.AnnotatedSource(source, {}).__getitems__(range(len(source)))
    images = np.stack([np.asarray(e["image"], np.uint8).reshape(IMAGE_SIDE, IMAGE_SIDE)
                       for e in examples]) if examples else np.zeros((0, 28, 28), np.uint8)
    labels = np.array([int(e["label"]) for e in examples], np.int64)
    return images, labels


# --------------------------------------------------------------------------------------
# Pipeline hooks
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FashionConfig:
    """What the pipeline needs: where the files are and the preprocessing choices."""

    name: str
    source_dir: str | None
    image_size: int
    max_shift: int
    flip: bool


class FashionMnistBuilder(wrapped.WrappedBuilder):
    """``fashion_mnist`` behind the pipeline's builder interface (see ``find_source``)."""

    def __init__(self, config: FashionConfig, data_dir: str, file_format: str = ""):
        super().__init__(config, data_dir, file_format)
        self.inner = find_source(config.source_dir, data_dir)

    def is_prepared(self) -> bool:
        # TFDS's own fashion_mnist is only ever read (it was found readable), never built.
        return not isinstance(self.inner, GapjaxFashionMnist) or super().is_prepared()

    def extra_fields(self, split: str) -> dict[str, Any]:
        config = self.builder_config
        return {"pad_": (config.image_size - IMAGE_SIDE) // 2, "max_shift_": config.max_shift,
                "flip_": config.flip}


def builder_config(dataset_config: Any) -> FashionConfig:
    """``config.dataset`` -> ``FashionConfig``, checking every key it reads."""
    get = dataset_config.get
    size = get("image_size") or IMAGE_SIDE
    if size not in IMAGE_SIZES:
        raise ValueError(f"config.dataset.image_size={size!r} is not available for {NAME}; "
                         f"choose one of: {', '.join(map(str, IMAGE_SIZES))}")
    max_shift = get("max_shift", DEFAULT_MAX_SHIFT)
    if not isinstance(max_shift, int) or isinstance(max_shift, bool) or not 0 <= max_shift < 14:
        raise ValueError(f"config.dataset.max_shift={max_shift!r} is not valid for {NAME}; "
                         "choose an integer number of pixels in [0, 13]")
    flip = bool(get("flip", True))
    source_dir = get("source_dir") or None
    return FashionConfig(name=f"{size}_shift{max_shift}_{'flip' if flip else 'noflip'}",
                         source_dir=source_dir, image_size=int(size), max_shift=max_shift,
                         flip=flip)


def preprocess(example: dict, rng: np.random.Generator | None) -> dict[str, np.ndarray]:
    """``image uint8 [28, 28, 1]`` -> normalised float32 ``[S, S, 1]`` (S = 28 or 32, zero
    padded), shifted and flipped in training; ``label`` int32."""
    image = np.asarray(example["image"], np.float32).reshape(IMAGE_SIDE, IMAGE_SIDE, 1)
    image *= np.float32(1.0 / 255.0)
    pad = int(example.get("pad_", 0))
    if pad:
        image = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    if rng is not None:
        max_shift = int(example.get("max_shift_", DEFAULT_MAX_SHIFT))
        if max_shift:
            dy, dx = (int(v) for v in rng.integers(-max_shift, max_shift + 1, size=2))
            image = canvas.shift(image, dy, dx)
        if example.get("flip_", True) and rng.random() < 0.5:
            image = image[:, ::-1]
    return {"image": np.ascontiguousarray((image - np.float32(MEAN)) * np.float32(1.0 / STD)),
            "label": np.asarray(example["label"], np.int32)}


SPEC = register(DatasetSpec(
    name=NAME,
    builder_class=FashionMnistBuilder,
    task="classification",
    num_classes=len(CLASS_NAMES),
    input_shape=(IMAGE_SIDE, IMAGE_SIDE, 1),
    builder_config=builder_config,
    preprocess=preprocess,
))


__all__ = [
    "CLASS_NAMES",
    "DEBIAN_DIR",
    "IDX_FILES",
    "NAME",
    "SPEC",
    "FashionMnistBuilder",
    "GapjaxFashionMnist",
    "builder_config",
    "find_source",
    "idx_paths",
    "load_idx_split",
    "load_split",
    "preprocess",
    "read_idx",
]

