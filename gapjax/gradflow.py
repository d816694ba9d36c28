"""Gradient flow diagnostics: where the gradient of each label lands, and how labels interact.

The question these tools answer: with global max pooling (GMP) only the arg-max position of
each channel receives gradient, so the labels of a multi-label image compete for the same
few (position, channel) slots; with global average pooling (GAP) every position receives
an equal share, so each label's gradient is spread and conflicts between labels average
out. We measure this directly on a classifier, per label, in one jitted call.

Per-label gradients. Let ``z [B, K]`` be the logits and ``L_k`` the loss of label ``k``
averaged over the real examples of the batch (``weight > 0``). The task
(``gapjax.tasks``, a name or a task object) says how its loss splits over labels
(``label_gradients``):

* ``"multilabel"``: ``L_k = mean_b BCE(sigmoid(z[b, k]), y[b, k])`` (sigmoid binary
  cross-entropy, the multi-label training loss); ``dL_k/dz[b, k] = sigmoid(z) - y``.
* ``"classification"``: the softmax cross-entropy does not split into per-label
  losses, so label ``k`` gets the share that flows through its own logit:
  ``dL/dz[b, k] = softmax(z)[b, k] - onehot(y)[b, k]``. These shares add up to the full
  gradient, exactly like the multi-label losses do.

One forward pass and one ``jax.vjp`` give the backward function; ``jax.vmap`` runs it for
all ``K`` labels at once (cotangent = the label's column of ``dL/dz``). Three gradients
come back per label: with respect to the pre-pool feature map ``f [B, h, w, C]``
(``forward_features``), to the first layer's output (the model's ``early`` perturbation)
and to the shared backbone parameters (every parameter outside ``head``). The model is
evaluated with ``train=False`` so that BatchNorm uses its running statistics and examples
do not interact through the batch.

Both activations are reached through the model contract alone: a zero offset is added to
the features between ``forward_features`` and ``forward_head``, and the ``early``
perturbation (Flax's ``perturb``) to the first layer's output; the gradient with respect to
an offset is the gradient with respect to the activation.

Spread statistics are computed for each slice ``a = |g[k, b, :, :, c]|`` (one label, one
image, one channel; ``n = h * w`` positions) and averaged over the slices that carry any
gradient (``max a > 0``) of real examples:

* coverage ``= #{i : a_i > threshold * max_j a_j} / n`` (``threshold = 1e-3``): 1 for GAP,
  ``1 / n`` for GMP;
* normalised entropy ``= -sum_i p_i log p_i / log n`` with ``p = a / sum a``: 1 for a
  uniform spread (GAP), 0 for a single position (GMP);
* Gini coefficient ``= sum_i (2 i - n - 1) a_(i) / (n sum a)`` with ``a_(1) <= ... <= a_(n)``
  sorted: 0 for a uniform spread, ``1 - 1/n`` (its maximum) for a single position.

Conflict statistics:

* ``conflict_mean`` / ``conflict_negative``: the cosine similarity ``cos(g_k, g_l)`` of the
  per-label gradients on the backbone parameters, over pairs ``k < l`` of labels that are
  positive in at least one real example of the batch: the mean, and the fraction of pairs
  with a negative cosine (labels pulling the shared weights in opposite directions).
* ``collision_rate``: for each real image, channel ``c`` and pair of its positive labels
  ``k < l`` that both send gradient into channel ``c``, a collision is when both labels put
  a majority (more than half) of their channel-``c`` gradient mass on the same position.
  A majority position is unique, so this is the GMP arg-max collision: under GMP each label's
  gradient is one-hot at the channel's arg max and every shared channel collides (rate 1);
  under GAP no position holds more than ``1/n`` of the mass and nothing collides (rate 0,
  for ``n >= 2``); LSE and GeM fall between, depending on their sharpness. The rate is the
  number of collisions divided by the number of such (image, channel, pair) triples, and 0
  when there is none (e.g. single-label batches).

``training_diagnostics(model, variables, batch, task)`` is the hook the training loop calls
every ``config.gradflow_every`` steps; its keys are logged as ``train/grad_<key>``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gapjax.tasks import TASKS, Task

Array = jax.Array

#: Parameter scope of a classifier's head (the model contract, docs/ARCHITECTURE.md): its
#: parameters are not part of the backbone whose gradient conflicts are measured.
HEAD_MODULE = "head"

#: Relative magnitude above which a position counts as receiving gradient.
COVERAGE_THRESHOLD = 1e-3

#: Share of a label's channel gradient that makes a position the label's arg-max position.
MAJORITY_SHARE = 0.5

#: Examples of a training batch the hook looks at: the cost is one backward pass per label
#: over them, and 16 images x K labels x C channels already give stable averages.
DEFAULT_MAX_EXAMPLES = 16


# --------------------------------------------------------------------------------------
# Spread of a gradient over positions
# --------------------------------------------------------------------------------------


def _position_magnitudes(grads: Array) -> Array:
    """``|g|`` of ``grads [B, *S, C]`` as float32 ``[B, C, N]`` (``N`` = positions)."""
    grads = jnp.asarray(grads)
    if grads.ndim < 3:
        raise ValueError(
            "gradient spread expects grads of shape [batch, *spatial, channels] (rank >= 3); "
            f"got shape {tuple(grads.shape)}")
    flat = grads.reshape(grads.shape[0], -1, grads.shape[-1]).astype(jnp.float32)
    return jnp.abs(flat).transpose(0, 2, 1)


def gradient_coverage(grads: Array, threshold: float = COVERAGE_THRESHOLD) -> Array:
    """Fraction of positions whose ``|g|`` exceeds ``threshold`` times the slice's max.

    Args:
      grads: ``[B, *S, C]`` gradient with respect to a feature map.
      threshold: relative magnitude, default ``1e-3``.

    Returns:
      ``[B, C]`` float32 in ``[0, 1]``: 1 for GAP, ``1 / N`` for GMP; 0 for an all-zero slice.
    """
    magnitudes = _position_magnitudes(grads)
    peak = magnitudes.max(axis=-1, keepdims=True)
    above = (magnitudes > threshold * peak) & (peak > 0)
    return above.mean(axis=-1, dtype=jnp.float32)


def gradient_entropy(grads: Array) -> Array:
    """Entropy of ``p = |g| / sum |g|`` over positions, divided by ``log N``.

    Args:
      grads: ``[B, *S, C]``.

    Returns:
      ``[B, C]`` float32 in ``[0, 1]``: 1 when every position gets the same gradient, 0 when
      one position gets all of it (and for an all-zero slice, or when ``N == 1``).
    """
    magnitudes = _position_magnitudes(grads)
    positions = magnitudes.shape[-1]
    total = magnitudes.sum(axis=-1, keepdims=True)
    probs = magnitudes / jnp.where(total > 0, total, 1.0)
    if positions < 2:
        return jnp.zeros(magnitudes.shape[:2], jnp.float32)
    return jax.scipy.special.entr(probs).sum(axis=-1) / np.log(positions)  # entr(0) = 0


def gradient_gini(grads: Array) -> Array:
    """Gini coefficient of ``|g|`` over positions.

    ``G = sum_i (2 i - N - 1) a_(i) / (N sum a)`` with ``a_(1) <= ... <= a_(N)`` the sorted
    magnitudes.

    Args:
      grads: ``[B, *S, C]``.

    Returns:
      ``[B, C]`` float32: 0 for a uniform spread, ``1 - 1/N`` when a single position gets all
      the gradient; 0 for an all-zero slice.
    """
    magnitudes = _position_magnitudes(grads)
    # Non-negative IEEE floats order like their bit patterns read as int32, and XLA sorts
    # integers several times faster than floats on CPU (the early layer has ~1000 positions).
    as_bits = jax.lax.bitcast_convert_type(magnitudes, jnp.int32)
    magnitudes = jax.lax.bitcast_convert_type(jnp.sort(as_bits, axis=-1), jnp.float32)
    positions = magnitudes.shape[-1]
    rank_weights = 2.0 * jnp.arange(1, positions + 1, dtype=jnp.float32) - positions - 1.0
    total = magnitudes.sum(axis=-1)
    numerator = (magnitudes * rank_weights).sum(axis=-1)
    gini = numerator / (positions * jnp.where(total > 0, total, 1.0))
    # Rounding can leave an exactly uniform slice a hair below 0.
    return jnp.where(total > 0, jnp.maximum(gini, 0.0), 0.0)


def spread_statistics(
    grads: Array, weights: Array | None = None, threshold: float = COVERAGE_THRESHOLD
) -> dict[str, Array]:
    """Coverage, normalised entropy and Gini of ``grads`` averaged over informative slices.

    Args:
      grads: ``[B, *S, C]`` (fold a label axis into ``B`` first).
      weights: ``[B]`` example weights; rows with weight 0 (padding) are left out.
      threshold: relative magnitude for the coverage.

    Returns:
      ``{"coverage", "entropy", "gini"}``: float32 scalars, each the mean over the
      (image, channel) slices of real examples with a non-zero gradient; 0 if there is none.
    """
    magnitudes = _position_magnitudes(grads)
    informative = magnitudes.max(axis=-1) > 0  # [B, C]
    if weights is not None:
        informative &= (jnp.asarray(weights) > 0)[:, None]
    count = informative.sum(dtype=jnp.float32)

    def average(values: Array) -> Array:
        return jnp.where(informative, values, 0.0).sum() / jnp.maximum(count, 1.0)

    return {
        "coverage": average(gradient_coverage(grads, threshold)),
        "entropy": average(gradient_entropy(grads)),
        "gini": average(gradient_gini(grads)),
    }


# --------------------------------------------------------------------------------------
# Conflict between labels
# --------------------------------------------------------------------------------------


def pairwise_cosine(vectors: Array, valid: Array | None = None) -> dict[str, Array]:
    """Cosine similarity between the rows of ``vectors`` over pairs of valid rows.

    Args:
      vectors: ``[K, P]``, one flattened gradient per label.
      valid: ``[K]`` bool, rows that take part (default all); zero rows never do.

    Returns:
      ``{"conflict_mean": mean cosine over pairs k < l, "conflict_negative": fraction of
      those pairs with a negative cosine}``, float32 scalars, both 0 when no pair exists.
    """
    vectors = jnp.asarray(vectors, jnp.float32)
    norms = jnp.linalg.norm(vectors, axis=-1)
    usable = norms > 0
    if valid is not None:
        usable &= jnp.asarray(valid, bool)
    unit = vectors / jnp.where(norms > 0, norms, 1.0)[:, None]
    cosine = unit @ unit.T
    labels = vectors.shape[0]
    upper = jnp.triu(jnp.ones((labels, labels), bool), k=1)
    pairs = upper & usable[:, None] & usable[None, :]
    count = jnp.maximum(pairs.sum(dtype=jnp.float32), 1.0)
    return {
        "conflict_mean": jnp.where(pairs, cosine, 0.0).sum() / count,
        "conflict_negative": (pairs & (cosine < 0)).sum(dtype=jnp.float32) / count,
    }


def collision_statistics(label_grads: Array, positives: Array, weights: Array | None = None,
                         majority: float = MAJORITY_SHARE) -> dict[str, Array]:
    """How often two positive labels of an image concentrate on the same position of a channel.

    Args:
      label_grads: ``[K, B, *S, C]`` per-label gradient with respect to the feature map.
      positives: ``[B, K]`` bool (or multi-hot), the labels present in each image.
      weights: ``[B]`` example weights; rows with weight 0 are left out.
      majority: share of a label's channel gradient mass that makes a position its arg max
        (default 1/2, which makes the position unique).

    Returns:
      ``{"collision_rate": collisions / triples, "collision_triples": triples}`` as float32
      scalars, over (image, channel, pair k < l of the image's positive labels that both have
      gradient in the channel); the rate is 0 when there is no triple.
    """
    label_grads = jnp.asarray(label_grads)
    labels, batch = label_grads.shape[:2]
    if tuple(positives.shape) != (batch, labels):
        raise ValueError(
            f"positives must have shape [batch, labels] = {(batch, labels)} to match "
            f"label_grads of shape {tuple(label_grads.shape)}; got {tuple(positives.shape)}")
    magnitudes = jax.vmap(_position_magnitudes)(label_grads)  # [K, B, C, N]
    total = magnitudes.sum(axis=-1)
    has_grad = total > 0
    top_position = jnp.argmax(magnitudes, axis=-1)
    top_share = magnitudes.max(axis=-1) / jnp.where(has_grad, total, 1.0)
    concentrated = has_grad & (top_share > majority)

    present = jnp.asarray(positives) > 0
    if weights is not None:
        present &= (jnp.asarray(weights) > 0)[:, None]
    present = present.T[:, :, None] & has_grad  # [K, B, C]: positive and uses the channel
    upper = jnp.triu(jnp.ones((labels, labels), bool), k=1)[:, :, None, None]
    triples = upper & present[:, None] & present[None, :]  # [K, K, B, C]
    same_spot = (
        concentrated[:, None] & concentrated[None, :]
        & (top_position[:, None] == top_position[None, :]))
    count = triples.sum(dtype=jnp.float32)
    collisions = (triples & same_spot).sum(dtype=jnp.float32)
    return {"collision_rate": collisions / jnp.maximum(count, 1.0), "collision_triples": count}


# --------------------------------------------------------------------------------------
# Per-label gradients of a classifier
# --------------------------------------------------------------------------------------


def _measurable(task_class: type[Task]) -> bool:
    return task_class.spatial_inputs and hasattr(task_class, "label_gradients")


def _task(task: str | Task, num_labels: int = 0) -> Task:
    """``task`` as a task object (a ``gapjax.tasks.TASKS`` name is built for ``num_labels``);
    raises for a task without a spatial feature map or a per-label split of its loss."""
    task_class = type(task) if isinstance(task, Task) else TASKS.get(task)
    if not _measurable(task_class):
        choices = [name for name in TASKS.names() if _measurable(TASKS.get(name))]
        raise ValueError(
            f"gradflow: task {task!r} is not supported (no spatial feature map or no per-label "
            f"split of its loss); choose one of: {', '.join(choices)}")
    return task if isinstance(task, Task) else task_class(num_classes=num_labels)


def label_logit_gradients(
    logits: Array, labels: Array, task: str | Task, weights: Array | None = None
) -> Array:
    """``dL_k / dz [B, K]``: each label's loss gradient with respect to its own logit.

    Args:
      logits: ``[B, K]``.
      labels: ``[B, K]`` multi-hot (``"multilabel"``) or ``[B]`` int class ids
        (``"classification"``).
      task: a ``gapjax.tasks`` name or object; its ``label_gradients`` split the loss.
      weights: ``[B]``; the per-label loss is the weighted mean over examples.

    Returns:
      ``[B, K]`` float32, including the ``weight / sum(weight)`` factor of the mean.
    """
    residual = _task(task, logits.shape[-1]).label_gradients(logits, labels)
    if weights is None:
        weights = jnp.ones(logits.shape[:1], jnp.float32)
    weights = jnp.asarray(weights, jnp.float32)
    scale = weights / jnp.maximum(weights.sum(), 1e-12)
    return residual * scale[:, None]


def _backbone_and_head(variables: Mapping[str, Any]) -> tuple[dict, dict]:
    """Splits ``params`` into the backbone's and the head's (the contract's ``head`` scope)."""
    params = dict(variables["params"])
    head = {HEAD_MODULE: params.pop(HEAD_MODULE)} if HEAD_MODULE in params else {}
    return params, head


def per_label_gradients(model: nn.Module, variables: Mapping[str, Any], images: Array,
                        labels: Array, task: str | Task,
                        weights: Array | None = None) -> dict[str, Any]:
    """Gradients of each label's loss, for all labels at once (one vjp, vmapped over labels).

    Uses the model contract only (docs/ARCHITECTURE.md): ``forward_features`` gives the
    pre-pool map and ``forward_head`` the logits from it, and the model's ``early``
    perturbation (its first layer's output, ``Classifier.early_tap``) the early activation.

    Args:
      model: a classifier following the contract.
      variables: its variables (``params`` and e.g. ``batch_stats``).
      images: ``[B, H, W, C_in]``.
      labels: ``[B, K]`` multi-hot or ``[B]`` class ids, see ``label_logit_gradients``.
      task: a ``gapjax.tasks`` name or object (``"multilabel"``, ``"classification"``).
      weights: ``[B]`` example weights (0 = padding).

    Returns:
      ``{"logits": [B, K], "features": [K, B, h, w, C], "early": [K, B, H', W', C'],
      "backbone": pytree of [K, ...] per-label parameter gradients}``; the activation
      gradients have the activation dtype, the others float32.
    """
    _task(task)
    variables = {key: value for key, value in variables.items() if key != "perturbations"}
    # One abstract pass gives the shapes of both activations the gradients are taken at.
    features, probe = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=False, method="forward_features",
                                 mutable=["perturbations"]), variables, images)
    if "early" not in probe.get("perturbations", {}):
        raise ValueError(
            f"gradflow: model {type(model).__name__} has no 'early' perturbation; its backbone "
            "must call self.early_tap(x) on its first layer's output (docs/ARCHITECTURE.md)")
    early = probe["perturbations"]["early"]
    backbone, head = _backbone_and_head(variables)
    others = {key: value for key, value in variables.items() if key != "params"}

    def logits_and_features(backbone_params, early_offset, feature_offset):
        full = {**others, "params": {**backbone_params, **head},
                "perturbations": {"early": early_offset}}
        shifted = model.apply(full, images, train=False, method="forward_features")
        shifted = shifted + feature_offset.astype(shifted.dtype)
        return model.apply(full, shifted, train=False, method="forward_head").astype(jnp.float32)

    zeros = (jnp.zeros(early.shape, early.dtype), jnp.zeros(features.shape, features.dtype))
    logits, backward = jax.vjp(logits_and_features, backbone, *zeros)
    residual = label_logit_gradients(logits, labels, task, weights)  # [B, K]
    num_labels = logits.shape[-1]
    # Cotangent of label k: its column of dL/dz, zeros elsewhere.
    cotangents = jnp.eye(num_labels, dtype=jnp.float32)[:, None, :] * residual[None]
    backbone_grads, early_grads, feature_grads = jax.vmap(backward)(cotangents)
    return {
        "logits": logits,
        "features": feature_grads,
        "early": early_grads,
        "backbone": backbone_grads,
    }


