"""Global pooling: one family of operators that reduce a set of feature vectors to one.

Every pool takes ``x [B, *spatial, C]`` (an image ``[B, H, W, C]``, a set ``[B, N, C]``, or
any number of spatial axes) and an optional boolean ``mask [B, *spatial]`` (True = real
position) and returns ``[B, C]`` (``[B, 2C]`` for ``catavgmax``). Each is a weighted sum
``pool(x) = sum_i w_i x_i``: uniform weights (``gap``), one-hot at the maximum (``gmp``),
all ones (``gsp``), given weights (``weighted``) or weights learned from ``x``
(``attention``); ``gem`` and ``lse`` interpolate between mean and max.

Conventions shared by all of them:
  * Reductions accumulate in float32 whatever the input dtype; the result has the input dtype
    (float32 for integer inputs).
  * Masked positions never change a result, whatever they hold (even inf): they are
    zeroed (or set to -inf for ``gmp``) before any arithmetic, and receive zero gradient.
    A row with no real position pools to zeros, with finite gradients (never -inf or NaN,
    forward or backward).
  * ``gmp``'s gradient is one-hot at the arg max. Tie rule: the first maximal position in
    row-major order of the spatial axes receives the whole gradient.

Pure functions hold the math; the Linen modules registered in ``POOLS`` wrap them, own any
parameters (``p`` of GeM, ``r`` of LSE, the attention projection) and declare what they can
do (see ``Pool``): their output width, whether they are a weighted sum with weights fixed
given ``x`` (which makes class activation maps exact), and their graph (segment) form. A pool
registered once, in any module, works in image heads, SE squeezes, masked sets, graph
readouts and CAM.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gapjax.registry import Registry, build_with_options

Array = jax.Array

POOLS: Registry[type[nn.Module]] = Registry("pool")


# --------------------------------------------------------------------------------------
# Shape handling
# --------------------------------------------------------------------------------------


def _flat(a: Array) -> Array:
    """``[B, *S] -> [B, N]``; spelled out rather than ``reshape(B, -1)``, which fails on
    empty arrays."""
    return a.reshape(a.shape[0], math.prod(a.shape[1:]))


def _as_sets(x: Array, mask: Array | None, name: str = "x") -> tuple[Array, Array | None]:
    """Flattens ``x [B, *S, C]`` to ``[B, N, C]`` and ``mask [B, *S]`` to ``[B, N]``."""
    x = jnp.asarray(x)
    if x.ndim < 3:
        raise ValueError(
            f"pooling expects {name} of shape [batch, *spatial, channels] with at least one "
            f"spatial (or set) axis, i.e. rank >= 3; got shape {tuple(x.shape)}"
        )
    batch, channels = x.shape[0], x.shape[-1]
    sets = x.reshape(batch, math.prod(x.shape[1:-1]), channels)
    if mask is None:
        return sets, None
    mask = jnp.asarray(mask)
    if tuple(mask.shape) != tuple(x.shape[:-1]):
        raise ValueError(
            f"mask must have shape [batch, *spatial] = {tuple(x.shape[:-1])} to match x of "
            f"shape {tuple(x.shape)}; got {tuple(mask.shape)}"
        )
    return sets, _flat(mask).astype(bool)


def _result_dtype(x: Array) -> Any:
    """Pools keep a floating input's dtype; integer or boolean inputs pool to float32."""
    return x.dtype if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.float32


def _counts(sets: Array, mask: Array | None) -> Array:
    """Number of real positions per row, float32 ``[B, 1]``."""
    if mask is None:
        return jnp.full((sets.shape[0], 1), sets.shape[1], jnp.float32)
    return mask.sum(axis=1, keepdims=True, dtype=jnp.float32)


def _zero_masked(sets: Array, mask: Array | None) -> Array:
    """``sets [B, N, C]`` with masked positions set to 0, so padding (even inf) never leaks."""
    return sets if mask is None else jnp.where(mask[..., None], sets, jnp.zeros((), sets.dtype))


def _finite_min(dtype: Any) -> Array:
    """The lowest finite value of ``dtype``: a fill that keeps later arithmetic finite."""
    return jnp.asarray(jnp.finfo(dtype).min if jnp.issubdtype(dtype, jnp.floating) else
                       jnp.iinfo(dtype).min, dtype)


