"""Multi-label classification of graphs with unmeasured labels (OGB's molecule datasets).

``label [G, K]`` float32 holds 1 / 0 where a label was measured and NaN where it was not
(``ogbg_molpcba``: 128 assays, most unmeasured for a given molecule; ``ogbg_molhiv``: one
label). Only measured labels enter the loss and the metrics.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gapjax.tasks.base import TASKS
from gapjax.tasks.graph import GraphInputs
from gapjax.tasks.multilabel import MultiLabel


def _measured(labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    labels = jnp.asarray(labels, jnp.float32)
    known = ~jnp.isnan(labels)
    return jnp.where(known, labels, 0.0), known.astype(jnp.float32)


@TASKS.register("graph_multilabel")
class GraphMultiLabel(GraphInputs, MultiLabel):
    """Sigmoid binary cross-entropy over the measured labels of each graph (their mean; a
    graph without one contributes 0). ``accuracy``: the fraction of measured labels right
    at logit 0. Evaluation: ``ap_<k>`` and ``map`` (OGB's metric for molpcba) and the mean
    ROC AUC ``roc_auc`` (OGB's for molhiv), each label over the graphs that measured it."""

    def losses(self, logits: jax.Array, labels: jax.Array, train: bool = False) -> jax.Array:
        del train
        targets, known = _measured(labels)
        losses = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), targets)
        return (losses * known).sum(axis=-1) / jnp.maximum(known.sum(axis=-1), 1.0)

    def correct(self, logits: jax.Array, labels: jax.Array) -> jax.Array:
        targets, known = _measured(labels)
        right = ((logits > 0) == (targets > 0.5)).astype(jnp.float32)
        return (right * known).sum(axis=-1) / jnp.maximum(known.sum(axis=-1), 1.0)

    def summarize(self, logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        """``ap_<k>`` (NaN for a label without a measured positive), ``map`` and
        ``roc_auc`` (means over the labels where they are defined)."""
        from sklearn.metrics import average_precision_score, roc_auc_score

        labels = np.asarray(labels, np.float64)
        metrics, precisions, areas = {}, [], []
        for k in range(labels.shape[1]):
            known = ~np.isnan(labels[:, k])
            truth = labels[known, k] > 0.5
            scores = np.asarray(logits)[known, k]
            ap = float(average_precision_score(truth, scores)) if truth.any() else float("nan")
            metrics[f"ap_{k}"] = ap
            if np.isfinite(ap):
                precisions.append(ap)
            if truth.any() and not truth.all():
                areas.append(float(roc_auc_score(truth, scores)))
        metrics["map"] = float(np.mean(precisions)) if precisions else float("nan")
        metrics["roc_auc"] = float(np.mean(areas)) if areas else float("nan")
        return metrics


__all__ = ["GraphMultiLabel"]
