"""The input pipeline: TFDS ArrayRecord data sources read with grain.

``dataset_info(config.dataset)`` describes a dataset and ``make_iterator(config.dataset,
split, ...)`` yields dict batches of NumPy arrays for this process (what the model reads
from a batch is the task's ``model_inputs``, see ``gapjax.tasks``).

Datasets are either embedded (``DATASETS``: built by this project from local data on
first use, under a file lock so that concurrent processes build once) or any other TFDS
dataset prepared as ArrayRecord under the data directory: ``config.dataset.data_dir``,
else ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``.

Training iterators shuffle with a seed (differently each epoch), repeat, form *global*
batches of ``batch_size * process_count`` examples, and give each process its own block of
rows of every global batch; they augment and prefetch in threads. Every random choice
derives from ``seed`` and the example's global position in the stream, never from the
process index or global state, so P processes together read exactly the batches of one
process with a P times larger ``batch_size``, and an iterator restored with
``set_state(get_state())`` continues with exactly the batches an uninterrupted one would.
Evaluation iterators make one ordered pass over this process's shard and pad to whole
batches (``weight == 0`` rows); every process yields the same number of batches, so
collective evaluation steps never wait on a process that has run out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import io
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import numpy as np
import tensorflow_datasets as tfds

from gapjax.data import canvas
from gapjax.data.spec import DATASETS, DatasetSpec

Example = dict[str, Any]
Batch = dict[str, np.ndarray]

# Threads that read and preprocess whole batches ahead of the training step, and how many
# batches they may run ahead. Two threads match the small CPU budget the tests run on;
# the per-example work is NumPy on small arrays, which releases the GIL only briefly.
READ_THREADS = 2
PREFETCH_BATCHES = 4

# Per-channel mean / std of the [0, 1] intensities for prepared TFDS datasets.
_NORMALISATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
}
_IMAGENET_NORMALISATION = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_DEFAULT_IMAGE_SIZE = 224
# The usual evaluation policy: resize the shorter side to size / 0.875, take the centre.
_CENTRE_CROP_FRACTION = 0.875


class DatasetError(ValueError):
    """A dataset that cannot be used as configured; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the rest of the project needs to know about a dataset.

    Attributes:
      name: ``config.dataset.name``.
      task: a ``gapjax.tasks.TASKS`` name, e.g. ``"classification"``.
      num_classes: number of classes (labels for multilabel).
      input_shape: one model input without the batch axis, e.g. ``(16, 16, 1)``; for
        graphs the node feature shape.
      num_examples: examples per split (``train_split`` and ``eval_split``).
      train_split / eval_split: TFDS split names.
    """

    name: str
    task: str
    num_classes: int
    input_shape: tuple[int, ...]
    num_examples: dict[str, int]
    train_split: str
    eval_split: str


@dataclasses.dataclass(frozen=True)
class _Dataset:
    """A resolved dataset: its TFDS builder and the hooks that turn examples into batches."""

    name: str
    builder: Any
    task: str
    num_classes: int
    train_split: str
    eval_split: str
    preprocess: Callable[[Example, np.random.Generator | None], Example]
    collate: Callable[[list[Example], int], Batch]
    input_shape: tuple[int, ...] | None  # the spec's, for examples without an "image"


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def data_dir(dataset_config: Any) -> str:
    """The TFDS data directory: ``dataset.data_dir``, else ``$TFDS_DATA_DIR``, else ~/."""
    directory = dataset_config.get("data_dir") or os.environ.get("TFDS_DATA_DIR")
    return os.path.expanduser(directory or "~/tensorflow_datasets")


def dataset_info(dataset_config: Any) -> DatasetInfo:
    """Describes ``config.dataset``, building an embedded dataset first if needed.

    Raises:
      DatasetError: the name is neither embedded nor a prepared TFDS dataset, or a
        dataset-specific key has an invalid value.
    """
    dataset = _resolve(dataset_config)
    splits = (dataset.train_split, dataset.eval_split)
    num_examples = {split: len(_source(dataset, split)) for split in splits}
    # The stored image size need not be the model's (digits are upsampled; imagenet is
    # cropped), so ask the preprocessing itself.
    first = dataset.preprocess(_source(dataset, dataset.eval_split)[0], None)
    input_shape = (tuple(int(d) for d in np.shape(first["image"])) if "image" in first
                   else dataset.input_shape)
    return DatasetInfo(
        name=dataset.name,
        task=dataset.task,
        num_classes=dataset.num_classes,
        input_shape=input_shape,
        num_examples=num_examples,
        train_split=dataset.train_split,
        eval_split=dataset.eval_split,
    )


def make_iterator(
    dataset_config: Any,
    split: str,
    *,
    batch_size: int,
    seed: int,
    train: bool,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.DatasetIterator:
    """An iterator of dict batches of NumPy arrays for this process.

    Args:
      dataset_config: ``config.dataset`` (``name``, ``data_dir``, ``augment`` and
        dataset-specific keys).
      split: TFDS split name, e.g. ``info.train_split``.
      batch_size: examples per batch *for this process*.
      seed: shuffling and augmentation seed (training only).
      train: True for an endless shuffled, augmented stream with ``drop_remainder``; False
        for one ordered pass with the last batch padded (``weight == 0`` rows).
      process_index / process_count: this process's share. Training: rows
        ``[p * b, (p + 1) * b)`` of each global batch of ``b * process_count`` examples.
        Evaluation: examples ``p, p + P, p + 2P, ...``.

    Returns:
      A grain ``DatasetIterator``: ``next(it)`` gives e.g. ``{"image": [b, H, W, C]
      float32, "label": [b] int32, "weight": [b] float32, ...}``; ``get_state()`` /
      ``set_state(state)`` checkpoint and restore the position exactly.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise DatasetError(f"batch_size must be a positive integer; got {batch_size!r}")
    if not 0 <= process_index < process_count:
        raise DatasetError(
            f"process_index={process_index!r} must lie in [0, process_count={process_count!r})"
        )
    dataset = _resolve(dataset_config)
    source = _source(dataset, split)
    if train:
        augment = bool(dataset_config.get("augment", True))
        stream = _training_batches(
            dataset, source, batch_size, seed, augment, process_index, process_count
        )
    else:
        stream = _evaluation_batches(dataset, source, batch_size, process_index, process_count)
    read_options = grain.ReadOptions(
        num_threads=READ_THREADS, prefetch_buffer_size=PREFETCH_BATCHES
    )
    return iter(stream.to_iter_dataset(read_options))


