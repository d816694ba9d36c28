"""A fork's own pooling variant, registered from outside gapjax.

This is how a research fork adds a pool: a module of its own registers a Linen ``Pool``
under a new name, and ``config.model.pool = "mine"`` then selects it everywhere a pool
name is accepted. Here: root-mean-square pooling, ``sqrt(mean_i x_i^2)``, built on the
pure ``gap`` so that it inherits mask handling and float32 accumulation.
"""

import jax
import jax.numpy as jnp

from gapjax.pooling import POOLS, Pool, gap


def root_mean_square(x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """``x [B, *S, C] -> [B, C]``: ``sqrt(mean_i x_i^2)`` over real positions."""
    squares = jnp.square(x.astype(jnp.float32))
    # sqrt has an infinite slope at 0 (a fully masked row); a floor keeps gradients finite.
    return jnp.sqrt(jnp.maximum(gap(squares, mask), 1e-12)).astype(x.dtype)


@POOLS.register("mine", "rms")
class RootMeanSquarePool(Pool):
    """Root-mean-square pooling, registered by a fork."""

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        return root_mean_square(x, mask)