def _max_identity(dtype: Any) -> Array:
    """The identity of ``max``: -inf for floats, so no real value (even the lowest finite
    one) can tie with a padded position; the lowest integer for integer types."""
    if jnp.issubdtype(dtype, jnp.floating):
        return jnp.asarray(-jnp.inf, dtype)
    return _finite_min(dtype)


def _max_masked(sets: Array, mask: Array | None) -> Array:
    """``sets [B, N, C]`` with masked positions set to the identity of max (-inf), so
    padding can neither win nor tie."""
    return sets if mask is None else jnp.where(mask[..., None], sets, _max_identity(sets.dtype))


def _max_of_positions(sets: Array, mask: Array | None) -> Array:
    """``[B, N, C] -> [B, C]`` max over real positions, in ``sets.dtype``; the identity of
    max (-inf) for a row without any, N = 0 included."""
    return _max_masked(sets, mask).max(axis=1, initial=_max_identity(sets.dtype))


# --------------------------------------------------------------------------------------
# Parameter-free pools
# --------------------------------------------------------------------------------------


def gsp(x: Array, mask: Array | None = None) -> Array:
    """Global sum pooling: ``[B, *S, C] -> [B, C]``, the sum over real positions."""
    sets, mask = _as_sets(x, mask)
    return _zero_masked(sets, mask).sum(axis=1, dtype=jnp.float32).astype(_result_dtype(sets))


def gap(x: Array, mask: Array | None = None) -> Array:
    """Global average pooling: ``[B, *S, C] -> [B, C]``, the mean over real positions.

    Its gradient is ``1/N`` at every real position (``N`` = number of real positions).
    """
    sets, mask = _as_sets(x, mask)
    total = _zero_masked(sets, mask).sum(axis=1, dtype=jnp.float32)
    return (total / jnp.maximum(_counts(sets, mask), 1.0)).astype(_result_dtype(sets))


def _first_peak(sets: Array, peak: Array) -> Array:
    """Boolean ``[B, N, C]``: True at the first position of ``sets [B, N, C]`` equal to
    ``peak [B, C]``, the position that a max's derivative follows (the tie rule)."""
    # Autodiff of max would split the derivative evenly between tied positions; it goes
    # to the first arg max instead, as for a one-hot pooling weight. The first maximal
    # position is a min-reduction over positions (cheaper on CPU than argmax, whose
    # (value, index) reduction XLA does not vectorise).
    positions = jnp.arange(sets.shape[1], dtype=jnp.int32)[None, :, None]
    is_peak = sets == peak[:, None, :].astype(sets.dtype)
    none = sets.shape[1]  # "no position": also the min's identity, for N = 0
    first = jnp.where(is_peak, positions, none).min(axis=1, keepdims=True, initial=none)
    return positions == first


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _mean_and_peak(sets: Array, mask: Array | None, dtype: Any) -> Array:
    """Mean and max over the real positions of ``sets [B, N, C]`` as ``[B, 2, C]`` in
    ``dtype`` (``[:, 0]`` mean, ``[:, 1]`` max; zeros for a row without real positions).
    ``dtype`` is ``sets.dtype`` or float32, so the max is exact.

    GMP, avgmax and catavgmax share it (XLA drops the half a pool does not use); row ``b``
    reshaped to ``[2C]`` is catavgmax. The derivative of the max follows the tie rule of
    ``gmp``; the rule is linear in the tangents, so forward mode (jvp, hessian) and reverse
    mode (its transpose) both work.
    """
    counts = _counts(sets, mask)
    mean = _zero_masked(sets, mask).sum(axis=1, dtype=jnp.float32) / jnp.maximum(counts, 1.0)
    peak = _max_of_positions(sets, mask)
    peak = jnp.where(counts > 0, peak, jnp.zeros((), peak.dtype))
    return jnp.stack([mean.astype(dtype), peak.astype(dtype)], axis=1)


