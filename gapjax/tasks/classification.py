"""Single-label classification: softmax cross-entropy on integer labels ``[b]``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from gapjax.tasks.base import TASKS, Task

#: Classes from which evaluation also reports the top-5 accuracy.
TOP5_MIN_CLASSES = 10


def top_k_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """1.0 where the label is among the ``k`` highest of ``logits [b, K]``, else 0.0: ``[b]``.

    Ties count in the label's favour (the rank is the number of strictly higher logits).
    """
    label_logit = jnp.take_along_axis(logits, labels[:, None].astype(jnp.int32), axis=-1)
    rank = (logits > label_logit).sum(axis=-1)
    return (rank < k).astype(jnp.float32)


@TASKS.register("classification")
class Classification(Task):
    """One class per example: ``label [b]`` int32.

    Loss: softmax cross-entropy; in training against ``optax.smooth_labels(one_hot, s)``
    (``(1 - s) * one_hot + s / K``). Metrics: top-1 accuracy, and top-5 accuracy from
    ``TOP5_MIN_CLASSES`` classes.
    """

    def losses(self, logits: jax.Array, labels: jax.Array, train: bool = False) -> jax.Array:
        targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
        if train and self.label_smoothing:
            targets = optax.smooth_labels(targets, self.label_smoothing)
        return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)

    def correct(self, logits: jax.Array, labels: jax.Array) -> jax.Array:
        return top_k_correct(logits, labels, 1)

    @property
    def metric_names(self) -> tuple[str, ...]:
        top5 = ("top5_accuracy",) if self.num_classes >= TOP5_MIN_CLASSES else ()
        return (*super().metric_names, *top5)

    def example_metrics(self, logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
        metrics = super().example_metrics(logits, labels)
        if "top5_accuracy" in self.metric_names:
            metrics["top5_accuracy"] = top_k_correct(logits, labels, 5)
        return metrics

    def label_gradients(self, logits: jax.Array, labels: jax.Array) -> jax.Array:
        """``[b, K]`` float32: each label's share of the loss gradient, the part that flows
        through its own logit, ``softmax(z) - one_hot(y)`` (the shares add up to the whole
        gradient: the softmax cross-entropy does not split into per-label losses)."""
        logits = jnp.asarray(logits, jnp.float32)
        return (jax.nn.softmax(logits, axis=-1)
                - jax.nn.one_hot(jnp.asarray(labels), logits.shape[-1], dtype=jnp.float32))

    def positive_labels(self, labels: jax.Array) -> jax.Array:
        """``[b, K]`` bool: the true class."""
        return jax.nn.one_hot(jnp.asarray(labels), self.num_classes) > 0