def gradient_diagnostics(model: nn.Module, variables: Mapping[str, Any], images: Array,
                         labels: Array, task: str | Task, weights: Array | None = None,
                         threshold: float = COVERAGE_THRESHOLD) -> dict[str, Array]:
    """All diagnostics as float32 scalars; traceable, so it runs inside ``jax.jit``.

    Args: as ``per_label_gradients``; ``threshold`` is the coverage's relative magnitude.

    Returns:
      ``coverage, entropy, gini`` (feature map, over labels x images x channels),
      ``early_coverage, early_entropy, early_gini`` (early activations), ``conflict_mean,
      conflict_negative`` (backbone parameters), ``collision_rate, collision_triples``.
    """
    grads = per_label_gradients(model, variables, images, labels, task, weights)
    num_labels, batch = grads["features"].shape[:2]
    example_weights = jnp.ones((batch,), jnp.float32) if weights is None else weights
    label_weights = jnp.tile(jnp.asarray(example_weights), num_labels)  # label-major, as below

    def folded(label_grads: Array) -> Array:
        return label_grads.reshape(num_labels * batch, *label_grads.shape[2:])

    results: dict[str, Array] = {}
    results.update(spread_statistics(folded(grads["features"]), label_weights, threshold))
    early = spread_statistics(folded(grads["early"]), label_weights, threshold)
    results.update({f"early_{key}": value for key, value in early.items()})

    positives = _task(task, num_labels).positive_labels(labels)
    real = jnp.asarray(example_weights) > 0
    present_in_batch = (positives & real[:, None]).any(axis=0)
    flat_backbone = jnp.concatenate(
        [leaf.reshape(num_labels, -1).astype(jnp.float32)
         for leaf in jax.tree_util.tree_leaves(grads["backbone"])],
        axis=1,
    )
    results.update(pairwise_cosine(flat_backbone, present_in_batch))
    results.update(collision_statistics(grads["features"], positives, example_weights))
    return results