def stack_and_pad(examples: Sequence[Example], batch_size: int) -> Batch:
    """Default collate: stacks ``examples`` and pads to ``batch_size`` rows.

    Padding rows are zeros (all -1 for ``bbox``, the padding-box convention) with
    ``weight`` 0; real rows have ``weight`` 1.
    """
    count = len(examples)
    if not 0 < count <= batch_size:
        raise ValueError(f"cannot collate {count} examples into a batch of {batch_size}")
    batch = {}
    for key in examples[0]:
        rows = np.stack([np.asarray(example[key]) for example in examples])
        if count < batch_size:
            fill = -1 if key == "bbox" else 0
            padding = np.full((batch_size - count, *rows.shape[1:]), fill, rows.dtype)
            rows = np.concatenate([rows, padding])
        batch[key] = rows
    batch["weight"] = (np.arange(batch_size) < count).astype(np.float32)
    return batch


# --------------------------------------------------------------------------------------
# Streams
# --------------------------------------------------------------------------------------


def _stream_seed(seed: int, purpose: int) -> int:
    """Independent 32-bit seeds for each (seed, purpose).

    The 0 in the middle (once the process index) keeps one-process streams as they were.
    """
    return int(np.random.SeedSequence([seed, 0, purpose]).generate_state(1)[0])


