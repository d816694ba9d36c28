"""How an embedded dataset plugs into the input pipeline: ``DatasetSpec`` and ``DATASETS``.

A spec names a TFDS builder made by this project and says how to turn its examples into
batches. The generic pipeline (``gapjax.data.pipeline``) does the reading, sharding,
shuffling, repeating and batching; a spec supplies only what is particular to its data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from gapjax.registry import Registry
from gapjax.tasks import TASKS


def _no_builder_config(dataset_config: Any) -> Any:
    del dataset_config
    return None


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """An embedded dataset.

    Attributes:
      name: registry name, equal to the TFDS builder's name.
      builder_class: the ``tfds.core.GeneratorBasedBuilder`` subclass that writes it.
      task: a ``gapjax.tasks.TASKS`` name (``"classification"``, ``"multilabel"``,
        ``"graph"``, or a fork's): the task owns the loss, metrics and model inputs.
      num_classes: number of classes (labels for multilabel); None = the builder's
        ``num_classes`` attribute (a dataset whose classes depend on the data, such as an
        image folder's).
      input_shape: per-example model input shape, e.g. ``(8, 8, 1)``; for graphs the node
        feature shape ``(F,)``.
      train_split / eval_split: TFDS split names; ``eval_split`` None = the builder's
        ``eval_split`` attribute.
      builder_config: maps ``config.dataset`` to a builder config: its name, a
        ``tfds.core.BuilderConfig`` (for parametrised variants), or None for the default.
      preprocess: ``(example: dict, rng: np.random.Generator | None) -> dict`` for one raw
        TFDS example; ``rng`` is None for evaluation (no augmentation). None = the
        pipeline's generic image preprocessing.
      collate: ``(examples: list[dict], batch_size: int) -> dict`` builds a static-shape
        batch with a ``weight`` key from at most ``batch_size`` examples (padding rows get
        weight 0). None = stack and zero-pad.
    """

    name: str
    builder_class: type
    task: str
    num_classes: int | None
    input_shape: tuple[int, ...]
    train_split: str = "train"
    eval_split: str | None = "test"
    builder_config: Callable[[Any], Any] = _no_builder_config
    preprocess: Callable[[dict[str, Any], np.random.Generator | None], dict[str, Any]] | None = None
    collate: Callable[[list[dict[str, Any]], int], dict[str, Any]] | None = None

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"DatasetSpec.task={self.task!r} is not a registered task; "
                             f"choose one of: {', '.join(TASKS.names())}")


DATASETS: Registry[DatasetSpec] = Registry("dataset")


def register(spec: DatasetSpec) -> DatasetSpec:
    """Adds ``spec`` to ``DATASETS`` under ``spec.name``."""
    return DATASETS.add(spec.name, spec)
