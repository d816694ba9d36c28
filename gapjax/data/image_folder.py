"""``image_folder``: your own images, laid out as ``DIR/<split>/<class>/<image>``.

``config.dataset.source_dir = DIR`` with a ``train`` split folder and at least one
held-out one (``val``, ``validation`` or ``test``); every split holds one folder per class,
and the classes sorted by name are the labels 0, 1, ... (train's class folders define
them, as torchvision's ``ImageFolder`` does; files may sit in subfolders of a class
folder). Any format Pillow reads, gray or colour.

On first use the folder is prepared once as ArrayRecord under the data directory (the
TFDS builder ``gapjax_image_folder``, one config per folder state): every image is
decoded, converted to gray (when every image of the folder is gray, or
``dataset.channels = 1``) or RGB, and resized to ``image_size`` squared with Pillow's
antialiased bilinear filter (the aspect ratio is not kept). The config's name carries a
digest of the folder's relative paths, sizes and modification times (and of
``boxes.csv``), so a changed folder is prepared again and an unchanged one never is. An
image Pillow cannot read is skipped with one line naming it; one summary line counts
the images, classes and skipped files. The training split's per-channel mean and
standard deviation are stored with the data and normalise every split.

``DIR/boxes.csv`` (optional) makes it a localization dataset: rows
``path,x0,y0,x1,y1`` (an optional header row), ``path`` relative to ``DIR`` (e.g.
``test/cat/001.jpg``), the box's corners in pixels of the original image, continuous
coordinates (a box over pixel columns 0..9 is ``x0 = 0, x1 = 10``); several rows per image
allowed. Every example then carries ``bbox [M, 4]`` (normalised ``ymin, xmin, ymax,
xmax``; ``M`` the folder's most boxes per image; padding rows all -1), which the
localization evaluator scores (``config.eval.localization = True``); an image without rows
has only padding and counts as missed.

Keys of ``config.dataset``: ``source_dir`` (required), ``image_size`` (default 64),
``channels`` (None = automatic, 1 or 3), ``eval_split`` (default ``val``, else
``validation``, else ``test``: the first present), ``max_shift`` (training translation
in pixels, default ``image_size // 8``) and ``flip`` (random left-right flips in training,
default True; boxes move with both).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import os
import re
import sys
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from gapjax.data import canvas, wrapped
from gapjax.data.pipeline import DatasetError
from gapjax.data.spec import DatasetSpec, register

NAME = "image_folder"
TRAIN_SPLIT = "train"
#: Held-out split folders, in the order the default evaluation split is chosen.
HELD_OUT_SPLITS = ("val", "validation", "test")
BOXES_FILE = "boxes.csv"
DEFAULT_IMAGE_SIZE = 64
CHANNEL_CHOICES = (None, 1, 3)
# Pillow modes without colour: every other mode is converted to RGB.
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
RAW_BYTES = tfds.features.Encoding.BYTES


# --------------------------------------------------------------------------------------
# Scanning the folder
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class FolderScan:
    """What a folder holds, without decoding an image.

    Attributes:
      root: the folder (absolute).
      classes: class names, sorted: label ``k`` is ``classes[k]``.
      splits: split name -> ``((relative path, label), ...)`` in sorted path order.
      boxes: relative path -> ``((x0, y0, x1, y1), ...)`` in pixels, from ``boxes.csv``,
        or None without one.
      max_boxes: the most boxes of one image (0 without ``boxes.csv``).
      digest: hex digest of every file's relative path, size and modification time.
    """

    root: str
    classes: tuple[str, ...]
    splits: dict[str, tuple[tuple[str, int], ...]]
    boxes: dict[str, tuple[tuple[float, float, float, float], ...]] | None
    max_boxes: int
    digest: str


def _misshapen(root: str, reason: str) -> DatasetError:
    return DatasetError(
        f"config.dataset.source_dir={root!r}: {reason}; lay it out as "
        f"DIR/<split>/<class>/<image> with the splits {TRAIN_SPLIT} and one of "
        f"{', '.join(HELD_OUT_SPLITS)}")


def _visible(names: list[str]) -> list[str]:
    return sorted(name for name in names if not name.startswith("."))


def _class_files(root: str, split: str, class_name: str) -> list[str]:
    """Relative paths (``/``-separated) of every visible file under a class folder."""
    files = []
    top = os.path.join(root, split, class_name)
    for folder, subfolders, names in os.walk(top):
        subfolders[:] = _visible(subfolders)
        relative = os.path.relpath(folder, root).replace(os.sep, "/")
        files += [f"{relative}/{name}" for name in _visible(names)]
    return sorted(files)


def scan_folder(source_dir: Any) -> FolderScan:
    """Lists ``DIR/<split>/<class>/<image>`` and reads ``boxes.csv``.

    Raises:
      DatasetError: one line when the folder is missing, empty or misshapen, or a row of
        ``boxes.csv`` is malformed.
    """
    if not source_dir:
        raise DatasetError(f"config.dataset.source_dir is required for {NAME!r}: the folder "
                           "DIR/<split>/<class>/<image> to read")
    root = os.path.abspath(os.path.expanduser(str(source_dir)))
    if not os.path.isdir(root):
        raise _misshapen(root, "not a folder")
    entries = _visible(os.listdir(root))
    split_names = [name for name in entries if os.path.isdir(os.path.join(root, name))]
    if TRAIN_SPLIT not in split_names:
        found = ", ".join(split_names) or "none"
        raise _misshapen(root, f"no {TRAIN_SPLIT}/ folder (found: {found})")
    held_out = [name for name in HELD_OUT_SPLITS if name in split_names]
    if not held_out:
        raise _misshapen(root, f"no held-out split folder (found: {', '.join(split_names)})")
    classes: tuple[str, ...] = ()
    splits: dict[str, tuple[tuple[str, int], ...]] = {}
    for split in (TRAIN_SPLIT, *held_out):
        split_dir = os.path.join(root, split)
        names = _visible(os.listdir(split_dir))
        loose = [name for name in names if not os.path.isdir(os.path.join(split_dir, name))]
        if loose:
            raise _misshapen(root, f"{split}/{loose[0]} is not inside a class folder")
        if split == TRAIN_SPLIT:
            classes = tuple(names)
            if not classes:
                raise _misshapen(root, f"{split}/ has no class folders")
        unknown = [name for name in names if name not in classes]
        if unknown:
            raise _misshapen(root, f"class folder {split}/{unknown[0]} is not a class of "
                                   f"{TRAIN_SPLIT}/ ({', '.join(classes)})")
        splits[split] = tuple((path, label) for label, class_name in enumerate(classes)
                              for path in (_class_files(root, split, class_name)
                                           if class_name in names else []))
        if not splits[split]:
            raise _misshapen(root, f"{split}/ holds no images")
    hasher = hashlib.sha256()
    for split in splits:
        for path, label in splits[split]:
            stat = os.stat(os.path.join(root, path))
            hasher.update(f"{path}\t{label}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    boxes, max_boxes = None, 0
    boxes_path = os.path.join(root, BOXES_FILE)
    if os.path.isfile(boxes_path):
        images = {path for members in splits.values() for path, _ in members}
        boxes = read_boxes(boxes_path, images)
        max_boxes = max((len(rows) for rows in boxes.values()), default=0)
        with open(boxes_path, "rb") as file:
            hasher.update(b"boxes\n" + file.read())
    return FolderScan(root, classes, splits, boxes, max_boxes, hasher.hexdigest())


def read_boxes(path: str, images: set[str]) -> dict[str, tuple[tuple[float, ...], ...]]:
    """``boxes.csv`` -> relative image path -> pixel boxes ``(x0, y0, x1, y1)``.

    Raises:
      DatasetError: one line naming the file and line of a malformed row, of a path that
        is not an image of the folder, or of an empty box.
    """
    boxes: dict[str, list[tuple[float, ...]]] = {}
    with open(path, newline="") as file:
        for line_number, row in enumerate(csv.reader(file), start=1):
            if not row or all(not cell.strip() for cell in row):
                continue
            cells = [cell.strip() for cell in row]
            if len(cells) != 5:
                raise DatasetError(f"{path}:{line_number}: expected path,x0,y0,x1,y1; got "
                                   f"{len(cells)} fields")
            try:
                x0, y0, x1, y1 = (float(cell) for cell in cells[1:])
            except ValueError:
                if line_number == 1 and not any(_is_number(cell) for cell in cells[1:]):
                    continue  # a header row
                raise DatasetError(f"{path}:{line_number}: coordinates must be numbers; got "
                                   f"{', '.join(cells[1:])}") from None
            image = os.path.normpath(cells[0]).replace(os.sep, "/")
            if image not in images:
                raise DatasetError(f"{path}:{line_number}: {cells[0]!r} is not an image of "
                                   "the folder (paths are relative to it, like "
                                   "test/<class>/<image>)")
            if not (np.isfinite([x0, y0, x1, y1]).all() and x1 > x0 and y1 > y0):
                raise DatasetError(f"{path}:{line_number}: an empty box ({x0}, {y0}, {x1}, "
                                   f"{y1}); x1 > x0 and y1 > y0 are needed")
            boxes.setdefault(image, []).append((x0, y0, x1, y1))
    return {image: tuple(rows) for image, rows in boxes.items()}


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@functools.lru_cache(maxsize=8)
def _all_gray(root: str, digest: str) -> bool:
    """Whether every readable image of the folder is gray (reads headers only)."""
    from PIL import Image

    scan = _SCANS[(root, digest)]
    for members in scan.splits.values():
        for path, _ in members:
            try:
                with Image.open(os.path.join(root, path)) as image:
                    if image.mode not in GRAY_MODES:
                        return False
            except Exception:  # unreadable: skipped when the images are decoded
                continue
    return True


_SCANS: dict[tuple[str, str], FolderScan] = {}


# --------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------


def load_image(path: str, size: int, channels: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Decodes ``path`` as ``uint8 [size, size, channels]`` and its original ``(height,
    width)``. 16- and 32-bit gray images are scaled from 0..65535."""
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        width, height = image.size
        if image.mode.startswith("I"):  # Pillow's own conversion would clip at 255
            wide = np.asarray(image, np.float64) * (255.0 / 65535.0)
            image = Image.fromarray(np.clip(np.rint(wide), 0, 255).astype(np.uint8), "L")
        image = image.convert("L" if channels == 1 else "RGB")
        resized = image.resize((size, size), Image.BILINEAR)
    pixels = np.asarray(resized, np.uint8).reshape(size, size, channels)
    return pixels, (height, width)


