"""The train state: one pytree holding everything a resumed run needs on device.

Besides parameters, BatchNorm statistics and the optimizer state it carries the running
training-metric sums since the last log line and the first step whose loss was not finite.
Keeping those on device means the step never syncs with the host, and keeping them in the
checkpoint means a resumed run logs exactly the numbers an uninterrupted run would.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

# Running sums of per-step mean loss and accuracy between two log lines (float32 scalars).
TRAIN_SUMS = ("loss_sum", "accuracy_sum", "steps")
NO_BAD_STEP = -1


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training.

    Attributes:
      step: int32 scalar, the number of optimizer updates done so far.
      params: model parameters (float32 whatever the compute dtype).
      batch_stats: BatchNorm running statistics (an empty dict for models without any).
      opt_state: the optax state.
      sums: dict of float32 scalars, ``TRAIN_SUMS``, reset after every log line.
      first_bad_step: int32 scalar, the first step whose loss was NaN/inf, or -1.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    sums: dict[str, jax.Array]
    first_bad_step: jax.Array

    def variables(self) -> dict[str, Any]:
        """The Flax variable dict for ``model.apply``."""
        if self.batch_stats:
            return {"params": self.params, "batch_stats": self.batch_stats}
        return {"params": self.params}


def zero_sums() -> dict[str, jax.Array]:
    """Fresh running sums (all zero, float32)."""
    return {key: jnp.zeros((), jnp.float32) for key in TRAIN_SUMS}


def create_train_state(
    model: Any, tx: optax.GradientTransformation, sample_inputs: Any, seed: int
) -> TrainState:
    """Initialises the model on ``sample_inputs`` (a batch of model inputs) and the optimizer.

    Pure and deterministic in ``seed``; jit it with ``out_shardings`` to place the state.
    """
    key = jax.random.key(seed)
    params_key, dropout_key = jax.random.split(key)
    variables = model.init({"params": params_key, "dropout": dropout_key}, sample_inputs,
                           train=False)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        sums=zero_sums(),
        first_bad_step=jnp.full((), NO_BAD_STEP, jnp.int32),
    )


def reset_sums(state: TrainState) -> TrainState:
    """The state with the running training sums set back to zero (after a log line)."""
    return state.replace(sums=jax.tree.map(jnp.zeros_like, state.sums))