def _training_batches(
    dataset: _Dataset,
    source: Sequence[Example],
    batch_size: int,
    seed: int,
    augment: bool,
    process_index: int,
    process_count: int,
) -> grain.MapDataset:
    """Endless batches: shuffle (anew each epoch), repeat, take rows, read, augment, collate.

    grain shuffles all ``N`` example *indices* with a seed shared by every process and
    cuts the endless stream into global batches of ``B = batch_size * process_count``;
    process ``p`` keeps rows ``[p * b, (p + 1) * b)`` (``b = batch_size``) of each and reads
    them with one batched ArrayRecord lookup (several times faster than one read per
    example). The example at global position ``i = t * B + p * b + j`` (row ``j`` of this
    process's part of global batch ``t``) is augmented with
    ``default_rng([augment_seed, i])``. Both are pure functions of the seed and the global
    position, so the concatenated batches of processes ``0..P-1`` at step ``t`` equal the
    ``t``-th batch of one process with ``batch_size = B``, and a restored iterator replays
    the same examples and augmentations.

    Returns:
      Batches of ``b`` examples from ``dataset.collate``, e.g. ``image [b, H, W, C]``.
    """
    if len(source) == 0:
        raise DatasetError(f"the split of {dataset.name!r} to train on has no examples")
    global_batch_size = batch_size * process_count
    # Shuffling before repeating reshuffles every epoch without mixing epochs.
    indices = (
        grain.MapDataset.range(len(source))
        .shuffle(seed=_stream_seed(seed, 0))
        .repeat()
        .batch(global_batch_size, drop_remainder=True)
    )
    first_row = process_index * batch_size
    augment_seed = _stream_seed(seed, 1) if augment else None

    def load_batch(batch_index: int, global_indices: np.ndarray) -> Batch:
        examples = _read(source, global_indices[first_row : first_row + batch_size])
        first = batch_index * global_batch_size + first_row
        processed = [
            dataset.preprocess(
                example,
                None if augment_seed is None else np.random.default_rng([augment_seed, first + j]),
            )
            for j, example in enumerate(examples)
        ]
        return dataset.collate(processed, batch_size)

    return indices.map_with_index(load_batch)