@_mean_and_peak.defjvp
def _mean_and_peak_jvp(dtype, primals, tangents):
    sets, mask = primals
    stats = _mean_and_peak(sets, mask, dtype)
    # Masked positions hold no part of the mean and can never be the first peak; a row
    # without real positions pools to the constant 0 and gets no derivative.
    dsets = _zero_masked(tangents[0], mask)
    first = _first_peak(_max_masked(sets, mask), stats[:, 1])
    dmean = dsets.sum(axis=1, dtype=jnp.float32) / jnp.maximum(_counts(sets, mask), 1.0)
    dpeak = jnp.where(first, dsets, jnp.zeros((), dsets.dtype)).sum(axis=1)
    return stats, jnp.stack([dmean.astype(dtype), dpeak.astype(dtype)], axis=1)


def gmp(x: Array, mask: Array | None = None) -> Array:
    """Global max pooling: ``[B, *S, C] -> [B, C]``, the max over real positions.

    The gradient is one-hot at the arg max of each (row, channel). Tie rule: the first
    maximal position (row-major over the spatial axes) receives the whole gradient.
    """
    sets, mask = _as_sets(x, mask)
    return _mean_and_peak(sets, mask, sets.dtype)[:, 1]


def avgmax(x: Array, mask: Array | None = None) -> Array:
    """Average of GAP and GMP, ``(gap + gmp) / 2``: ``[B, *S, C] -> [B, C]``."""
    sets, mask = _as_sets(x, mask)
    stats = _mean_and_peak(sets, mask, jnp.float32)
    return (0.5 * (stats[:, 0] + stats[:, 1])).astype(_result_dtype(sets))


def catavgmax(x: Array, mask: Array | None = None) -> Array:
    """GAP and GMP concatenated, ``[gap, gmp]``: ``[B, *S, C] -> [B, 2C]`` (mean first)."""
    sets, mask = _as_sets(x, mask)
    return _mean_and_peak(sets, mask, _result_dtype(sets)).reshape(sets.shape[0], 2 * sets.shape[2])


# --------------------------------------------------------------------------------------
# Power means: GeM and log-sum-exp
# --------------------------------------------------------------------------------------


def _log_mean_exp(z: Array, peak: Array, mask: Array | None) -> tuple[Array, Array]:
    """Stable ``log(mean_i exp(z_i))`` over axis 1 of ``z [B, N, C]`` (float32).

    ``peak [B, C]`` is the max of ``z`` over the real positions; it is subtracted (without
    gradient) so nothing overflows, and ``log1p(mean(expm1(.)))`` keeps precision when all
    ``z`` are close to each other, which is what makes the small-temperature limit (the
    mean) accurate. Returns ``(value [B, C], has_any [B, 1])``.
    """
    counts = _counts(z, mask)
    has_any = counts > 0
    peak = jnp.where(has_any, jax.lax.stop_gradient(peak), 0.0)[:, None, :]
    shifted = z - peak
    if mask is not None:
        shifted = jnp.where(mask[..., None], shifted, 0.0)  # keeps expm1 of pads finite
    mean_expm1 = jnp.expm1(shifted).sum(axis=1) / jnp.maximum(counts, 1.0)
    return peak[:, 0] + jnp.log1p(mean_expm1), has_any


def check_positive(field: str, value: Any) -> None:
    """Raises one clear ValueError when a concrete ``value`` (scalar or array) is not > 0.

    Traced values (a learned exponent inside ``jit``) cannot be checked here; the modules
    keep theirs positive with a floor instead.
    """
    if isinstance(value, jax.core.Tracer):
        return
    values = np.asarray(value)
    if values.size and not bool((values > 0).all()):
        shown = values.tolist() if values.ndim else values.item()
        raise ValueError(f"{field}={shown!r} is not valid; it must be > 0 (valid range: (0, inf))")


def _exponent(value: Array | float, name: str, pool_name: str, channels: int) -> Array:
    """Validates a positive scalar or per-channel ``[C]`` exponent (``p`` of GeM, ``r`` of
    LSE)."""
    check_positive(f"{pool_name}: {name}", value)
    value = jnp.asarray(value, jnp.float32)
    if value.ndim > 1 or (value.ndim == 1 and value.shape[0] not in (1, channels)):
        raise ValueError(
            f"{pool_name}: {name} must be a scalar or have shape [channels] = [{channels}]; "
            f"got shape {tuple(value.shape)}"
        )
    return value


