"""The WSOL benchmarks of Choe et al. (CVPR 2020): CUB-200-2011, ILSVRC, OpenImages30k.

Images are read in place from ``config.dataset.image_root``, annotations from the
reference code's metadata layout (``metadata_root``; ``read_metadata``); docs/wsol.md
("Data layout") lists the files, the splits (``train``, ``train_fullsup`` = the metadata's
``val/``, ``test``) and the ``config.dataset`` keys. Datasets: ``wsol_cub`` (200 classes),
``wsol_ilsvrc`` (1000), ``wsol_openimages`` (100; masks, PxAP) and ``wsol_cub_tfds`` (the
prepared TFDS ``caltech_birds2011``, whose boxes end one pixel before the metadata's).

Transforms are the reference's, with PIL's bilinear filter as torchvision on PIL images:
training resizes to ``resize_size`` squared, takes a random ``image_size`` crop and flips;
evaluation resizes to ``image_size`` squared. ``wsol_method="has"`` hides patches of
training images, ``"cutmix"`` mixes training batches (which then carry ``label_mix`` and
``mix`` for the train step's CutMix loss; ``gapjax.wsol_methods``). Evaluation examples:
``image [S, S, 3]`` float32 (ImageNet mean / std), ``label``, ``bbox [M, 4]`` normalised
and padded with -1 (``gapjax.wsol.boxes_from_reference``), ``image_size [2]`` (the
original height and width, so ``protocol="wsolevaluation"`` can scale the boxes back
exactly) and, for OpenImages, ``segmentation [S, S]`` uint8 (1 / 0 / 255 ignored) resized
with OpenCV's nearest-neighbour rule. Training examples carry ``image`` and ``label``.
"""

from __future__ import annotations

import dataclasses
import os
import types
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from gapjax import imagenet, wsol_methods
from gapjax.data.pipeline import stack_and_pad
from gapjax.data.spec import DatasetSpec, register
from gapjax.wsol import (
    SplitMetadata,
    boxes_from_reference,
    read_metadata,
    reference_mask,
    resize_nearest,
)

#: gapjax split name -> the reference's metadata folder.
SPLITS = {"train": "train", "train_fullsup": "val", "test": "test"}
#: Benchmarks: dataset name -> (reference name, classes, localization kind).
BENCHMARKS = {
    "wsol_cub": ("CUB", 200, "boxes"),
    "wsol_ilsvrc": ("ILSVRC", 1000, "boxes"),
    "wsol_openimages": ("OpenImages", 100, "masks"),
}
DEFAULT_IMAGE_SIZE = 224
DEFAULT_RESIZE_SIZE = 256


# --------------------------------------------------------------------------------------
# Images and masks
# --------------------------------------------------------------------------------------


def load_rgb(path: str) -> Any:
    """A PIL RGB image (as the reference opens them)."""
    with Image.open(path) as image:
        return image.convert("RGB")


def resize_rgb(image: Any, height: int, width: int) -> np.ndarray:
    """PIL bilinear resize (torchvision's ``Resize`` on a PIL image) -> uint8 [H, W, 3]."""
    return np.asarray(image.resize((width, height), Image.BILINEAR))


def _train_crop(image: Any, size: int, resize: int, rng: np.random.Generator) -> np.ndarray:
    """The reference's training transform: resize to ``resize x resize``, a random
    ``size x size`` crop, a horizontal flip with probability 1/2; normalised ``[size, size,
    3]`` float32."""
    pixels = resize_rgb(image, resize, resize)
    top, left = (int(v) for v in rng.integers(0, resize - size + 1, size=2))
    pixels = pixels[top:top + size, left:left + size]
    if rng.random() < 0.5:
        pixels = pixels[:, ::-1]
    return _normalise(pixels)


def _normalise(pixels: np.ndarray) -> np.ndarray:
    """uint8 ``[H, W, 3]`` -> contiguous float32, torchvision's ``ToTensor`` + ``Normalize``."""
    return np.ascontiguousarray(imagenet.normalize(pixels))