@functools.lru_cache(maxsize=16)
def _jitted_diagnostics(model: nn.Module, task: str | Task, threshold: float):
    return jax.jit(functools.partial(gradient_diagnostics, model, task=task, threshold=threshold))


def training_diagnostics(model: nn.Module, variables: Mapping[str, Any], batch: Mapping[str, Any],
                         task: str | Task, max_examples: int | None = DEFAULT_MAX_EXAMPLES,
                         threshold: float = COVERAGE_THRESHOLD) -> dict[str, float]:
    """The training loop's hook: gradient diagnostics of one batch as Python floats.

    Args:
      model: the classifier (a Linen module; hashable, so the jitted function is cached).
      variables: its variables, unreplicated (one copy, on any device).
      batch: ``{"image": [b, H, W, C], "label": [b, K] or [b], "weight": [b] (optional)}``.
      task: a ``gapjax.tasks`` name or object (``"multilabel"``, ``"classification"``).
      max_examples: look at the first this many examples only (None = all); the work is
        ``K`` backward passes over them.
      threshold: see ``gradient_diagnostics``.

    Returns:
      ``{"coverage", "entropy", "gini", "early_coverage", "early_entropy", "early_gini",
      "conflict_mean", "conflict_negative", "collision_rate", "collision_triples"}`` floats;
      the loop logs them as ``train/grad_<key>``.
    """
    _task(task)
    for key in (key for key in ("image", "label") if key not in batch):
        raise ValueError(f"gradflow: batch has no {key!r} entry (keys: {sorted(batch)}); "
                         "training_diagnostics needs 'image' and 'label'")
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"gradflow: max_examples must be >= 1 or None; got {max_examples}")
    limit = slice(None) if max_examples is None else slice(0, max_examples)
    images = jnp.asarray(batch["image"])[limit]
    labels = jnp.asarray(batch["label"])[limit]
    weights = batch.get("weight")
    weights = (jnp.ones(images.shape[:1], jnp.float32) if weights is None
               else jnp.asarray(weights, jnp.float32)[limit])
    diagnose = _jitted_diagnostics(model, task, float(threshold))
    values = diagnose(variables, images, labels, weights=weights)
    return {key: float(value) for key, value in jax.device_get(values).items()}


__all__ = [
    "COVERAGE_THRESHOLD",
    "HEAD_MODULE",
    "MAJORITY_SHARE",
    "collision_statistics",
    "gradient_coverage",
    "gradient_diagnostics",
    "gradient_entropy",
    "gradient_gini",
    "label_logit_gradients",
    "pairwise_cosine",
    "per_label_gradients",
    "spread_statistics",
    "training_diagnostics",
]