def gem(x: Array, p: Array | float = 3.0, mask: Array | None = None, eps: float = 1e-6) -> Array:
    """Generalized mean pooling ``(mean_i max(x_i, eps)^p)^(1/p)``: ``[B, *S, C] -> [B, C]``.

    ``p > 0`` is a scalar or per channel ``[C]``; ``p = 1`` is GAP (for inputs >= eps) and
    ``p -> inf`` tends to GMP. Evaluated in log space with the max subtracted, so it is
    stable for ``p`` of several hundred (``x^p`` itself would overflow float32 from
    ``p ~ 40`` for ``x ~ 10``); inputs below ``eps`` (zeros, negatives) are clamped to
    ``eps`` as in the original formulation, which keeps the logarithm and its gradient finite.
    """
    sets, mask = _as_sets(x, mask)
    p = _exponent(p, "p", "gem", sets.shape[-1])
    logs = jnp.log(jnp.maximum(_zero_masked(sets, mask).astype(jnp.float32), eps))
    # The shift: p log(max(x, eps)) is increasing in x for p > 0, so the max of the
    # transformed values is the transform of the max, and the log runs once per output.
    peak = p * jnp.log(jnp.maximum(_max_of_positions(sets, mask).astype(jnp.float32), eps))
    log_mean, has_any = _log_mean_exp(p * logs, peak, mask)
    pooled = jnp.exp(log_mean / p)
    return jnp.where(has_any, pooled, 0.0).astype(_result_dtype(sets))


def lse(x: Array, r: Array | float = 10.0, mask: Array | None = None) -> Array:
    """Log-sum-exp pooling ``(1/r) log(mean_i exp(r x_i))``: ``[B, *S, C] -> [B, C]``.

    ``r > 0`` (scalar or ``[C]``) is the inverse temperature: the pool tends to GAP as
    ``r -> 0`` and to GMP as ``r -> inf`` (within ``log(N) / r``). The max is subtracted,
    so nothing overflows.
    """
    sets, mask = _as_sets(x, mask)
    r = _exponent(r, "r", "lse", sets.shape[-1])
    z = r * _zero_masked(sets, mask).astype(jnp.float32)
    peak = r * _max_of_positions(sets, mask).astype(jnp.float32)  # max of r x, as r > 0
    log_mean, has_any = _log_mean_exp(z, peak, mask)
    return jnp.where(has_any, log_mean / r, 0.0).astype(_result_dtype(sets))


# --------------------------------------------------------------------------------------
# Weighted and attention pooling
# --------------------------------------------------------------------------------------


def normalize_weights(weights: Array, mask: Array | None = None) -> Array:
    """Non-negative position weights ``[B, *S]`` -> weights summing to one over real positions.

    Masked positions get weight 0; a row whose weights sum to 0 gets all zeros.
    """
    weights = jnp.asarray(weights, jnp.float32)
    if mask is not None:
        weights = jnp.where(mask, weights, 0.0)
    axes = tuple(range(1, weights.ndim))
    total = weights.sum(axis=axes, keepdims=True)
    safe_total = jnp.where(total > 0, total, 1.0)
    return jnp.where(total > 0, weights / safe_total, 0.0)


def _weighted_sum(probs: Array, x: Array, mask: Array | None) -> Array:
    """``sum_i probs[b, i] * x[b, i, c]`` over the spatial positions ``i``, accumulated in
    float32: ``probs [B, N]``, ``x [B, *S, C]``, ``mask [B, *S]`` -> ``[B, C]``.

    A broadcast multiply and a reduction rather than a batched matrix-vector product, and
    in ``x``'s own layout rather than flattened to ``[B, N, C]``: on CPU XLA fuses this into
    one vectorised pass over ``x`` (the other forms measured 3-6x slower). Masked positions
    are zeroed first so that padding (even inf, where ``0 * inf`` would be NaN) cannot leak.
    """
    values = x.astype(jnp.float32)
    if mask is not None:
        values = jnp.where(jnp.asarray(mask, bool)[..., None], values, 0.0)
    spatial_axes = tuple(range(1, x.ndim - 1))
    return (probs.reshape(x.shape[:-1])[..., None] * values).sum(axis=spatial_axes)