# --------------------------------------------------------------------------------------
# Data source and builder (the pipeline's builder interface, reading files directly)
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BenchmarkConfig:
    """Where a benchmark is and how to size it; ``name`` identifies the variant."""

    name: str
    benchmark: str
    metadata_root: str
    image_root: str
    mask_root: str
    image_size: int
    resize_size: int
    method: str = "cam"
    has_grid_size: int = 4
    has_drop_rate: float = 0.5
    cutmix_beta: float = 1.0
    cutmix_prob: float = 1.0


class MetadataSource(Sequence):
    """One split as a random-access sequence of raw examples (paths and annotations);
    images are decoded by ``preprocess`` in the pipeline's reader threads."""

    def __init__(self, config: BenchmarkConfig, split: str):
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is not one of: {', '.join(SPLITS)}")
        _, _, kind = BENCHMARKS[config.benchmark]
        self.config = config
        self.train = split == "train"
        self.meta = read_metadata(os.path.join(config.metadata_root, SPLITS[split]),
                                  "none" if self.train else kind)
        self.kind = kind
        if not self.train and kind == "boxes" and self.meta.boxes is None:
            raise ValueError(f"split {split!r} of {config.metadata_root!r} has no "
                             "localization.txt with boxes")
        self.max_boxes = max([len(b) for b in self.meta.boxes or ()] or [1])

    def __len__(self) -> int:
        return len(self.meta.image_ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        meta, config = self.meta, self.config
        example: dict[str, Any] = {
            "path": os.path.join(config.image_root, meta.image_ids[index]),
            "label": meta.labels[index],
            "image_size_": config.image_size,
            "resize_size_": config.resize_size,
            "train_": self.train,
        }
        if self.train and config.method in ("has", "cutmix"):
            example["method_"] = config
        if meta.sizes is not None:
            example["size_wh"] = meta.sizes[index]
        if not self.train and meta.boxes is not None:
            example["boxes"] = meta.boxes[index]
            example["max_boxes"] = self.max_boxes
        if not self.train and meta.masks is not None:
            example["masks"] = meta.masks[index]
            example["mask_root"] = config.mask_root
        return example


class MetadataBuilder:
    """The pipeline's builder interface (``is_prepared``, ``as_data_source``) over the raw
    files: nothing is converted or copied."""

    builder_configs: ClassVar[dict] = {}

    def __init__(self, config: Any, data_dir: str, file_format: str = ""):
        del file_format
        self.builder_config = config
        self.data_dir = data_dir
        self.name = config.benchmark
        self.info = types.SimpleNamespace(splits=dict.fromkeys(SPLITS))

    def is_prepared(self) -> bool:
        return True

    def download_and_prepare(self) -> None:  # pragma: no cover - never needed
        pass

    def as_data_source(self, split: str) -> MetadataSource:
        return MetadataSource(self.builder_config, split)


def _preprocess(example: dict[str, Any], rng: np.random.Generator | None) -> dict[str, Any]:
    """The reference's transforms (see the module docstring); ``rng`` None = evaluation."""
    size, resize = int(example["image_size_"]), int(example["resize_size_"])
    image = load_rgb(example["path"])
    width, height = example.get("size_wh", image.size)
    if rng is not None and example["train_"]:
        out = {"image": _train_crop(image, size, resize, rng),
               "label": np.asarray(example["label"], np.int32)}
        return _training_method(out, example.get("method_"), rng)
    out = {"image": _normalise(resize_rgb(image, size, size)),
           "label": np.asarray(example["label"], np.int32)}
    if example["train_"]:
        return out
    out["image_size"] = np.array([height, width], np.int32)
    if "boxes" in example:
        boxes = np.full((int(example["max_boxes"]), 4), -1.0, np.float32)
        if example["boxes"]:
            boxes[:len(example["boxes"])] = boxes_from_reference(example["boxes"],
                                                                 (height, width))
        out["bbox"] = boxes
    if "masks" in example:
        mask_paths, ignore_path = example["masks"]
        out["segmentation"] = reference_mask(example["mask_root"], mask_paths, ignore_path,
                                             size)
    return out


def _training_method(example: dict[str, Any], method: BenchmarkConfig | None,
                     rng: np.random.Generator) -> dict[str, Any]:
    """Hide-and-Seek on the example, or the per-example draws CutMix's collate uses."""
    if method is None:
        return example
    if method.method == "has":
        grid = wsol_methods.patch_grid(*example["image"].shape[:2], method.has_grid_size)
        example["image"] = wsol_methods.hide_and_seek(
            example["image"], rng.random(grid), method.has_grid_size, method.has_drop_rate)
    elif method.method == "cutmix":
        beta = method.cutmix_beta
        lam = rng.beta(beta, beta) if beta > 0 else 1.0
        apply = float(beta > 0 and method.cutmix_prob > rng.random())
        example["cutmix_draws"] = np.array([apply, lam, rng.random(), rng.random(),
                                            rng.random()], np.float64)
    return example


def _collate(examples: list[dict[str, Any]], batch_size: int) -> dict[str, np.ndarray]:
    """Stack and pad; a CutMix training batch is mixed with its first example's draws
    (apply, lam, box centre) and the partner order of every example's last draw."""
    batch = stack_and_pad(examples, batch_size)
    draws = batch.pop("cutmix_draws", None)
    if draws is None:
        return batch
    labels = batch["label"]
    if draws[0, 0] > 0:
        height, width = batch["image"].shape[1:3]
        permutation = np.argsort(draws[:, 4], kind="stable")
        images, partners, share = wsol_methods.cutmix(
            batch["image"], labels, permutation, draws[0, 1], int(draws[0, 2] * height),
            int(draws[0, 3] * width))
        batch["image"] = np.ascontiguousarray(images, np.float32)
    else:
        partners, share = labels, np.ones(labels.shape, np.float32)
    batch["label_mix"] = np.asarray(partners, np.int32)
    batch["mix"] = np.asarray(share, np.float32)
    return batch


def _required(dataset_config: Any, key: str, name: str) -> str:
    value = dataset_config.get(key)
    if not value:
        raise ValueError(f"config.dataset.{key} is required for {name!r} (see "
                         "gapjax/data/wsol_benchmarks.py and docs/wsol.md)")
    return os.path.expanduser(str(value))


def builder_config(name: str):
    """``config.dataset -> BenchmarkConfig`` for the benchmark registered as ``name``."""

    def make(dataset_config: Any) -> BenchmarkConfig:
        image_root = _required(dataset_config, "image_root", name)
        metadata_root = _required(dataset_config, "metadata_root", name)
        mask_root = os.path.expanduser(str(dataset_config.get("mask_root") or image_root))
        image_size = int(dataset_config.get("image_size") or DEFAULT_IMAGE_SIZE)
        resize_size = int(dataset_config.get("resize_size") or DEFAULT_RESIZE_SIZE)
        if not 0 < image_size <= resize_size:
            raise ValueError(f"config.dataset.image_size={image_size} must be positive and "
                             f"at most config.dataset.resize_size={resize_size}")
        method = str(dataset_config.get("wsol_method") or "cam")
        if method not in wsol_methods.METHODS:
            raise ValueError(f"config.dataset.wsol_method={method!r} is not one of: "
                             f"{', '.join(wsol_methods.METHODS)}")
        options = {
            "has_grid_size": int(dataset_config.get("has_grid_size",
                                                    wsol_methods.HAS_GRID_SIZE)),
            "has_drop_rate": float(dataset_config.get("has_drop_rate",
                                                      wsol_methods.HAS_DROP_RATE)),
            "cutmix_beta": float(dataset_config.get("cutmix_beta", wsol_methods.CUTMIX_BETA)),
            "cutmix_prob": float(dataset_config.get("cutmix_prob", wsol_methods.CUTMIX_PROB)),
        }
        key = (f"{name}|{metadata_root}|{image_root}|{mask_root}|{image_size}|{resize_size}|"
               f"{method}|{sorted(options.items())}")
        return BenchmarkConfig(key, name, metadata_root, image_root, mask_root, image_size,
                               resize_size, method, **options)

    return make


SPECS = {
    name: register(DatasetSpec(
        name=name,
        builder_class=MetadataBuilder,
        task="classification",
        num_classes=classes,
        input_shape=(DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE, 3),
        train_split="train",
        eval_split="train_fullsup",
        builder_config=builder_config(name),
        preprocess=_preprocess,
        collate=_collate,
    ))
    for name, (_, classes, _) in BENCHMARKS.items()
}


# --------------------------------------------------------------------------------------
# TFDS caltech_birds2011: a second route to CUB
# --------------------------------------------------------------------------------------

TFDS_CUB = "caltech_birds2011"


@dataclasses.dataclass(frozen=True)
class TfdsCubConfig:
    name: str
    image_size: int
    resize_size: int
    benchmark: str = TFDS_CUB


class TfdsCubBuilder(MetadataBuilder):
    """The prepared TFDS ``caltech_birds2011`` (nothing is downloaded here)."""

    def __init__(self, config: TfdsCubConfig, data_dir: str, file_format: str = ""):
        super().__init__(config, data_dir)
        self._builder = tfds.builder(TFDS_CUB, data_dir=data_dir, file_format="array_record")
        self.info = self._builder.info

    def as_data_source(self, split: str) -> Sequence:
        try:
            source = self._builder.as_data_source(split=split)
        except Exception as error:  # missing files surface as several kinds
            raise ValueError(
                f"TFDS {TFDS_CUB!r} split {split!r} is not prepared as ArrayRecord in "
                f"{self.data_dir!r} ({type(error).__name__}); prepare it with `tfds build "
                f"{TFDS_CUB} --data_dir {self.data_dir} --file_format array_record`") from None
        return _TfdsCubSource(source, self.builder_config, split == "train")


class _TfdsCubSource(Sequence):
    def __init__(self, source: Sequence, config: TfdsCubConfig, train: bool):
        self.source, self.config, self.train = source, config, train

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = dict(self.source[index])
        example.update(image_size_=self.config.image_size, resize_size_=self.config.resize_size,
                       train_=self.train)
        return example


def _tfds_cub_preprocess(example: dict[str, Any], rng: np.random.Generator | None):
    pixels = np.asarray(example["image"], np.uint8)
    if pixels.ndim == 2 or pixels.shape[-1] == 1:
        pixels = np.repeat(pixels.reshape(*pixels.shape[:2], 1), 3, axis=-1)
    image = Image.fromarray(pixels)
    size, resize = int(example["image_size_"]), int(example["resize_size_"])
    label = np.asarray(example["label"], np.int32)
    if rng is not None and example["train_"]:
        return {"image": _train_crop(image, size, resize, rng), "label": label}
    out = {"image": _normalise(resize_rgb(image, size, size)), "label": label}
    if not example["train_"]:
        box = np.asarray(example["bbox"], np.float32).reshape(-1, 4)[:1]  # one box per bird
        out["bbox"] = box
        out["image_size"] = np.array(pixels.shape[:2], np.int32)
    return out


def _tfds_cub_config(dataset_config: Any) -> TfdsCubConfig:
    image_size = int(dataset_config.get("image_size") or DEFAULT_IMAGE_SIZE)
    resize_size = int(dataset_config.get("resize_size") or DEFAULT_RESIZE_SIZE)
    return TfdsCubConfig(f"{TFDS_CUB}|{image_size}|{resize_size}", image_size, resize_size)


TFDS_CUB_SPEC = register(DatasetSpec(
    name="wsol_cub_tfds",
    builder_class=TfdsCubBuilder,
    task="classification",
    num_classes=200,
    input_shape=(DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE, 3),
    train_split="train",
    eval_split="test",
    builder_config=_tfds_cub_config,
    preprocess=_tfds_cub_preprocess,
))

__all__ = ["BENCHMARKS", "SPECS", "SPLITS", "TFDS_CUB_SPEC", "BenchmarkConfig", "MetadataBuilder",
           "MetadataSource", "SplitMetadata", "read_metadata", "reference_mask", "resize_nearest"]
