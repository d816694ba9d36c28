"""The pure train step (its evaluation counterpart: ``gapjax.evaluators.classification``).

The step is a plain function of arrays; ``gapjax.train.parallel`` compiles it with
``jax.jit`` over a device mesh or with ``jax.pmap``. Under pmap it gets ``axis_name`` and
combines per-device sums with ``lax.psum`` so that every reduction covers the global batch,
which keeps the losses equal to the jit ones up to float rounding. The task
(``gapjax.tasks``) supplies the model inputs, the per-example losses and metrics.

Every loss and metric is weighted by ``batch["weight"]`` (1 real row, 0 padding): padding
rows never count.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from gapjax.tasks import Task
from gapjax.train.state import NO_BAD_STEP, TrainState

Batch = dict[str, Any]


def _global_sum(value: jax.Array, axis_name: str | None) -> jax.Array:
    return value if axis_name is None else jax.lax.psum(value, axis_name)


def train_step(state: TrainState, batch: Batch, *, model: Any, tx: optax.GradientTransformation,
               task: Task, seed: int = 0, axis_name: str | None = None) -> TrainState:
    """One optimizer update on ``batch``; returns the new state (metrics summed on device).

    The loss is ``sum_i w_i l_i / sum_i w_i`` over the global batch, ``l_i`` the task's
    training loss (``task.training_losses``: CutMix batches mix two labels). Under pmap
    each device differentiates its share ``sum_local / sum_global`` and the gradients are
    psum-ed, which is the same quantity. Dropout keys derive from ``(seed, step)``, so a
    resumed run draws the same masks as an uninterrupted one.
    """
    weight = batch["weight"].astype(jnp.float32)
    total_weight = jnp.maximum(_global_sum(weight.sum(), axis_name), 1.0)
    dropout_key = jax.random.fold_in(jax.random.key(seed), state.step)
    if axis_name is not None:
        dropout_key = jax.random.fold_in(dropout_key, jax.lax.axis_index(axis_name))
    inputs = task.model_inputs(batch)

    def loss_fn(params):
        variables = {"params": params}
        mutable = []
        if state.batch_stats:
            variables["batch_stats"] = state.batch_stats
            mutable = ["batch_stats"]
        logits, new_state = model.apply(variables, inputs, train=True, mutable=mutable,
                                        rngs={"dropout": dropout_key})
        loss = (task.training_losses(logits, batch) * weight).sum() / total_weight
        return loss, (logits, new_state)

    (loss, (logits, new_model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    if axis_name is not None:
        grads = jax.lax.psum(grads, axis_name)
        loss = jax.lax.psum(loss, axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    correct = task.correct(logits, batch["label"])
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