def weighted(x: Array, weights: Array, mask: Array | None = None) -> Array:
    """Weighted pooling ``sum_i w_i x_i / sum_i w_i``: ``[B, *S, C] -> [B, C]``.

    ``weights`` are non-negative, of shape ``[B, *S]`` or ``[*S]`` (shared by the batch).
    Uniform weights give the GAP result up to float rounding; a row whose weights (over
    real positions) sum to zero pools to zeros.
    """
    sets, flat_mask = _as_sets(x, mask)
    spatial = tuple(jnp.shape(x)[1:-1])
    batch = sets.shape[0]
    weights = jnp.asarray(weights)
    if tuple(weights.shape) == spatial:
        weights = jnp.broadcast_to(weights, (batch, *spatial))
    if tuple(weights.shape) != (batch, *spatial):
        raise ValueError(
            f"weights must have shape [batch, *spatial] = {(batch, *spatial)} or "
            f"[*spatial] = {spatial}; got {tuple(weights.shape)}"
        )
    probs = normalize_weights(_flat(weights), flat_mask)
    return _weighted_sum(probs, jnp.asarray(x), mask).astype(_result_dtype(sets))


def attention_weights(scores: Array, mask: Array | None = None) -> Array:
    """Masked softmax of ``scores [B, *S]`` over all spatial positions: ``[B, *S]`` float32.

    Masked positions get 0; a fully masked row gets all zeros with finite gradients.
    """
    scores = jnp.asarray(scores)
    flat = _flat(scores.astype(jnp.float32))
    flat_mask = None
    if mask is not None:
        mask = jnp.asarray(mask)
        if tuple(mask.shape) != tuple(scores.shape):
            raise ValueError(
                f"mask must have the shape of the scores [batch, *spatial] = "
                f"{tuple(scores.shape)}; got {tuple(mask.shape)}"
            )
        flat_mask = _flat(mask.astype(bool))
    filled = flat if flat_mask is None else jnp.where(flat_mask, flat, _finite_min(jnp.float32))
    peak = jax.lax.stop_gradient(filled.max(axis=1, keepdims=True,
                                            initial=_finite_min(jnp.float32)))
    shifted = flat - peak
    if flat_mask is not None:
        # Zeroed before exp: a padded score far above the real ones would overflow to inf,
        # and inf * 0 in the backward pass is NaN.
        shifted = jnp.where(flat_mask, shifted, 0.0)
    exps = jnp.exp(shifted)
    if flat_mask is not None:
        exps = jnp.where(flat_mask, exps, 0.0)
    total = exps.sum(axis=1, keepdims=True)
    probs = jnp.where(total > 0, exps / jnp.where(total > 0, total, 1.0), 0.0)
    return probs.reshape(scores.shape)


def attention(
    x: Array, scores: Array, mask: Array | None = None, return_weights: bool = False
) -> Array | tuple[Array, Array]:
    """Attention pooling: softmax of ``scores [B, *S]`` over positions, then a weighted sum.

    Returns ``[B, C]``, and the weights ``[B, *S]`` (float32, summing to one over real
    positions) too when ``return_weights``.
    """
    sets, _ = _as_sets(x, mask)
    scores = jnp.asarray(scores)
    if tuple(scores.shape) != tuple(jnp.shape(x)[:-1]):
        raise ValueError(
            f"attention scores must have shape [batch, *spatial] = {tuple(jnp.shape(x)[:-1])}; "
            f"got {tuple(scores.shape)}"
        )
    probs = attention_weights(scores, mask)
    pooled = _weighted_sum(_flat(probs), jnp.asarray(x), mask).astype(_result_dtype(sets))
    return (pooled, probs) if return_weights else pooled


# --------------------------------------------------------------------------------------
# Segment forms: the pools applied to graphs (nodes selected by a segment index)
# --------------------------------------------------------------------------------------


