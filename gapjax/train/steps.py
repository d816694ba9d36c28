"""Loss functions and the pure train / eval step functions.

The steps are plain functions of arrays; ``gapjax.train.parallel`` compiles them with
``jax.jit`` over a device mesh or with ``jax.pmap``. Under pmap they get ``axis_name`` and
combine per-device sums with ``lax.psum`` so that every reduction covers the global batch,
which keeps the losses equal to the jit ones up to float rounding.

Every loss and metric is weighted by ``batch["weight"]`` (1 real row, 0 padding): padding
rows never count.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from gapjax.train.state import NO_BAD_STEP, TrainState

TASKS = ("classification", "multilabel", "graph")
Batch = dict[str, Any]


# --------------------------------------------------------------------------------------
# Losses: per-example values [b]
# --------------------------------------------------------------------------------------


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array,
                          label_smoothing: float = 0.0) -> jax.Array:
    """``logits [b, K]``, integer ``labels [b]`` -> per-example loss ``[b]`` (float32).

    With ``label_smoothing = s`` the target is ``(1 - s) * one_hot + s / K``.
    """
    logits = logits.astype(jnp.float32)
    num_classes = logits.shape[-1]
    targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    if label_smoothing:
        targets = targets * (1.0 - label_smoothing) + label_smoothing / num_classes
    return optax.softmax_cross_entropy(logits, targets)


def sigmoid_binary_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """``logits [b, K]``, multi-hot ``labels [b, K]`` -> per-example loss ``[b]``, the mean
    over the K labels."""
    losses = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32),
                                                labels.astype(jnp.float32))
    return losses.mean(axis=-1)


def example_losses(task: str, logits: jax.Array, labels: jax.Array,
                   label_smoothing: float = 0.0) -> jax.Array:
    """Per-example training loss ``[b]`` for ``task``."""
    if task == "multilabel":
        return sigmoid_binary_cross_entropy(logits, labels)
    return softmax_cross_entropy(logits, labels, label_smoothing)


def top_k_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """1.0 where the label is among the ``k`` highest logits, else 0.0: ``[b]``."""
    label_logit = jnp.take_along_axis(logits, labels[:, None].astype(jnp.int32), axis=-1)
    # Rank = number of classes scoring strictly higher; ties count in the label's favour.
    rank = (logits > label_logit).sum(axis=-1)
    return (rank < k).astype(jnp.float32)


def multilabel_correct(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Fraction of the K labels predicted right at threshold 0 (p = 0.5): ``[b]``."""
    predicted = logits > 0
    return (predicted == (labels > 0.5)).astype(jnp.float32).mean(axis=-1)


def _global_sum(value: jax.Array, axis_name: str | None) -> jax.Array:
    return value if axis_name is None else jax.lax.psum(value, axis_name)


# --------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    model: Any,
    tx: optax.GradientTransformation,
    task: str,
    inputs_fn: Callable[[Batch], Any],
    label_smoothing: float = 0.0,
    seed: int = 0,
    axis_name: str | None = None,
) -> TrainState:
    """One optimizer update on ``batch``; returns the new state (metrics summed on device).

    The loss is ``sum_i w_i l_i / sum_i w_i`` over the global batch. Under pmap each device
    differentiates its share ``sum_local / sum_global`` and the gradients are psum-ed, which
    is the same quantity. Dropout keys derive from ``(seed, step)``, so a resumed run draws
    the same masks as an uninterrupted one.
    """
    weight = batch["weight"].astype(jnp.float32)
    total_weight = jnp.maximum(_global_sum(weight.sum(), axis_name), 1.0)
    dropout_key = jax.random.fold_in(jax.random.key(seed), state.step)
    if axis_name is not None:
        dropout_key = jax.random.fold_in(dropout_key, jax.lax.axis_index(axis_name))
    inputs = inputs_fn(batch)

    def loss_fn(params):
        variables = {"params": params}
        mutable = []
        if state.batch_stats:
            variables["batch_stats"] = state.batch_stats
            mutable = ["batch_stats"]
        logits, new_state = model.apply(variables, inputs, train=True, mutable=mutable,
                                        rngs={"dropout": dropout_key})
        losses = example_losses(task, logits, batch["label"], label_smoothing)
        loss = (losses * weight).sum() / total_weight
        return loss, (logits, new_state)

    (loss, (logits, new_model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    if axis_name is not None:
        grads = jax.lax.psum(grads, axis_name)
        loss = jax.lax.psum(loss, axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    if task == "multilabel":
        correct = multilabel_correct(logits, batch["label"])
    else:
        correct = top_k_correct(logits, batch["label"], 1)
    step = state.step + 1
    sums = {
        "loss_sum": state.sums["loss_sum"] + loss,
        "accuracy_sum": state.sums["accuracy_sum"]
        + _global_sum((correct * weight).sum(), axis_name) / total_weight,
        "steps": state.sums["steps"] + 1.0,
    }
    bad = ~jnp.isfinite(loss) & (state.first_bad_step == NO_BAD_STEP)
    return state.replace(
        step=step,
        params=params,
        batch_stats=new_model_state.get("batch_stats", state.batch_stats),
        opt_state=opt_state,
        sums=sums,
        first_bad_step=jnp.where(bad, step, state.first_bad_step),
    )


EVAL_SUMS = ("loss_sum", "weight_sum", "correct_sum", "top5_sum")


def zero_eval_sums() -> dict[str, jax.Array]:
    """Fresh evaluation sums (float32 scalars)."""
    return {key: jnp.zeros((), jnp.float32) for key in EVAL_SUMS}


def eval_step(
    variables: dict[str, Any],
    batch: Batch,
    sums: dict[str, jax.Array],
    *,
    model: Any,
    task: str,
    inputs_fn: Callable[[Batch], Any],
    axis_name: str | None = None,
) -> tuple[dict[str, jax.Array], jax.Array]:
    """Adds one evaluation batch to the weighted ``sums``; also returns the logits ``[b, K]``
    (for metrics that need every score, such as mean average precision).

    The evaluation loss has no label smoothing: it is the plain negative log-likelihood.
    """
    weight = batch["weight"].astype(jnp.float32)
    logits = model.apply(variables, inputs_fn(batch), train=False)
    losses = example_losses(task, logits, batch["label"])
    if task == "multilabel":
        correct = multilabel_correct(logits, batch["label"])
        top5 = jnp.zeros_like(correct)
    else:
        correct = top_k_correct(logits, batch["label"], 1)
        top5 = top_k_correct(logits, batch["label"], min(5, logits.shape[-1]))
    update = {
        "loss_sum": (losses * weight).sum(),
        "weight_sum": weight.sum(),
        "correct_sum": (correct * weight).sum(),
        "top5_sum": (top5 * weight).sum(),
    }
    update = {key: _global_sum(value, axis_name) for key, value in update.items()}
    return {key: sums[key] + update[key] for key in EVAL_SUMS}, logits.astype(jnp.float32)
