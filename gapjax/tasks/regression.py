"""Regression: real-valued targets ``label [b, K]`` (standardised), MSE loss, R^2.

``regression`` reads images, ``graph_regression`` a packed ``GraphBatch`` (the molecules'
targets of ``gapjax.data.molecules``). The model's ``K`` outputs are the predictions
(``num_classes`` = number of targets). Targets are expected standardised (zero mean, unit
variance on the training split), so one loss weighs every target alike and the
``accuracy`` tolerance is in standard deviations.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from gapjax.tasks.base import TASKS, Task
from gapjax.tasks.graph import GraphInputs

#: ``accuracy``: a target counts as right within this many (training) standard deviations.
TOLERANCE = 0.25


def r2_scores(predictions: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Coefficient of determination per target: ``1 - SSE / SST`` over the rows,
    ``[N, K]`` each -> ``[K]`` (NaN where the targets do not vary)."""
    predictions = np.asarray(predictions, np.float64).reshape(len(predictions), -1)
    targets = np.asarray(targets, np.float64).reshape(len(targets), -1)
    residual = ((predictions - targets) ** 2).sum(axis=0)
    total = ((targets - targets.mean(axis=0)) ** 2).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(total > 0, 1.0 - residual / np.where(total > 0, total, 1.0), np.nan)


@TASKS.register("regression")
class Regression(Task):
    """Real-valued targets: ``label [b, K]`` float32, predictions ``logits [b, K]``.

    Loss: the squared error, averaged over the ``K`` targets. Metrics: ``accuracy`` (the
    fraction of targets within ``TOLERANCE`` of the label), ``mae``; evaluation adds
    ``r2_<k>`` per target and their mean ``r2`` (from every example's predictions).
    """

    keeps_outputs = True

    def __post_init__(self):
        super().__post_init__()
        if self.label_smoothing:
            raise ValueError(f"config.optimizer.label_smoothing={self.label_smoothing!r}: "
                             "regression has no labels to smooth; set it to 0")

    @staticmethod
    def _pair(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
        predictions = logits.astype(jnp.float32)
        targets = jnp.asarray(labels, jnp.float32).reshape(predictions.shape)
        return predictions, targets

    def losses(self, logits: jax.Array, labels: jax.Array, train: bool = False) -> jax.Array:
        del train
        predictions, targets = self._pair(logits, labels)
        return ((predictions - targets) ** 2).mean(axis=-1)

    def correct(self, logits: jax.Array, labels: jax.Array) -> jax.Array:
        predictions, targets = self._pair(logits, labels)
        return (jnp.abs(predictions - targets) <= TOLERANCE).astype(jnp.float32).mean(axis=-1)

    @property
    def metric_names(self) -> tuple[str, ...]:
        return (*super().metric_names, "mae")

    def example_metrics(self, logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
        predictions, targets = self._pair(logits, labels)
        return {**super().example_metrics(logits, labels),
                "mae": jnp.abs(predictions - targets).mean(axis=-1)}

    def summarize(self, logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        """``r2_<k>`` per target and ``r2``, their mean over targets that vary."""
        scores = r2_scores(logits, labels)
        metrics = {f"r2_{k}": float(score) for k, score in enumerate(scores)}
        finite = scores[np.isfinite(scores)]
        metrics["r2"] = float(finite.mean()) if finite.size else float("nan")
        return metrics


@TASKS.register("graph_regression")
class GraphRegression(GraphInputs, Regression):
    """Regression of the graphs of a packed ``GraphBatch``: ``label [G, K]``, ``weight [G]``
    (0 for padding graphs); the model reads a ``GraphBatch`` (``GraphInputs``)."""


__all__ = ["TOLERANCE", "GraphRegression", "Regression", "r2_scores"]