class Segments:
    """Nodes ``x [N, C]`` grouped by ``segment_ids [N]`` into ``num_segments`` sets.

    Indices outside ``[0, num_segments)`` and masked nodes (``mask [N]`` False) are dropped;
    ``values`` are float32 with dropped rows zeroed, ``counts [S, 1]`` the real nodes per set.
    """

    def __init__(self, x: Array, segment_ids: Array, num_segments: int,
                 mask: Array | None = None):
        x, segment_ids = jnp.asarray(x), jnp.asarray(segment_ids)
        if x.ndim != 2:
            raise ValueError(f"segment pooling expects x of shape [nodes, channels]; got "
                             f"{tuple(x.shape)}")
        if segment_ids.shape != x.shape[:1]:
            raise ValueError(f"segment_ids must have shape [nodes] = {x.shape[:1]}; got "
                             f"{tuple(segment_ids.shape)}")
        if mask is not None:
            mask = jnp.asarray(mask, bool)
            if mask.shape != x.shape[:1]:
                raise ValueError(f"mask must have shape [nodes] = {x.shape[:1]}; got "
                                 f"{tuple(mask.shape)}")
            segment_ids = jnp.where(mask, segment_ids, num_segments)  # the dropped slot
        self.x, self.num_segments = x, num_segments
        self.ids = segment_ids.astype(jnp.int32)
        self.real = (self.ids >= 0) & (self.ids < num_segments)
        self.values = jnp.where(self.real[:, None], x.astype(jnp.float32), 0.0)
        self.counts = jax.ops.segment_sum(self.real.astype(jnp.float32), self.ids,
                                          num_segments)[:, None]

    def sum(self, values: Array | None = None) -> Array:
        """``[S, C]`` float32 sums of ``values`` (default: the nodes)."""
        return jax.ops.segment_sum(self.values if values is None else values, self.ids,
                                   self.num_segments)

    def mean(self) -> Array:
        return self.sum() / jnp.maximum(self.counts, 1.0)

    def max(self, values: Array | None = None) -> Array:
        """``[S, C]`` maxima (tie rule of ``gmp``); 0 for an empty set."""
        values = self.values if values is None else values
        filled = jnp.where(self.real[:, None], values, _finite_min(jnp.float32))
        return jnp.where(self.counts > 0, _segment_max(filled, self.ids, self.num_segments), 0.0)

    def gather(self, per_segment: Array) -> Array:
        """``[S, C] -> [N, C]``: each node's row of a per-segment array."""
        return per_segment[jnp.clip(self.ids, 0, self.num_segments - 1)]

    def log_mean_exp(self, z: Array) -> Array:
        """Stable ``log(mean exp z)`` per set of ``z [N, C]`` (float32), 0 for empty sets;
        as ``_log_mean_exp``, the max is subtracted without gradient."""
        has_any = self.counts > 0
        peak = jax.lax.stop_gradient(jnp.where(has_any, self.max(z), 0.0))
        shifted = jnp.where(self.real[:, None], z - self.gather(peak), 0.0)
        mean_expm1 = self.sum(jnp.expm1(shifted)) / jnp.maximum(self.counts, 1.0)
        return jnp.where(has_any, peak + jnp.log1p(mean_expm1), 0.0)

    def dense(self) -> tuple[Array, Array]:
        """The sets as a padded batch ``([S, N, C], mask [S, N])``: the generic graph form
        of any pool (``O(S * N * C)`` memory; pools override ``segment`` to avoid it)."""
        member = self.real[None, :] & (self.ids[None, :] == jnp.arange(self.num_segments)[:, None])
        return jnp.broadcast_to(self.x, (self.num_segments, *self.x.shape)), member


def _plain_segment_max(values: Array, segments: Array, num_segments: int) -> Array:
    return jax.ops.segment_max(values, segments, num_segments)


def _segment_max_fwd(values, segments, num_segments):
    out = jax.ops.segment_max(values, segments, num_segments)
    return out, (values, segments, out)


