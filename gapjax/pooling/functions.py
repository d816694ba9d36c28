"""The pooling family as pure functions of arrays: ``x [B, *S, C]``, ``mask [B, *S]`` -> ``[B, C]``.

``x`` is an image ``[B, H, W, C]``, a set ``[B, N, C]`` or any number of spatial axes;
``mask`` is True at real positions. Each pool is a weighted sum ``sum_i w_i x_i``: uniform
weights (``gap``), one-hot at the maximum (``gmp``), all ones (``gsp``), given weights
(``weighted``), weights learned from ``x`` (``attention``) or one-hot at the first position
(``first_token``); ``gem`` and ``lse`` interpolate between mean and max.

Conventions shared by all of them:
  * Reductions accumulate in float32 whatever the input dtype; the result has the input dtype
    (float32 for integer inputs).
  * Masked positions never change a result, whatever they hold (even inf): they are
    zeroed (or set to -inf for ``gmp``) before any arithmetic, and receive zero gradient.
    A row with no real position pools to zeros, with finite gradients (never -inf or NaN,
    forward or backward).
  * ``gmp``'s gradient is one-hot at the arg max. Tie rule: the first maximal position in
    row-major order of the spatial axes receives the whole gradient.

``as_sets``, ``zero_masked``, ``real_counts`` and ``result_dtype`` are the helpers a new pool
builds on (they apply the conventions).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# --------------------------------------------------------------------------------------
# Shape handling
# --------------------------------------------------------------------------------------


def _flat(a: Array) -> Array:
    """``[B, *S] -> [B, N]``; spelled out rather than ``reshape(B, -1)``, which fails on
    empty arrays."""
    return a.reshape(a.shape[0], math.prod(a.shape[1:]))


def as_sets(x: Array, mask: Array | None, name: str = "x") -> tuple[Array, Array | None]:
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


def result_dtype(x: Array) -> Any:
    """Pools keep a floating input's dtype; integer or boolean inputs pool to float32."""
    return x.dtype if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.float32


def real_counts(sets: Array, mask: Array | None) -> Array:
    """Number of real positions per row, float32 ``[B, 1]``."""
    if mask is None:
        return jnp.full((sets.shape[0], 1), sets.shape[1], jnp.float32)
    return mask.sum(axis=1, keepdims=True, dtype=jnp.float32)


def zero_masked(sets: Array, mask: Array | None) -> Array:
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
    sets, mask = as_sets(x, mask)
    return zero_masked(sets, mask).sum(axis=1, dtype=jnp.float32).astype(result_dtype(sets))


def gap(x: Array, mask: Array | None = None) -> Array:
    """Global average pooling: ``[B, *S, C] -> [B, C]``, the mean over real positions.

    Its gradient is ``1/N`` at every real position (``N`` = number of real positions).
    """
    sets, mask = as_sets(x, mask)
    total = zero_masked(sets, mask).sum(axis=1, dtype=jnp.float32)
    return (total / jnp.maximum(real_counts(sets, mask), 1.0)).astype(result_dtype(sets))


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
    counts = real_counts(sets, mask)
    mean = zero_masked(sets, mask).sum(axis=1, dtype=jnp.float32) / jnp.maximum(counts, 1.0)
    peak = _max_of_positions(sets, mask)
    peak = jnp.where(counts > 0, peak, jnp.zeros((), peak.dtype))
    return jnp.stack([mean.astype(dtype), peak.astype(dtype)], axis=1)


@_mean_and_peak.defjvp
def _mean_and_peak_jvp(dtype, primals, tangents):
    sets, mask = primals
    stats = _mean_and_peak(sets, mask, dtype)
    # Masked positions hold no part of the mean and can never be the first peak; a row
    # without real positions pools to the constant 0 and gets no derivative.
    dsets = zero_masked(tangents[0], mask)
    first = _first_peak(_max_masked(sets, mask), stats[:, 1])
    dmean = dsets.sum(axis=1, dtype=jnp.float32) / jnp.maximum(real_counts(sets, mask), 1.0)
    dpeak = jnp.where(first, dsets, jnp.zeros((), dsets.dtype)).sum(axis=1)
    return stats, jnp.stack([dmean.astype(dtype), dpeak.astype(dtype)], axis=1)


def gmp(x: Array, mask: Array | None = None) -> Array:
    """Global max pooling: ``[B, *S, C] -> [B, C]``, the max over real positions.

    The gradient is one-hot at the arg max of each (row, channel). Tie rule: the first
    maximal position (row-major over the spatial axes) receives the whole gradient.
    """
    sets, mask = as_sets(x, mask)
    return _mean_and_peak(sets, mask, sets.dtype)[:, 1]


def avgmax(x: Array, mask: Array | None = None) -> Array:
    """Average of GAP and GMP, ``(gap + gmp) / 2``: ``[B, *S, C] -> [B, C]``."""
    sets, mask = as_sets(x, mask)
    stats = _mean_and_peak(sets, mask, jnp.float32)
    return (0.5 * (stats[:, 0] + stats[:, 1])).astype(result_dtype(sets))


