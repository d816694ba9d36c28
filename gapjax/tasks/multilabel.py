"""Multi-label classification: independent sigmoid per label, multi-hot labels ``[b, K]``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gapjax.tasks.base import TASKS, Task


@TASKS.register("multilabel")
class MultiLabel(Task):
    """Several labels per example: ``label [b, K]`` float32 multi-hot.

    Loss: sigmoid binary cross-entropy, the mean over the ``K`` labels. Accuracy: the
    fraction of labels predicted right at logit 0 (p = 0.5). Evaluation adds the average
    precision of every label (``ap_<k>``, scikit-learn's ``average_precision_score``) and
    their mean over labels with a positive example (``map``).
    """

    keeps_outputs = True

    def __post_init__(self):
        super().__post_init__()
        if self.label_smoothing:
            raise ValueError(f"config.optimizer.label_smoothing={self.label_smoothing!r}: the "
                             "multilabel task does not smooth labels; set it to 0")

    def losses(self, logits: jax.Array, labels: jax.Array, train: bool = False) -> jax.Array:
        del train
        losses = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32),
                                                    labels.astype(jnp.float32))
        return losses.mean(axis=-1)

    def correct(self, logits: jax.Array, labels: jax.Array) -> jax.Array:
        return ((logits > 0) == (labels > 0.5)).astype(jnp.float32).mean(axis=-1)

    def label_gradients(self, logits: jax.Array, labels: jax.Array) -> jax.Array:
        """``[b, K]`` float32: the gradient of each label's own loss ``BCE(sigmoid(z_k),
        y_k)`` with respect to its logit, ``sigmoid(z) - y``."""
        logits = jnp.asarray(logits, jnp.float32)
        targets = jnp.asarray(labels, jnp.float32)
        if targets.shape != logits.shape:
            raise ValueError(f"multilabel labels must have shape [batch, labels] = "
                             f"{tuple(logits.shape)}; got {tuple(targets.shape)}")
        return jax.nn.sigmoid(logits) - targets

    def positive_labels(self, labels: jax.Array) -> jax.Array:
        """``[b, K]`` bool: the labels present."""
        return jnp.asarray(labels) > 0

    def summarize(self, logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        """``ap_<k>`` per label (NaN for a label without a positive) and ``map``."""
        from sklearn.metrics import average_precision_score

        positives = np.asarray(labels) > 0.5
        per_label = [
            float(average_precision_score(positives[:, k], logits[:, k]))
            if positives[:, k].any() else float("nan")
            for k in range(positives.shape[1])
        ]
        metrics = {f"ap_{k}": ap for k, ap in enumerate(per_label)}
        finite = [ap for ap in per_label if np.isfinite(ap)]
        metrics["map"] = float(np.mean(finite)) if finite else float("nan")
        return metrics