def _segment_max_bwd(num_segments, residuals, g):
    # The tie rule of gmp: the first maximal node of each (segment, channel) takes the
    # whole gradient.
    values, segments, out = residuals
    in_range = ((segments >= 0) & (segments < num_segments))[:, None]
    safe = jnp.clip(segments, 0, num_segments - 1)
    is_max = in_range & (values == out[safe])
    node_index = jnp.broadcast_to(jnp.arange(values.shape[0])[:, None], values.shape)
    first = jax.ops.segment_min(jnp.where(is_max, node_index, values.shape[0]), segments,
                                num_segments)
    return jnp.where(is_max & (node_index == first[safe]), g[safe], jnp.zeros((), g.dtype)), None


_segment_max = jax.custom_vjp(_plain_segment_max, nondiff_argnums=(2,))
_segment_max.defvjp(_segment_max_fwd, _segment_max_bwd)


# --------------------------------------------------------------------------------------
# Linen modules (the POOLS registry)
# --------------------------------------------------------------------------------------

#: What ``Pool.weighting`` may declare.
WEIGHTINGS = ("uniform", "position", "channel", None)


class Pool(nn.Module):
    """Base class of the ``POOLS`` modules: ``x [B, *S, C], mask [B, *S] -> [B, width]``.

    A pool declares what it can do, so nothing elsewhere lists pools by name:

    * ``weighting``: ``"uniform"`` (a plain mean: CAM is exact), ``"position"`` (a sum
      ``sum_i w_i x_i`` with weights ``[B, *S]`` fixed given ``x``), ``"channel"`` (weights
      ``[B, *S, C]`` per channel, GMP's one-hot arg max) or None (not such a sum: GeM, LSE,
      catavgmax). When set, ``__call__(x, mask, return_weights=True)`` returns
      ``(pooled, weights)`` and a head's per-location contributions sum exactly to its logits.
    * ``output_width(channels)``: width of the pooled vector.
    * ``segment(x [N, C], segment_ids [N], num_segments, mask=None) -> [S, width]``: the
      graph form. The default scatters the sets to a padded batch and calls the pool;
      pools override it with ``jax.ops.segment_*`` where they can.
    * ``function``: the pure function behind the pool, called by ``pool(name, x, ...)``
      with the module's keyword arguments (None: ``pool`` applies the module at its
      initial parameters).
    """

    weighting: ClassVar[str | None] = None
    function: ClassVar[Callable[..., Array] | None] = None

    def output_width(self, channels: int) -> int:
        """Width of the pooled vector for ``channels`` input channels."""
        return channels

    def segment(self, x: Array, segment_ids: Array, num_segments: int,
                mask: Array | None = None) -> Array:
        """Pools the nodes of each segment: ``[N, C] -> [num_segments, width]``."""
        sets, member = Segments(x, segment_ids, num_segments, mask).dense()
        return self(sets, member)


def _weights_result(pooled: Array, weights: Callable[[], Array], return_weights: bool):
    """``pooled``, or ``(pooled, weights())`` when asked (weights are computed only then)."""
    return (pooled, weights()) if return_weights else pooled


def _uniform_weights(x: Array, mask: Array | None) -> Array:
    """GAP's weights ``[B, *S]``: ``1 / N`` at the real positions (float32)."""
    real = jnp.ones(x.shape[:-1], bool) if mask is None else jnp.asarray(mask, bool)
    counts = real.reshape(real.shape[0], -1).sum(axis=1, dtype=jnp.float32)
    shape = (real.shape[0],) + (1,) * (real.ndim - 1)
    return jnp.where(real, 1.0 / jnp.maximum(counts, 1.0).reshape(shape), 0.0)


def _peak_weights(x: Array, mask: Array | None) -> Array:
    """GMP's weights ``[B, *S, C]``: one-hot at the first arg max of each channel."""
    sets, flat_mask = _as_sets(x, mask)
    peak = _max_of_positions(sets, flat_mask)
    first = _first_peak(_max_masked(sets, flat_mask), peak)
    if flat_mask is not None:
        first = first & flat_mask[..., None]
    return first.astype(jnp.float32).reshape(x.shape)