def catavgmax(x: Array, mask: Array | None = None) -> Array:
    """GAP and GMP concatenated, ``[gap, gmp]``: ``[B, *S, C] -> [B, 2C]`` (mean first)."""
    sets, mask = as_sets(x, mask)
    return _mean_and_peak(sets, mask, result_dtype(sets)).reshape(sets.shape[0], 2 * sets.shape[2])


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
    counts = real_counts(z, mask)
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
    return channel_parameter(value, name, pool_name, channels)


def channel_parameter(value: Any, name: str, pool_name: str, channels: int) -> Array:
    """A scalar or per-channel ``[C]`` float32 parameter of a pool (``p``, ``r``, ``t``);
    any other shape is one error naming the pool, the option and ``C``."""
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
    sets, mask = as_sets(x, mask)
    p = _exponent(p, "p", "gem", sets.shape[-1])
    logs = jnp.log(jnp.maximum(zero_masked(sets, mask).astype(jnp.float32), eps))
    # The shift: p log(max(x, eps)) is increasing in x for p > 0, so the max of the
    # transformed values is the transform of the max, and the log runs once per output.
    peak = p * jnp.log(jnp.maximum(_max_of_positions(sets, mask).astype(jnp.float32), eps))
    log_mean, has_any = _log_mean_exp(p * logs, peak, mask)
    pooled = jnp.exp(log_mean / p)
    return jnp.where(has_any, pooled, 0.0).astype(result_dtype(sets))


def lse(x: Array, r: Array | float = 10.0, mask: Array | None = None) -> Array:
    """Log-sum-exp pooling ``(1/r) log(mean_i exp(r x_i))``: ``[B, *S, C] -> [B, C]``.

    ``r > 0`` (scalar or ``[C]``) is the inverse temperature: the pool tends to GAP as
    ``r -> 0`` and to GMP as ``r -> inf`` (within ``log(N) / r``). The max is subtracted,
    so nothing overflows.
    """
    sets, mask = as_sets(x, mask)
    r = _exponent(r, "r", "lse", sets.shape[-1])
    z = r * zero_masked(sets, mask).astype(jnp.float32)
    peak = r * _max_of_positions(sets, mask).astype(jnp.float32)  # max of r x, as r > 0
    log_mean, has_any = _log_mean_exp(z, peak, mask)
    return jnp.where(has_any, log_mean / r, 0.0).astype(result_dtype(sets))


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
    sets, flat_mask = as_sets(x, mask)
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
    return _weighted_sum(probs, jnp.asarray(x), mask).astype(result_dtype(sets))


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
    sets, _ = as_sets(x, mask)
    scores = jnp.asarray(scores)
    if tuple(scores.shape) != tuple(jnp.shape(x)[:-1]):
        raise ValueError(
            f"attention scores must have shape [batch, *spatial] = {tuple(jnp.shape(x)[:-1])}; "
            f"got {tuple(scores.shape)}"
        )
    probs = attention_weights(scores, mask)
    pooled = _weighted_sum(_flat(probs), jnp.asarray(x), mask).astype(result_dtype(sets))
    return (pooled, probs) if return_weights else pooled


def uniform_weights(x: Array, mask: Array | None) -> Array:
    """GAP's weights ``[B, *S]``: ``1 / N`` at the real positions (float32)."""
    real = jnp.ones(x.shape[:-1], bool) if mask is None else jnp.asarray(mask, bool)
    counts = real.reshape(real.shape[0], -1).sum(axis=1, dtype=jnp.float32)
    shape = (real.shape[0],) + (1,) * (real.ndim - 1)
    return jnp.where(real, 1.0 / jnp.maximum(counts, 1.0).reshape(shape), 0.0)


def peak_weights(x: Array, mask: Array | None) -> Array:
    """GMP's weights ``[B, *S, C]``: one-hot at the first arg max of each channel."""
    sets, flat_mask = as_sets(x, mask)
    peak = _max_of_positions(sets, flat_mask)
    first = _first_peak(_max_masked(sets, flat_mask), peak)
    if flat_mask is not None:
        first = first & flat_mask[..., None]
    return first.astype(jnp.float32).reshape(x.shape)



def first_token(x: Array, mask: Array | None = None) -> Array:
    """The first real position (row-major) of each row: ``[B, *S, C] -> [B, C]``; zeros for
    a row without one. Of a token sequence that carries a class token at position 0 (a
    ViT's), that is the class token."""
    sets, flat_mask = as_sets(x, mask)
    dtype = result_dtype(sets)
    if sets.shape[1] == 0:
        return jnp.zeros((sets.shape[0], sets.shape[2]), dtype)
    if flat_mask is None:
        return sets[:, 0].astype(dtype)
    picked = jnp.take_along_axis(sets, jnp.argmax(flat_mask, axis=1)[:, None, None], axis=1)
    real = flat_mask.any(axis=1)[:, None]
    return jnp.where(real, picked[:, 0], jnp.zeros((), sets.dtype)).astype(dtype)


def first_weights(x: Array, mask: Array | None) -> Array:
    """``first_token``'s weights ``[B, *S]``: one-hot at the first real position (float32)."""
    real = jnp.ones(jnp.shape(x)[:-1], bool) if mask is None else jnp.asarray(mask, bool)
    flat = _flat(real)
    return (flat & (jnp.cumsum(flat, axis=1) == 1)).astype(jnp.float32).reshape(real.shape)
