"""The built-in pools of ``POOLS``: Linen modules over the pure functions, with their
declared weightings and their segment (graph) forms."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from gapjax.pooling.base import POOLS, Pool
from gapjax.pooling.functions import (
    _flat,
    as_sets,
    attention,
    avgmax,
    catavgmax,
    check_positive,
    first_token,
    first_weights,
    gap,
    gem,
    gmp,
    gsp,
    lse,
    normalize_weights,
    peak_weights,
    result_dtype,
    uniform_weights,
    weighted,
)
from gapjax.pooling.segments import Segments

Array = jax.Array


class _FixedPool(Pool):
    """A parameter-free pool: its pure ``function``, its declared weights
    ``weights_function(x, mask)`` (computed only when asked) and its graph form
    ``segment_function(Segments) -> [S, width]``."""

    weights_function: ClassVar[Callable[[Array, Array | None], Array] | None] = None
    segment_function: ClassVar[Callable[[Segments], Array]]

    def __call__(self, x: Array, mask: Array | None = None, return_weights: bool = False):
        pooled = type(self).function(x, mask)
        return (pooled, type(self).weights_function(jnp.asarray(x), mask)) if return_weights \
            else pooled

    def segment(self, x, segment_ids, num_segments, mask=None):
        sets = Segments(x, segment_ids, num_segments, mask)
        return type(self).segment_function(sets).astype(result_dtype(x))


@POOLS.register("gap", "mean")
class GlobalAvgPool(_FixedPool):
    """Global average pooling (``gap``): the uniform weighted sum."""

    weighting: ClassVar[str | None] = "uniform"
    function: ClassVar = staticmethod(gap)
    weights_function: ClassVar = staticmethod(uniform_weights)
    segment_function: ClassVar = staticmethod(Segments.mean)


@POOLS.register("gmp", "max")
class GlobalMaxPool(_FixedPool):
    """Global max pooling (``gmp``): per-channel one-hot weights at the first arg max."""

    weighting: ClassVar[str | None] = "channel"
    function: ClassVar = staticmethod(gmp)
    weights_function: ClassVar = staticmethod(peak_weights)
    segment_function: ClassVar = staticmethod(Segments.max)


@POOLS.register("gsp", "sum")
class GlobalSumPool(_FixedPool):
    """Global sum pooling (``gsp``): weight 1 at every real position."""

    weighting: ClassVar[str | None] = "position"
    function: ClassVar = staticmethod(gsp)
    weights_function: ClassVar = staticmethod(lambda x, mask: jnp.ones(
        x.shape[:-1], jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32))
    segment_function: ClassVar = staticmethod(Segments.sum)


@POOLS.register("avgmax")
class AvgMaxPool(_FixedPool):
    """``(gap + gmp) / 2``: per-channel weights ``1 / 2N + one-hot / 2``."""

    weighting: ClassVar[str | None] = "channel"
    function: ClassVar = staticmethod(avgmax)
    weights_function: ClassVar = staticmethod(lambda x, mask: 0.5 * (
        uniform_weights(x, mask)[..., None] + peak_weights(x, mask)))
    segment_function: ClassVar = staticmethod(lambda sets: 0.5 * (sets.mean() + sets.max()))


@POOLS.register("catavgmax")
class CatAvgMaxPool(_FixedPool):
    """``[gap, gmp]`` concatenated: ``[B, 2C]``."""

    function: ClassVar = staticmethod(catavgmax)
    segment_function: ClassVar = staticmethod(
        lambda sets: jnp.concatenate([sets.mean(), sets.max()], axis=-1))

    def output_width(self, channels: int) -> int:
        return 2 * channels


@POOLS.register("token")
class ClassTokenPool(_FixedPool):
    """The class token (``token``): position 0 of a token sequence that carries a class
    token there, a ViT's class-token head (timm ``global_pool="token"``). Of any other set
    it reads the first real position (row-major), with weight one."""

    weighting: ClassVar[str | None] = "position"
    function: ClassVar = staticmethod(first_token)
    weights_function: ClassVar = staticmethod(first_weights)
    segment_function: ClassVar = staticmethod(Segments.first)
    reads_class_token: ClassVar[bool] = True


class _LearnedExponent(Pool):
    """Shared by GeM and LSE: a positive exponent, fixed or learned, scalar or per channel."""

    per_channel: bool = False

    @nn.compact
    def exponent(self, channels: int, name: str, init: float, learn: bool,
                 floor: float) -> Array:
        """The exponent ``[]`` or ``[C]``; a learned one is kept above ``floor`` (a step
        through 0 would blow up ``1 / p``)."""
        check_positive(f"{type(self).__name__}.{name}", init)
        shape = (channels,) if self.per_channel else ()
        if not learn:
            return jnp.full(shape, init, jnp.float32)
        value = self.param(name, nn.initializers.constant(init), shape, jnp.float32)
        return jnp.maximum(value, floor)


@POOLS.register("gem")
class GeMPool(_LearnedExponent):
    """GeM pooling with exponent ``p`` (its initial value when ``learn_p``; scalar, or per
    channel with ``per_channel``)."""

    function: ClassVar = staticmethod(gem)
    p: float = 3.0
    learn_p: bool = True
    eps: float = 1e-6
    min_p: float = 1e-3

    def _p(self, channels: int) -> Array:
        return self.exponent(channels, "p", self.p, self.learn_p, self.min_p)

    def __call__(self, x: Array, mask: Array | None = None) -> Array:
        return gem(x, self._p(jnp.shape(x)[-1]), mask, self.eps)

    def segment(self, x, segment_ids, num_segments, mask=None):
        sets = Segments(x, segment_ids, num_segments, mask)
        p = self._p(sets.values.shape[-1])
        log_mean = sets.log_mean_exp(p * jnp.log(jnp.maximum(sets.values, self.eps)))
        return jnp.where(sets.counts > 0, jnp.exp(log_mean / p), 0.0).astype(result_dtype(x))


@POOLS.register("lse")
class LSEPool(_LearnedExponent):
    """Log-sum-exp pooling with positive sharpness ``r`` (its initial value when
    ``learn_r``)."""

    function: ClassVar = staticmethod(lse)
    r: float = 10.0
    learn_r: bool = True
    min_r: float = 1e-4

    def _r(self, channels: int) -> Array:
        return self.exponent(channels, "r", self.r, self.learn_r, self.min_r)

    def __call__(self, x: Array, mask: Array | None = None) -> Array:
        return lse(x, self._r(jnp.shape(x)[-1]), mask)

    def segment(self, x, segment_ids, num_segments, mask=None):
        sets = Segments(x, segment_ids, num_segments, mask)
        r = self._r(sets.values.shape[-1])
        return (sets.log_mean_exp(r * sets.values) / r).astype(result_dtype(x))


@POOLS.register("weighted")
class WeightedPool(Pool):
    """Weighted pooling with fixed or learned per-position weights.

    ``spatial_weights`` (shape ``[*S]`` or ``[B, *S]``, non-negative) fixes the weights;
    when it is None the weights are ``softmax`` of a learned logit map of shape ``[*S]``
    initialised to zeros, i.e. uniform, so the module starts as exactly GAP. Weights given
    to ``__call__`` override both.
    """

    weighting: ClassVar[str | None] = "position"
    spatial_weights: Any = None

    @nn.compact
    def __call__(
        self, x: Array, mask: Array | None = None, weights: Array | None = None,
        return_weights: bool = False,
    ) -> Array | tuple[Array, Array]:
        if weights is None and self.spatial_weights is not None:
            weights = jnp.asarray(self.spatial_weights)
        if weights is None:
            logits = self.param("logits", nn.initializers.zeros, x.shape[1:-1], jnp.float32)
            weights = jnp.exp(logits - jax.lax.stop_gradient(logits.max()))
        if tuple(weights.shape) == tuple(x.shape[1:-1]):
            weights = jnp.broadcast_to(weights, x.shape[:-1])
        pooled = weighted(x, weights, mask)
        if not return_weights:
            return pooled
        flat_mask = None if mask is None else _flat(jnp.asarray(mask))
        probs = normalize_weights(_flat(weights), flat_mask)
        return pooled, probs.reshape(x.shape[:-1])


@POOLS.register("attention")
class AttentionPool(Pool):
    """Attention pooling: scores from a learned projection of each position, softmax over
    positions (masked), weighted sum. ``hidden`` adds a tanh layer before the score
    (attention-MIL style); ``None`` scores with a single linear map."""

    weighting: ClassVar[str | None] = "position"
    hidden: int | None = None
    dtype: Any = None

    @nn.compact
    def scores(self, x: Array) -> Array:
        """``[..., C] -> [...]`` unnormalised score of every position (or node)."""
        h = x
        if self.hidden:
            h = jnp.tanh(nn.Dense(self.hidden, dtype=self.dtype, name="hidden")(h))
        return nn.Dense(1, dtype=self.dtype, name="score")(h)[..., 0]

    def __call__(
        self, x: Array, mask: Array | None = None, return_weights: bool = False
    ) -> Array | tuple[Array, Array]:
        as_sets(x, mask)  # shape errors surface here, before the projection
        # Padded positions are zeroed before scoring so that garbage there (even inf)
        # cannot reach the projection's gradient.
        h = x if mask is None else jnp.where(jnp.asarray(mask, bool)[..., None], x, 0)
        return attention(x, self.scores(h), mask, return_weights=return_weights)

    def segment(self, x, segment_ids, num_segments, mask=None):
        sets = Segments(x, segment_ids, num_segments, mask)
        scores = jnp.where(sets.real, self.scores(jnp.where(sets.real[:, None], x, 0))
                           .astype(jnp.float32), 0.0)[:, None]
        peak = jax.lax.stop_gradient(sets.max(scores))
        exps = jnp.where(sets.real[:, None], jnp.exp(scores - sets.gather(peak)), 0.0)
        total = sets.gather(sets.sum(exps))
        probs = exps / jnp.where(total > 0, total, 1.0)
        return sets.sum(probs * sets.values).astype(result_dtype(x))