@POOLS.register("gap", "mean")
class GlobalAvgPool(Pool):
    """Global average pooling (``gap``): the uniform weighted sum."""

    weighting: ClassVar[str | None] = "uniform"
    function: ClassVar = staticmethod(gap)

    def __call__(self, x: Array, mask: Array | None = None, return_weights: bool = False):
        return _weights_result(gap(x, mask), lambda: _uniform_weights(jnp.asarray(x), mask),
                               return_weights)

    def segment(self, x, segment_ids, num_segments, mask=None):
        return Segments(x, segment_ids, num_segments, mask).mean().astype(_result_dtype(x))


@POOLS.register("gmp", "max")
class GlobalMaxPool(Pool):
    """Global max pooling (``gmp``): per-channel one-hot weights at the first arg max."""

    weighting: ClassVar[str | None] = "channel"
    function: ClassVar = staticmethod(gmp)

    def __call__(self, x: Array, mask: Array | None = None, return_weights: bool = False):
        return _weights_result(gmp(x, mask), lambda: _peak_weights(jnp.asarray(x), mask),
                               return_weights)

    def segment(self, x, segment_ids, num_segments, mask=None):
        return Segments(x, segment_ids, num_segments, mask).max().astype(_result_dtype(x))


@POOLS.register("gsp", "sum")
class GlobalSumPool(Pool):
    """Global sum pooling (``gsp``): weight 1 at every real position."""

    weighting: ClassVar[str | None] = "position"
    function: ClassVar = staticmethod(gsp)

    def __call__(self, x: Array, mask: Array | None = None, return_weights: bool = False):
        x = jnp.asarray(x)
        return _weights_result(gsp(x, mask), lambda: jnp.ones(x.shape[:-1], jnp.float32) if
                               mask is None else jnp.asarray(mask, jnp.float32), return_weights)

    def segment(self, x, segment_ids, num_segments, mask=None):
        return Segments(x, segment_ids, num_segments, mask).sum().astype(_result_dtype(x))


@POOLS.register("avgmax")
class AvgMaxPool(Pool):
    """``(gap + gmp) / 2``: per-channel weights ``1 / 2N + one-hot / 2``."""

    weighting: ClassVar[str | None] = "channel"
    function: ClassVar = staticmethod(avgmax)

    def __call__(self, x: Array, mask: Array | None = None, return_weights: bool = False):
        x = jnp.asarray(x)
        return _weights_result(avgmax(x, mask), lambda: 0.5 * (
            _uniform_weights(x, mask)[..., None] + _peak_weights(x, mask)), return_weights)

    def segment(self, x, segment_ids, num_segments, mask=None):
        sets = Segments(x, segment_ids, num_segments, mask)
        return (0.5 * (sets.mean() + sets.max())).astype(_result_dtype(x))


@POOLS.register("catavgmax")
class CatAvgMaxPool(Pool):
    """``[gap, gmp]`` concatenated: ``[B, 2C]``."""

    function: ClassVar = staticmethod(catavgmax)

    def __call__(self, x: Array, mask: Array | None = None) -> Array:
        return catavgmax(x, mask)

    def output_width(self, channels: int) -> int:
        return 2 * channels

    def segment(self, x, segment_ids, num_segments, mask=None):
        sets = Segments(x, segment_ids, num_segments, mask)
        return jnp.concatenate([sets.mean(), sets.max()], axis=-1).astype(_result_dtype(x))


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
        return jnp.where(sets.counts > 0, jnp.exp(log_mean / p), 0.0).astype(_result_dtype(x))


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
        return (sets.log_mean_exp(r * sets.values) / r).astype(_result_dtype(x))


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
        _as_sets(x, mask)  # shape errors surface here, before the projection
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
        return sets.sum(probs * sets.values).astype(_result_dtype(x))


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


__all__ = [
    "POOLS",
    "WEIGHTINGS",
    "AttentionPool",
    "AvgMaxPool",
    "CatAvgMaxPool",
    "GeMPool",
    "GlobalAvgPool",
    "GlobalMaxPool",
    "GlobalSumPool",
    "LSEPool",
    "Pool",
    "Segments",
    "WeightedPool",
    "attention",
    "attention_weights",
    "avgmax",
    "catavgmax",
    "check_positive",
    "gap",
    "gem",
    "gmp",
    "gsp",
    "lse",
    "make_pool",
    "normalize_weights",
    "pool",
    "weighted",
]