def normalised_boxes(pixel_boxes: Any, height: int, width: int, count: int) -> np.ndarray:
    """Pixel boxes ``(x0, y0, x1, y1)`` -> ``float32 [count, 4]`` ``(ymin, xmin, ymax,
    xmax)`` in [0, 1], padded with all -1 rows."""
    out = np.full((count, 4), -1.0, np.float32)
    for row, (x0, y0, x1, y1) in enumerate(pixel_boxes or ()):
        out[row] = np.clip([y0 / height, x0 / width, y1 / height, x1 / width], 0.0, 1.0)
    return out


# --------------------------------------------------------------------------------------
# The ArrayRecord builder
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class FolderBuildConfig(tfds.core.BuilderConfig):
    """One state of one folder at one size and channel count."""

    root: str = ""
    digest: str = ""
    image_size: int = DEFAULT_IMAGE_SIZE
    channels: int = 3


class GapjaxImageFolder(tfds.core.GeneratorBasedBuilder):
    """An image folder: ``image uint8 [S, S, C]``, ``label``, ``bbox [M, 4]`` with boxes."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "First release."}
    code_path = epath.Path(__file__)

    @property
    def scan(self) -> FolderScan:
        config = self.builder_config
        return _SCANS[(config.root, config.digest)]

    def _info(self) -> tfds.core.DatasetInfo:
        config, scan = self.builder_config, self.scan
        size = config.image_size
        features = {
            "image": tfds.features.Tensor(shape=(size, size, config.channels), dtype=np.uint8,
                                          encoding=RAW_BYTES),
            "label": tfds.features.ClassLabel(names=list(scan.classes)),
        }
        if scan.boxes is not None:
            features["bbox"] = tfds.features.Tensor(shape=(max(scan.max_boxes, 1), 4),
                                                    dtype=np.float32)
        return tfds.core.DatasetInfo(
            builder=self, description=__doc__,
            features=tfds.features.FeaturesDict(features),
            supervised_keys=("image", "label"),
            # Filled while building: the training mean / std and the skipped files.
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # the files are local
        self.info.metadata["skipped"] = {}
        return {split: self._generate_examples(split) for split in self.scan.splits}

    def _generate_examples(self, split: str):
        config, scan = self.builder_config, self.scan
        channels = config.channels
        sums = np.zeros(channels, np.float64)
        squares = np.zeros(channels, np.float64)
        count = skipped = 0
        for path, label in scan.splits[split]:
            full_path = os.path.join(scan.root, path)
            try:
                image, (height, width) = load_image(full_path, config.image_size, channels)
            except Exception as error:  # any decoder failure: skip the file, say which
                first = (str(error).strip().splitlines() or [""])[0]
                print(f"{NAME}: skipped unreadable image {full_path} "
                      f"({type(error).__name__}: {first})", file=sys.stderr, flush=True)
                skipped += 1
                continue
            example = {"image": image, "label": label}
            if scan.boxes is not None:
                example["bbox"] = normalised_boxes(scan.boxes.get(path), height, width,
                                                   max(scan.max_boxes, 1))
            if split == TRAIN_SPLIT:
                pixels = image.reshape(-1, channels).astype(np.float64) / 255.0
                sums += pixels.sum(axis=0)
                squares += (pixels**2).sum(axis=0)
                count += len(pixels)
            yield path, example
        self.info.metadata["skipped"][split] = skipped
        if split == TRAIN_SPLIT and count:
            mean = sums / count
            std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
            self.info.metadata["mean"] = [float(v) for v in mean]
            self.info.metadata["std"] = [float(max(v, 1e-3)) for v in std]


# --------------------------------------------------------------------------------------
# Pipeline hooks
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FolderConfig:
    """The pipeline's config: ``name`` spells out the folder state and every choice."""

    name: str
    root: str
    digest: str
    image_size: int
    channels: int | None
    eval_split: str
    max_shift: int
    flip: bool


