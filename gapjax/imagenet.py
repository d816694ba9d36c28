"""ImageNet conventions without a download: the evaluation transform and class names.

* ``eval_transform(image)``: torchvision's standard evaluation transform for a PIL image,
  ``Resize(256)`` (shorter side to 256, bilinear; Pillow's resampling filter widens with
  the scale factor, i.e. it antialiases, exactly as torchvision's PIL path does),
  ``CenterCrop(224)``, ``ToTensor()`` and ``Normalize(MEAN, STD)``, returned as a float32
  ``[224, 224, 3]`` (HWC) array, equal to torchvision's CHW tensor transposed.
* ``class_names()`` / ``wordnet_ids()``: the 1000 classes in the standard order (sorted
  WordNet ids, ``n01440764`` = tench first), read from files that installed packages
  already ship: TensorFlow Datasets first (its ImageNet labels and the ImageNet label list
  of its SI-Score module), then timm's ``data/_info`` files, then torchvision's model
  metadata. The files are read as text, never imported, so nothing heavy is loaded and
  none of those packages is required (without any of them names are ``"class <k>"``).

Pillow is imported inside the functions that need it.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

NUM_CLASSES = 1000
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
RESIZE = 256
CROP = 224
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


# --------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------


def load_image(path: str | Path) -> Any:
    """Decodes an image file with Pillow as RGB, turned upright by its EXIF orientation
    (phone photos store the rotation there)."""
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        return image.convert("RGB")


def resized_size(height: int, width: int, size: int = RESIZE) -> tuple[int, int]:
    """``(new_height, new_width)`` with the shorter side ``size`` and the longer one
    ``int(size * long / short)`` (truncated, as torchvision computes it)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def resize_shorter(image: Any, size: int = RESIZE) -> Any:
    """Resizes a PIL image so its shorter side is ``size`` (bilinear, antialiased by
    Pillow); an image already at that size is returned as is."""
    from PIL import Image

    new_height, new_width = resized_size(image.height, image.width, size)
    if (new_height, new_width) == (image.height, image.width):
        return image
    return image.resize((new_width, new_height), Image.BILINEAR)


def crop_box(height: int, width: int, size: int = CROP) -> tuple[int, int]:
    """``(top, left)`` of the centred ``size x size`` crop (Python rounding of half the
    margin, as torchvision; negative when the image is smaller, i.e. zero padding)."""
    return round((height - size) / 2.0), round((width - size) / 2.0)


def center_crop(image: Any, size: int = CROP) -> Any:
    """The centred ``size x size`` crop of a PIL image, zero-padded where it is smaller."""
    from PIL import Image

    if image.width < size or image.height < size:
        padded = Image.new(image.mode, (max(image.width, size), max(image.height, size)))
        left = (size - image.width) // 2 if image.width < size else 0
        top = (size - image.height) // 2 if image.height < size else 0
        padded.paste(image, (left, top))
        image = padded
    top, left = crop_box(image.height, image.width, size)
    return image.crop((left, top, left + size, top + size))


def normalize(pixels: np.ndarray) -> np.ndarray:
    """uint8 ``[..., H, W, 3]`` -> float32 ``(x / 255 - MEAN) / STD`` (float32 arithmetic
    in torchvision's order, so the values match to the last bit)."""
    scaled = np.asarray(pixels).astype(np.float32) / np.float32(255)
    return (scaled - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)


def eval_transform(image: Any, resize: int = RESIZE, crop: int = CROP) -> np.ndarray:
    """torchvision's ImageNet evaluation transform of a PIL image: float32 ``[crop, crop,
    3]``. ``image`` is converted to RGB first."""
    image = image.convert("RGB") if image.mode != "RGB" else image
    cropped = center_crop(resize_shorter(image, resize), crop)
    return normalize(np.asarray(cropped, np.uint8))


def eval_crop_region(height: int, width: int, resize: int = RESIZE, crop: int = CROP
                     ) -> tuple[float, float, float, float]:
    """``(top, left, bottom, right)`` in original pixels of the region the evaluation
    transform keeps (for drawing it on the original picture)."""
    new_height, new_width = resized_size(height, width, resize)
    top, left = crop_box(new_height, new_width, crop)
    scale_y, scale_x = height / new_height, width / new_width
    return (top * scale_y, left * scale_x, (top + crop) * scale_y, (left + crop) * scale_x)


