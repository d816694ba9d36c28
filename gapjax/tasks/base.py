"""The task interface and the ``TASKS`` registry.

A task says what a model learns from a batch: what the model reads (``model_inputs``),
the per-example loss, the per-example metrics summed over the evaluation split, and what
evaluation adds from every example's logits (mean average precision, say). The loop and
the steps only call these methods, so a new task is one module registering a subclass.
A dataset names its task (``DatasetSpec.task``); the loop builds
``TASKS.get(info.task)(num_classes=info.num_classes, label_smoothing=...)``.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar

import jax
import numpy as np

from gapjax.registry import Registry

Batch = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Task(abc.ABC):
    """A learning task; frozen and hashable, so jitted steps close over it.

    Attributes:
      num_classes: ``K``, the width of the logits.
      label_smoothing: ``s`` of the training loss, for tasks that smooth labels (0 = off).
      rows_split: (class) a batch is a stack of independent rows, which may be split over
        processes and devices; False for packed batches (graphs).
      spatial_inputs: (class) the model reads images ``[b, H, W, C]``, so it has a
        spatial feature map (what ``gapjax.gradflow`` measures).
      keeps_outputs: (class) ``summarize`` needs every evaluation example's logits.
    """

    num_classes: int
    label_smoothing: float = 0.0

    rows_split: ClassVar[bool] = True
    spatial_inputs: ClassVar[bool] = True
    keeps_outputs: ClassVar[bool] = False

    def __post_init__(self):
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"config.optimizer.label_smoothing={self.label_smoothing!r} must "
                             "lie in [0, 1)")

    def model_inputs(self, batch: Batch) -> Any:
        """What the model's ``__call__`` takes from ``batch`` (jit-safe): ``image``."""
        return batch["image"]

    def init_inputs(self, batch: Batch) -> Any:
        """The smallest model input to initialise parameter shapes from: one row."""
        return jax.tree.map(lambda x: np.asarray(x)[:1], self.model_inputs(batch))

    @abc.abstractmethod
    def losses(self, logits: jax.Array, labels: jax.Array, train: bool = False) -> jax.Array:
        """Per-example loss ``[b]`` float32 of ``logits [b, K]``; ``train`` adds the
        training-only terms (label smoothing), so evaluation reports the plain loss."""

    def training_losses(self, logits: jax.Array, batch: Batch) -> jax.Array:
        """Per-example training loss ``[b]`` of ``batch``; a mixed batch (CutMix: the
        partner's ``label_mix [b]`` and the kept share ``mix [b]``) gets
        ``mix * l(label) + (1 - mix) * l(label_mix)``."""
        losses = self.losses(logits, batch["label"], train=True)
        if "label_mix" not in batch:
            return losses
        mixed = self.losses(logits, batch["label_mix"], train=True)
        return batch["mix"] * losses + (1.0 - batch["mix"]) * mixed

    @abc.abstractmethod
    def correct(self, logits: jax.Array, labels: jax.Array) -> jax.Array:
        """Per-example accuracy ``[b]`` in [0, 1] (``train/accuracy``, ``eval/accuracy``)."""

    @property
    def metric_names(self) -> tuple[str, ...]:
        """The keys of ``example_metrics``, each logged as ``eval/<key>``: its weighted
        mean over the evaluation split."""
        return ("loss", "accuracy")

    def example_metrics(self, logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
        """Per-example evaluation values ``{name: [b]}`` for every ``metric_names`` key."""
        return {"loss": self.losses(logits, labels), "accuracy": self.correct(logits, labels)}

    def summarize(self, logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        """Metrics of the whole evaluation split from every real example's ``logits [N, K]``
        and ``labels`` (NumPy, on the host); called when ``keeps_outputs``."""
        del logits, labels
        return {}


TASKS: Registry[type[Task]] = Registry("task")


def get(name: str, **options: Any) -> Task:
    """The task registered as ``name`` built with ``options`` (``num_classes``, ...)."""
    return TASKS.get(name)(**options)
