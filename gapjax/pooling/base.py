"""The ``POOLS`` registry, the ``Pool`` base class its modules share, and pools by name."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from gapjax.pooling.segments import Segments
from gapjax.registry import Registry, build_with_options

Array = jax.Array

POOLS: Registry[type[nn.Module]] = Registry("pool")
#: What ``Pool.weighting`` may declare.
WEIGHTINGS = ("uniform", "position", "channel", None)


class Contributions(NamedTuple):
    """A pooled vector split exactly over the positions (float32).

    shares: ``[B, *S, width]``; summed over the positions, the pooled vector (masked
      positions hold 0).
    weights: ``[B, *S, 1]`` or ``[B, *S, width]``, summing to one over the real positions
      (zeros for a row without any): how the pool hands out a term that is no position's
      own, such as the centring of a norm after it.
    """

    shares: Array
    weights: Array


class Pool(nn.Module):
    """Base class of the ``POOLS`` modules: ``x [B, *S, C], mask [B, *S] -> [B, width]``.

    A pool declares what it can do, so nothing elsewhere lists pools by name. A new pool
    (registered with ``@POOLS.register(name)``, in gapjax or a fork) defines ``__call__``
    and overrides what applies of:

    * ``__call__(x, mask=None) -> [B, output_width(C)]``; its options are dataclass fields
      (``config.model.pool_kwargs``; a ``dtype`` field receives the compute dtype).
    * ``weighting`` (ClassVar): ``"uniform"`` (a plain mean: class maps are exact),
      ``"position"`` (``sum_i w_i x_i`` with weights ``[B, *S]`` fixed given ``x``),
      ``"channel"`` (weights ``[B, *S, C]`` per channel, GMP's one-hot arg max) or None
      (not such a sum: GeM, LSE, catavgmax). When set, ``__call__(x, mask,
      return_weights=True)`` returns ``(pooled, weights)``, and ``contributions`` follows.
    * ``contributions(x, mask=None) -> Contributions``: the exact split of the pooled
      vector over positions, which a head turns into per-position logit contributions
      (``gapjax.layers.GAPHead``). Derived from ``weighting``; a pool that is no weighted
      sum but splits exactly all the same overrides it (MAP: ``gapjax.pooling.map``).
    * ``exact_maps()`` (classmethod): the exact map kinds a linear head over the pool
      gives; follows from the two above.
    * ``output_width(channels)``: width of the pooled vector (default: ``channels``).
    * ``segment(x [N, C], segment_ids [N], num_segments, mask=None) -> [S, width]``: the
      graph form. The default scatters the sets to a padded batch and calls the pool
      (``O(S N C)``); pools override it with ``Segments``' reductions where they can.
    * ``function`` (ClassVar): the pure function behind the pool, called by
      ``pool(name, x, ...)`` with keyword arguments (None: ``pool`` applies the module at
      its initial parameters).
    * ``reads_class_token`` (ClassVar): the pool reads position 0 of a token sequence that
      carries a class token there (``token``), so a ViT hands it all its tokens rather
      than the patch grid; such a pool depends on the order of the positions.

    Helpers: ``gapjax.pooling.functions`` (``as_sets``, ``zero_masked``, ``real_counts``,
    ``result_dtype``) and ``gapjax.pooling.segments.Segments``.
    """

    weighting: ClassVar[str | None] = None
    function: ClassVar[Callable[..., Array] | None] = None
    reads_class_token: ClassVar[bool] = False

    def output_width(self, channels: int) -> int:
        """Width of the pooled vector for ``channels`` input channels."""
        return channels

    def segment(self, x: Array, segment_ids: Array, num_segments: int,
                mask: Array | None = None) -> Array:
        """Pools the nodes of each segment: ``[N, C] -> [num_segments, width]``."""
        sets, member = Segments(x, segment_ids, num_segments, mask).dense()
        return self(sets, member)

    def contributions(self, x: Array, mask: Array | None = None) -> Contributions:
        """``x [B, *S, C]`` -> ``Contributions``: ``shares_i = w_i x_i`` with the pool's
        declared weights (so they sum to the pooled vector) and those weights normalised.
        A pool without a weighting raises ValueError: its maps are Grad-CAM's."""
        if self.weighting is None:
            raise ValueError(
                f"{type(self).__name__} is not a weighted sum of positions (weighting None) "
                "and has no contributions of its own, so the logit has no exact "
                "per-position split; use method='grad_cam'")
        x = jnp.asarray(x)
        _, weights = self(x, mask, return_weights=True)
        weights = jnp.asarray(weights, jnp.float32)
        weights = weights[..., None] if weights.ndim < x.ndim else weights
        # Masked positions have weight 0 but may hold anything (0 * inf is NaN).
        values = x if mask is None else jnp.where(jnp.asarray(mask, bool)[..., None], x, 0)
        total = weights.sum(axis=tuple(range(1, x.ndim - 1)), keepdims=True)
        return Contributions(weights * values.astype(jnp.float32), jnp.where(
            total > 0, weights / jnp.where(total > 0, total, 1.0), 0.0))

    @classmethod
    def exact_maps(cls) -> tuple[str, ...]:
        """Exact maps of a linear head over this pool: ``("cam", "contribution")`` for a
        uniform pool (class maps average to the logit), ``("contribution",)`` for any
        other pool with contributions, ``()`` otherwise."""
        if cls.weighting == "uniform":
            return ("cam", "contribution")
        own = cls.contributions is not Pool.contributions
        return ("contribution",) if cls.weighting is not None or own else ()


def make_pool(pool_name: str, /, *, dtype: Any = None, **kwargs: Any) -> Pool:
    """Instantiates the ``POOLS`` module ``pool_name`` with its options ``kwargs`` (a
    model's ``pool_kwargs``; ``name=`` names the submodule); passes the compute ``dtype``
    when the pool takes one. An unknown option is one line naming the valid options."""
    pool_class = POOLS.get(pool_name)
    if dtype is not None and "dtype" in pool_class.__dataclass_fields__:
        kwargs = {"dtype": dtype, **kwargs}
    return build_with_options(pool_class, f"pool {pool_name!r}", kwargs)


def pool(name: str, x: Array, mask: Array | None = None, **kwargs: Any) -> Array:
    """Applies a pool by registry name: ``x [B, *S, C] -> [B, width]``.

    Calls the pool's pure function with ``kwargs`` (``gem``: ``p``, ``eps``; ``lse``:
    ``r``; ``weighted``: ``weights``); a pool without one (a fork's, ``attention``) is
    applied as a module at its initial parameters, with ``kwargs`` as module options.
    """
    pool_class = POOLS.get(name)
    if pool_class.function is not None:
        accepted = [p for p in inspect.signature(pool_class.function).parameters
                    if p not in ("x", "mask")]
        unexpected = sorted(set(kwargs) - set(accepted))
        if unexpected:
            raise ValueError(f"pool {name!r} got unexpected keyword arguments {unexpected}; "
                             f"it accepts {accepted or 'none'}")
        return pool_class.function(x, mask=mask, **kwargs)
    pooled, _ = make_pool(name, **kwargs).init_with_output(jax.random.key(0), x, mask)
    return pooled