def _evaluation_batches(
    dataset: _Dataset,
    source: Sequence[Example],
    batch_size: int,
    process_index: int,
    process_count: int,
) -> grain.MapDataset:
    """One ordered pass; all processes yield ``ceil(ceil(N / P) / b)`` batches."""
    shard = np.arange(process_index, len(source), process_count)
    per_process = -(-len(source) // process_count)
    num_batches = max(1, -(-per_process // batch_size))

    def load_batch(batch_index: int) -> Batch:
        indices = shard[batch_index * batch_size : (batch_index + 1) * batch_size]
        if indices.size == 0:
            # This process's shard is one example short of the longest and ran out: a
            # batch of one example at weight 0 keeps the shapes and the step count equal.
            batch = dataset.collate([dataset.preprocess(source[0], None)], batch_size)
            batch["weight"] = np.zeros_like(batch["weight"])
            return batch
        examples = [dataset.preprocess(example, None) for example in _read(source, indices)]
        return dataset.collate(examples, batch_size)

    return grain.MapDataset.range(num_batches).map(load_batch)


def _read(source: Any, indices: Sequence[int]) -> list[Example]:
    """Reads examples with one batched lookup where the source offers it."""
    keys = [int(i) for i in indices]
    read_many = getattr(source, "__getitems__", None)
    if read_many is not None:
        try:
            return list(read_many(keys))
        except TypeError:
            # tfds.testing.mock_data (TFDS 4.9) installs a __getitems__ that cannot be
            # called; reading one by one works with it and with any other source.
            pass
    return [source[key] for key in keys]


# --------------------------------------------------------------------------------------
# Resolving a dataset config
# --------------------------------------------------------------------------------------

_CACHE_LOCK = threading.Lock()
_RESOLVED: dict[tuple, _Dataset] = {}
_SOURCES: dict[tuple, Any] = {}


def _resolve(dataset_config: Any) -> _Dataset:
    name = dataset_config.get("name")
    directory = data_dir(dataset_config)
    if name in DATASETS:
        spec = DATASETS.get(name)
        config = spec.builder_config(dataset_config)
        key = (name, _config_key(config), directory)
        with _CACHE_LOCK:
            if key not in _RESOLVED:
                _RESOLVED[key] = _embedded(spec, config, directory)
            return _RESOLVED[key]
    key = (name, _generic_key(dataset_config), directory)
    with _CACHE_LOCK:
        if key not in _RESOLVED:
            _RESOLVED[key] = _prepared(name, dataset_config, directory)
        return _RESOLVED[key]


def _config_key(config: Any) -> Any:
    return getattr(config, "name", config)


def _generic_key(dataset_config: Any) -> tuple:
    return tuple(
        dataset_config.get(key)
        for key in ("image_size", "train_split", "eval_split", "flip", "image_key", "label_key")
    )


def _source(dataset: _Dataset, split: str) -> Sequence[Example]:
    key = (dataset.name, dataset.builder.builder_config, dataset.builder.data_dir, split)
    with _CACHE_LOCK:
        if key not in _SOURCES:
            try:
                _SOURCES[key] = dataset.builder.as_data_source(split=split)
            except (KeyError, ValueError) as error:
                raise DatasetError(
                    f"split {split!r} is not available in dataset {dataset.name!r}; "
                    f"choose one of: {', '.join(_split_names(dataset.builder))} ({error})"
                ) from None
        return _SOURCES[key]


def _split_names(builder: Any) -> list[str]:
    return sorted(builder.info.splits.keys()) or ["train", "test"]


def _embedded(spec: DatasetSpec, config: Any, directory: str) -> _Dataset:
    builder = prepare_embedded(spec.builder_class, config, directory)
    return _Dataset(
        name=spec.name,
        builder=builder,
        task=spec.task,
        # A spec may leave these to its builder (an image folder's classes and splits).
        num_classes=spec.num_classes or builder.num_classes,
        train_split=spec.train_split,
        eval_split=spec.eval_split or builder.eval_split,
        preprocess=spec.preprocess or _generic_image_preprocess(spec.name, None, False),
        collate=spec.collate or stack_and_pad,
        input_shape=tuple(spec.input_shape),
    )


def prepare_embedded(builder_class: type, config: Any, directory: str) -> Any:
    """The prepared builder, generating the files first if this is their first use.

    A file lock serialises builders of the same dataset variant across processes (two
    local processes of a multi-host run start together): the first builds, the others
    wait and then find it prepared. TFDS itself writes to a temporary directory and renames
    it when complete, so a crash never leaves a half-written dataset that looks prepared.
    """
    standard = builder_class.builder_configs or {}
    if config is not None and _config_key(config) in standard:
        config = _config_key(config)  # a standard variant: no "custom config" warning
    kwargs = {"config": config, "data_dir": directory, "file_format": "array_record"}
    with _quiet_tfds():
        builder = builder_class(**kwargs)
        prepared = builder.is_prepared()
    if prepared:
        return builder
    os.makedirs(directory, exist_ok=True)
    lock_path = os.path.join(directory, f".{builder.name}-{_config_key(config) or 'default'}.lock")
    with open(lock_path, "a") as lock_file, _file_lock(lock_file), _quiet_tfds():
        builder = builder_class(**kwargs)  # re-read: another process may have built it
        if not builder.is_prepared():
            # One line instead of TFDS's "Downloading and preparing dataset" banner, its
            # per-split progress bars and its warnings about the empty version folder.
            print(f"building {builder.name}/{_config_key(config) or 'default'} in {directory} "
                  "(first use; generated locally, nothing is downloaded)", file=sys.stderr,
                  flush=True)
            tfds.disable_progress_bar()
            builder.download_and_prepare()
            builder = builder_class(**kwargs)
    return builder


@contextlib.contextmanager
def _quiet_tfds() -> Iterator[None]:
    """Silences TFDS while it builds an embedded dataset: its banner and done line (printed
    to stdout) and its absl warnings and info logs (errors still show)."""
    from absl import logging as absl_logging

    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        absl_logging.set_verbosity(verbosity)


@contextlib.contextmanager
def _file_lock(lock_file) -> Iterator[None]:
    fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------
# Prepared TFDS datasets (cifar10, imagenet2012, mnist, ...)
# --------------------------------------------------------------------------------------

# Datasets whose held-out split is called "validation" rather than "test".
_VALIDATION_SPLIT_DATASETS = ("imagenet2012", "imagenet2012_subset", "imagenette", "imagewang")


def _not_available(name: Any, directory: str, reason: str) -> DatasetError:
    return DatasetError(
        f"config.dataset.name={name!r} is neither an embedded dataset "
        f"(choose one of: {', '.join(DATASETS.names())}) nor a TFDS dataset prepared as "
        f"ArrayRecord in data_dir={directory!r} ({reason}); prepare it with "
        f"`tfds build {name} --data_dir {directory} --file_format array_record` "
        "or set config.dataset.data_dir to where it is"
    )


def _prepared(name: Any, dataset_config: Any, directory: str) -> _Dataset:
    if not isinstance(name, str) or not name:
        raise _not_available(name, directory, "no name given")
    try:
        builder = tfds.builder(name, data_dir=directory, file_format="array_record")
    except Exception as error:  # TFDS raises several kinds for an unknown name
        raise _not_available(name, directory, f"TFDS: {type(error).__name__}") from None
    known_splits = set(builder.info.splits.keys())
    default_eval = "validation" if name.split("/")[0] in _VALIDATION_SPLIT_DATASETS else "test"
    if known_splits and "test" not in known_splits and "validation" in known_splits:
        default_eval = "validation"
    train_split = dataset_config.get("train_split") or "train"
    eval_split = dataset_config.get("eval_split") or default_eval
    try:
        builder.as_data_source(split=train_split)
    except Exception as error:  # missing or unreadable files surface as several kinds
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise _not_available(name, directory, f"{type(error).__name__}: {first_line}") from None

    features = builder.info.features
    image_key = dataset_config.get("image_key") or "image"
    label_key = dataset_config.get("label_key") or "label"
    for field, key in (("image_key", image_key), ("label_key", label_key)):
        if key not in features:
            raise DatasetError(
                f"config.dataset.{field}={key!r} is not a feature of {name!r}; "
                f"choose one of: {', '.join(sorted(features.keys()))}"
            )
    label_feature = features[label_key]
    if not hasattr(label_feature, "num_classes"):
        raise DatasetError(
            f"feature {label_key!r} of {name!r} is not a ClassLabel; set config.dataset.label_key "
            f"to one of: {', '.join(sorted(features.keys()))}"
        )
    stored_shape = tuple(features[image_key].shape)
    image_size = dataset_config.get("image_size")
    if image_size is None:
        fixed = all(isinstance(d, int) for d in stored_shape[:2])
        image_size = stored_shape[0] if fixed and stored_shape[0] == stored_shape[1] else None
    image_size = int(image_size or _DEFAULT_IMAGE_SIZE)
    flip = bool(dataset_config.get("flip", True))
    preprocess = _generic_image_preprocess(name, image_size, flip, image_key, label_key)
    return _Dataset(
        name=name,
        builder=builder,
        task="classification",
        num_classes=int(label_feature.num_classes),
        train_split=train_split,
        eval_split=eval_split,
        preprocess=preprocess,
        collate=stack_and_pad,
        input_shape=None,
    )


def _generic_image_preprocess(
    name: str,
    image_size: int | None,
    flip: bool,
    image_key: str = "image",
    label_key: str = "label",
) -> Callable[[Example, np.random.Generator | None], Example]:
    """Preprocessing for a generic ``image`` / ``label`` dataset.

    Images already ``image_size`` square (cifar10, mnist): training translates by up to an
    eighth of the side (random crop after zero padding) and flips left-right when ``flip``.
    Other images (imagenet): training takes a random crop of 25-100% of the area with
    aspect ratio 3/4-4/3 and resizes it; evaluation resizes the shorter side to
    ``image_size / 0.875`` and takes the centre square. Then per-channel normalisation.
    """
    mean, std = _NORMALISATION.get(name.split("/")[0], _IMAGENET_NORMALISATION)

    def preprocess(example: Example, rng: np.random.Generator | None) -> Example:
        image = np.asarray(example[image_key])
        if image.ndim == 2:
            image = image[..., None]
        image = image.astype(np.float32) * np.float32(1.0 / 255.0)
        size = image_size or image.shape[0]
        same_size = image.shape[0] == size and image.shape[1] == size
        if same_size:
            if rng is not None:
                max_shift = max(1, size // 8)
                dy, dx = (int(v) for v in rng.integers(-max_shift, max_shift + 1, size=2))
                image = canvas.shift(image, dy, dx)
        elif rng is not None:
            image = canvas.resize(_random_crop(image, rng), size, size)
        else:
            image = _centre_crop(image, size)
        if rng is not None and flip and rng.random() < 0.5:
            image = image[:, ::-1]
        channels = image.shape[-1]
        image_mean = np.asarray(mean[:channels] if len(mean) >= channels else mean[:1], np.float32)
        image_std = np.asarray(std[:channels] if len(std) >= channels else std[:1], np.float32)
        return {
            "image": np.ascontiguousarray((image - image_mean) / image_std, np.float32),
            "label": np.asarray(example[label_key], np.int32),
        }

    return preprocess


def _random_crop(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    height, width = image.shape[:2]
    area = height * width * rng.uniform(0.25, 1.0)
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    crop_h = int(np.clip(round(np.sqrt(area / aspect)), 1, height))
    crop_w = int(np.clip(round(np.sqrt(area * aspect)), 1, width))
    top = int(rng.integers(0, height - crop_h + 1))
    left = int(rng.integers(0, width - crop_w + 1))
    return image[top : top + crop_h, left : left + crop_w]


def _centre_crop(image: np.ndarray, size: int) -> np.ndarray:
    height, width = image.shape[:2]
    short = max(1, round(size / _CENTRE_CROP_FRACTION))
    scale = short / min(height, width)
    new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
    resized = canvas.resize(image, new_h, new_w)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return resized[top : top + size, left : left + size]