def denormalize(images: np.ndarray) -> np.ndarray:
    """Normalised ``[..., H, W, 3]`` back to ``[0, 1]`` pixels (for display)."""
    pixels = np.asarray(images) * np.asarray(STD) + np.asarray(MEAN)
    return np.clip(pixels, 0.0, 1.0)


def image_paths(inputs: Sequence[str | Path]) -> list[Path]:
    """Files named in ``inputs``, with folders expanded to their image files (sorted,
    recursively). Raises FileNotFoundError for a path that does not exist and ValueError
    when nothing is left."""
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            paths += sorted(p for p in path.rglob("*")
                            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            paths.append(path)
        else:
            raise FileNotFoundError(f"--image {str(item)!r} does not exist")
    if not paths:
        raise ValueError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in "
                         f"{', '.join(map(str, inputs))}; name image files or folders of them")
    return paths


# --------------------------------------------------------------------------------------
# Class names
# --------------------------------------------------------------------------------------


def _package_dir(package: str) -> Path | None:
    """A package's folder, found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]


def _list_literal(path: Path, variable: str) -> list[str] | None:
    """The list literal assigned to ``variable`` in a Python file, parsed, not run."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError):
        return None
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == variable for t in targets):
                try:
                    value = ast.literal_eval(node.value)
                except ValueError:
                    return None
                return [str(v) for v in value] if isinstance(value, list | tuple) else None
    return None


@functools.cache
def wordnet_ids() -> tuple[str, ...]:
    """The 1000 WordNet ids (``n01440764``, ...) in class order; empty if no installed
    package ships them."""
    candidates = []
    if (tfds := _package_dir("tensorflow_datasets")) is not None:
        candidates += [tfds / "datasets" / "imagenet2012" / "labels.txt",
                       tfds / "image_classification" / "imagenet2012_labels.txt"]
    if (timm := _package_dir("timm")) is not None:
        candidates.append(timm / "data" / "_info" / "imagenet_synsets.txt")
    for path in candidates:
        if path.is_file():
            ids = _read_lines(path)
            if len(ids) == NUM_CLASSES:
                return tuple(ids)
    return ()


@functools.cache
def class_descriptions() -> tuple[str, ...]:
    """The 1000 full class descriptions (``"tench, Tinca tinca"``, ...) in class order."""
    if (tfds := _package_dir("tensorflow_datasets")) is not None:
        names = _list_literal(tfds / "datasets" / "siscore" / "labels.py",
                              "IMAGENET_LABELS_LIST")
        if names and len(names) == NUM_CLASSES:
            return tuple(names)
    timm = _package_dir("timm")
    lemmas = timm / "data" / "_info" / "imagenet_synset_to_lemma.txt" if timm else None
    if wordnet_ids() and lemmas is not None and lemmas.is_file():
        table = dict(line.split("\t", 1) for line in _read_lines(lemmas) if "\t" in line)
        if all(wnid in table for wnid in wordnet_ids()):
            return tuple(table[wnid] for wnid in wordnet_ids())
    if (torchvision := _package_dir("torchvision")) is not None:
        names = _list_literal(torchvision / "models" / "_meta.py", "_IMAGENET_CATEGORIES")
        if names and len(names) == NUM_CLASSES:
            return tuple(names)
    return tuple(f"class {k}" for k in range(NUM_CLASSES))


@functools.cache
def class_names() -> tuple[str, ...]:
    """Short human-readable names, the first synonym of each description (``"tench"``)."""
    return tuple(description.split(",")[0].strip() for description in class_descriptions())


def class_name(index: int, num_classes: int = NUM_CLASSES) -> str:
    """The short name of class ``index`` for a 1000-class model, else ``"class <k>"``."""
    if num_classes == NUM_CLASSES and 0 <= index < NUM_CLASSES:
        return class_names()[index]
    return f"class {index}"


__all__ = ["CROP", "MEAN", "NUM_CLASSES", "RESIZE", "STD", "center_crop", "class_descriptions",
           "class_name", "class_names", "crop_box", "denormalize", "eval_crop_region",
           "eval_transform", "image_paths", "load_image", "normalize", "resize_shorter",
           "resized_size", "wordnet_ids"]