def _slug(root: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", os.path.basename(root)).strip("_")[:32] or "folder"


def _positive_int(dataset_config: Any, key: str, default: int, low: int, high: int) -> int:
    value = dataset_config.get(key)
    value = default if value is None else value
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"config.dataset.{key}={value!r} is not valid for {NAME}; choose an "
                         f"integer in [{low}, {high}]")
    return value


def builder_config(dataset_config: Any) -> FolderConfig:
    """``config.dataset`` -> ``FolderConfig``: scans the folder, checks every key."""
    scan = scan_folder(dataset_config.get("source_dir"))
    _SCANS[(scan.root, scan.digest)] = scan
    size = _positive_int(dataset_config, "image_size", DEFAULT_IMAGE_SIZE, 4, 4096)
    channels = dataset_config.get("channels")
    if channels not in CHANNEL_CHOICES:
        raise ValueError(f"config.dataset.channels={channels!r} is not valid for {NAME}; "
                         "choose None (automatic), 1 or 3")
    held_out = [split for split in HELD_OUT_SPLITS if split in scan.splits]
    eval_split = dataset_config.get("eval_split") or held_out[0]
    if eval_split not in held_out:
        raise ValueError(f"config.dataset.eval_split={eval_split!r} is not a held-out split "
                         f"of {scan.root}; choose one of: {', '.join(held_out)}")
    max_shift = _positive_int(dataset_config, "max_shift", size // 8, 0, size - 1)
    flip = bool(dataset_config.get("flip", True))
    name = (f"{_slug(scan.root)}_{scan.digest[:16]}_{size}px_c{channels or 'auto'}_"
            f"{eval_split}_s{max_shift}_{'flip' if flip else 'noflip'}")
    return FolderConfig(name, scan.root, scan.digest, size, channels, eval_split, max_shift,
                        flip)


class ImageFolderBuilder(wrapped.WrappedBuilder):
    """``image_folder`` behind the pipeline's builder interface; its ``num_classes`` and
    ``eval_split`` come from the folder."""

    def __init__(self, config: FolderConfig, data_dir: str, file_format: str = ""):
        super().__init__(config, data_dir, file_format)
        scan = _SCANS[(config.root, config.digest)]
        self.num_classes = len(scan.classes)
        self.eval_split = config.eval_split
        candidates = (config.channels,) if config.channels else (1, 3)
        builders = [self._inner(channels) for channels in candidates]
        prepared = [builder for builder in builders if builder.is_prepared()]
        if prepared:
            self.inner = prepared[0]
        elif config.channels:
            self.inner = builders[0]
        else:
            self.inner = self._inner(1 if _all_gray(config.root, config.digest) else 3)

    def _inner(self, channels: int) -> GapjaxImageFolder:
        config = self.builder_config
        build_config = FolderBuildConfig(
            name=(f"{_slug(config.root)}_{config.image_size}px_"
                  f"{'gray' if channels == 1 else 'rgb'}_{config.digest[:16]}"),
            description=f"{config.root} at {config.image_size}x{config.image_size}",
            root=config.root, digest=config.digest, image_size=config.image_size,
            channels=channels)
        return GapjaxImageFolder(config=build_config, data_dir=self.data_dir,
                                 file_format="array_record")

    def download_and_prepare(self) -> None:
        super().download_and_prepare()
        info, scan = self.inner.info, self.inner.scan
        counts = ", ".join(f"{info.splits[split].num_examples} {split}" for split in scan.splits)
        skipped = sum(info.metadata.get("skipped", {}).values())
        with_boxes = (f"; {sum(len(rows) for rows in scan.boxes.values())} boxes on "
                      f"{len(scan.boxes)} images" if scan.boxes is not None else "")
        print(f"{NAME} {scan.root}: {counts} images in {len(scan.classes)} classes "
              f"({skipped} unreadable skipped{with_boxes})", file=sys.stderr, flush=True)

    def extra_fields(self, split: str) -> dict[str, Any]:
        config, metadata = self.builder_config, self.inner.info.metadata
        channels = self.inner.builder_config.channels
        return {
            "mean_": np.asarray(metadata.get("mean", [0.5] * channels), np.float32),
            "std_": np.asarray(metadata.get("std", [0.25] * channels), np.float32),
            "max_shift_": config.max_shift,
            "flip_": config.flip,
        }


def flip_boxes(boxes: np.ndarray) -> np.ndarray:
    """Mirrors normalised ``boxes [M, 4]`` left-right; padding rows stay padding."""
    flipped = boxes.copy()
    flipped[:, 1], flipped[:, 3] = 1.0 - boxes[:, 3], 1.0 - boxes[:, 1]
    return np.where(np.all(boxes < 0, axis=-1, keepdims=True), boxes, flipped)


def preprocess(example: dict, rng: np.random.Generator | None) -> dict[str, np.ndarray]:
    """``image uint8 [S, S, C]`` -> normalised float32 (the training split's mean / std),
    shifted and flipped in training together with ``bbox [M, 4]`` where present."""
    image = np.asarray(example["image"], np.float32) * np.float32(1.0 / 255.0)
    boxes = example.get("bbox")
    boxes = None if boxes is None else np.asarray(boxes, np.float32).reshape(-1, 4)
    if rng is not None:
        max_shift = int(example.get("max_shift_", 0))
        if max_shift:
            dy, dx = (int(v) for v in rng.integers(-max_shift, max_shift + 1, size=2))
            image = canvas.shift(image, dy, dx)
            if boxes is not None:
                boxes = canvas.shift_boxes(boxes, dy, dx, *image.shape[:2])
        if example.get("flip_", False) and rng.random() < 0.5:
            image = image[:, ::-1]
            if boxes is not None:
                boxes = flip_boxes(boxes)
    mean = np.asarray(example.get("mean_", 0.5), np.float32)
    std = np.asarray(example.get("std_", 0.25), np.float32)
    out = {"image": np.ascontiguousarray((image - mean) / std, np.float32),
           "label": np.asarray(example["label"], np.int32)}
    if boxes is not None:
        out["bbox"] = boxes
    return out


SPEC = register(DatasetSpec(
    name=NAME,
    builder_class=ImageFolderBuilder,
    task="classification",
    num_classes=None,
    input_shape=(DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE, 3),
    eval_split=None,
    builder_config=builder_config,
    preprocess=preprocess,
))

__all__ = [
    "BOXES_FILE",
    "HELD_OUT_SPLITS",
    "NAME",
    "SPEC",
    "FolderScan",
    "GapjaxImageFolder",
    "ImageFolderBuilder",
    "builder_config",
    "flip_boxes",
    "load_image",
    "normalised_boxes",
    "preprocess",
    "read_boxes",
    "scan_folder",
]
