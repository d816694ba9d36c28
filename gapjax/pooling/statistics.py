"""Readouts the field uses, parameter-free or lightly parametrised, on the one pool registry.

Each is a ``POOLS`` member, so it works on images ``[B, H, W, C]``, masked padded sets
``[B, N, C]`` + ``mask [B, N]`` and graph segments (``Pool.segment``, written with
``jax.ops.segment_*`` or a segmented sort, never a dense scatter):

    name      formula (over the real positions i = 1..n of a set, per channel)   width
    std       sqrt(mean_i (x_i - mean x)^2)                                        C
    var       mean_i (x_i - mean x)^2                                              C
    min       min_i x_i                                                            C
    median    the lower median: x_(floor((n - 1) / 2)) of the sorted values        C
    softmax   sum_i softmax_i(t x_i) x_i (t scalar or per channel; learnable)      C
    vpa       sum_i x_i / sqrt(n)  (variance preserving)                           C
    sort      the k positions with the largest last channel, sorted descending,
              zero rows past n, flattened                                          k C
    multi     [pool_1(x), pool_2(x), ...]: any registered pools, concatenated      sum
    pna       PNA: aggregators (mean, min, max, std) times degree scalers           A S C

They follow the conventions of ``gapjax.pooling``: float32 accumulation (results in the
input's dtype), masked positions never reach a result or a gradient whatever they hold
(inf included), and a set without real positions pools to zeros with finite gradients.
``min`` and ``median`` give their whole gradient to one position per channel (the first
minimal position; the median's position in a stable sort), like ``gmp``.

Exact contributions. ``min`` and ``median`` (a one-hot per channel), ``softmax`` (the
softmax weights of each channel) and ``vpa`` (``1 / sqrt(n)`` per position) are weighted
sums ``sum_i w_i x_i`` with weights fixed given ``x``, and declare it (``weighting``), so
their class maps split exactly into per-position contributions.

PyG (``torch_geometric.nn.aggr``) equivalents and differences are tabled in
docs/readouts.md; tests/test_readouts_pyg.py checks each against PyG.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gapjax.pooling.base import POOLS, Pool, make_pool, pool
from gapjax.pooling.functions import (
    as_sets,
    attention_weights,
    channel_parameter,
    check_positive,
    gmp,
    real_counts,
    result_dtype,
    zero_masked,
)
from gapjax.pooling.segments import Segments
from gapjax.registry import UnknownNameError

Array = jax.Array

#: PNA's degree scalers (Corso et al., 2020; PyG's ``DegreeScalerAggregation``).
SCALERS = ("identity", "amplification", "attenuation", "linear", "inverse_linear")


# --------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------


def _counts_at_least_one(sets: Array, mask: Array | None) -> Array:
    """Real positions per row ``[B, 1]`` float32, at least 1 (a divisor)."""
    return jnp.maximum(real_counts(sets, mask), 1.0)


def _safe_sqrt(value: Array) -> Array:
    """``sqrt`` with a zero, finite gradient at 0 (the std of one position or a constant
    set), where ``sqrt``'s own derivative is infinite."""
    positive = value > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, value, 1.0)), 0.0)


def _unsigned_zero(values: Array) -> Array:
    """``-0.0`` as ``0.0``: a sort key must not order two equal values."""
    return jnp.where(values == 0, jnp.zeros((), values.dtype), values)


def _one_hot_positions(index: Array, count: int, real: Array) -> Array:
    """``[B, N, C]`` float32 one-hot along axis 1 at ``index [B, C]``, zero where the row
    has no real position (``real [B, 1, 1]`` or ``[B, N, C]`` boolean)."""
    positions = jnp.arange(count, dtype=jnp.int32)[None, :, None]
    return ((positions == index[:, None, :]) & real).astype(jnp.float32)


def _segment_starts(counts: Array) -> Array:
    """First row of each segment ``[S]`` int32 in a node order sorted by segment."""
    counts = counts[:, 0].astype(jnp.int32)
    return jnp.cumsum(counts) - counts


def _names(field: str, value: Any, choices: Sequence[str] | None = None) -> tuple[str, ...]:
    """A non-empty tuple of names from a tuple / list or a comma-separated string (the form
    a command-line override gives); checked against ``choices`` (default: ``POOLS``)."""
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, Sequence) or not value or not all(
            isinstance(name, str) for name in value):
        raise ValueError(f"{field}={value!r} is not valid; give one or more names as a tuple "
                         f"or a comma-separated string")
    for name in value:
        if choices is None:
            try:
                POOLS.canonical(name)
            except UnknownNameError as error:  # the registry's line, naming the field
                raise UnknownNameError(f"{field}: {error}") from None
        elif name not in choices:
            raise ValueError(f"{field}: {name!r} is not valid; choose from: "
                             + ", ".join(repr(choice) for choice in choices))
    return tuple(value)


def detached_pool(name: str, options: Any) -> Pool:
    """The pool ``name`` with ``options``, built outside any parent module: what a module
    method may build to ask a member's ``output_width`` (Linen allows submodules only in
    ``setup`` or a compact method). Options are checked as ``make_pool`` checks them."""
    pool_class = POOLS.get(name)
    options = dict(options or {})
    valid = sorted(field.name for field in dataclasses.fields(pool_class)
                   if field.name not in ("parent", "name"))
    for key, value in options.items():
        if key not in valid:
            raise ValueError(f"pool {name!r} has no option {key!r} (got {key}={value!r}); "
                             f"valid options: {', '.join(valid) or 'none'}")
    return pool_class(parent=None, **options)


def _member_specs(field: str, names: Any, options: Any) -> list[tuple[str, dict[str, Any]]]:
    """``(name, options)`` per member pool; ``options`` is None, one mapping per name (a
    sequence aligned with ``names``) or a mapping from name to options."""
    names = _names(field, names)
    if options is None:
        return [(name, {}) for name in names]
    if hasattr(options, "items"):
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise ValueError(f"{field}_kwargs names pools {unknown} that are not among "
                             f"{field}={names!r}")
        return [(name, dict(options.get(name) or {})) for name in names]
    if isinstance(options, Sequence) and len(options) == len(names):
        return [(name, dict(option or {})) for name, option in zip(names, options)]
    raise ValueError(f"{field}_kwargs={options!r} is not valid; give one mapping per pool "
                     f"({len(names)}) or a mapping from pool name to its options")


# --------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------


def _variance(sets: Array, mask: Array | None) -> Array:
    """Two-pass population variance of ``sets [B, N, C]`` over real positions, float32
    ``[B, C]`` (0 for a row without any): no cancellation, never negative."""
    values = zero_masked(sets, mask).astype(jnp.float32)
    counts = _counts_at_least_one(sets, mask)
    mean = values.sum(axis=1) / counts
    deviations = values - mean[:, None, :]
    if mask is not None:
        deviations = jnp.where(mask[..., None], deviations, 0.0)
    return jnp.square(deviations).sum(axis=1) / counts


def var(x: Array, mask: Array | None = None) -> Array:
    """Variance pooling ``mean_i (x_i - mean x)^2`` (population, as PyG's
    ``VarAggregation``): ``[B, *S, C] -> [B, C]``; 0 for one position or none."""
    sets, mask = as_sets(x, mask)
    return _variance(sets, mask).astype(result_dtype(sets))


def std(x: Array, mask: Array | None = None) -> Array:
    """Standard-deviation pooling ``sqrt(var)``: ``[B, *S, C] -> [B, C]``.

    Exactly 0 for a single position (or a constant set up to rounding), with a zero, finite
    gradient there. PyG's ``StdAggregation`` clamps the variance at 1e-5 and returns 0 for
    any std below ``sqrt(1e-5)``; this one is exact down to zero.
    """
    sets, mask = as_sets(x, mask)
    return _safe_sqrt(_variance(sets, mask)).astype(result_dtype(sets))


def gmin(x: Array, mask: Array | None = None) -> Array:
    """Global min pooling (``min``): ``[B, *S, C] -> [B, C]``, ``-gmp(-x)``.

    The gradient is one-hot at the first minimal position of each channel (``gmp``'s tie
    rule); a row without real positions pools to 0.
    """
    return -gmp(-jnp.asarray(x), mask)


def _min_weights(x: Array, mask: Array | None) -> Array:
    """``min``'s weights ``[B, *S, C]``: one-hot at the first minimal real position."""
    sets, flat_mask = as_sets(x, mask)
    smallest = gmin(sets, flat_mask)
    hit = sets == smallest[:, None, :]
    if flat_mask is not None:
        hit = hit & flat_mask[..., None]
    first = jnp.argmax(hit, axis=1)  # the first True; rows without a hit are zeroed below
    weights = _one_hot_positions(first, sets.shape[1], hit.any(axis=1, keepdims=True))
    return weights.reshape(jnp.shape(x))


def _median_index(sets: Array, mask: Array | None) -> Array:
    """Position ``[B, C]`` of each channel's lower median among the real positions of
    ``sets [B, N, C]`` (N > 0): rank ``(n - 1) // 2`` in a stable sort, so of tied values
    the earlier position ranks first."""
    batch, _, channels = sets.shape
    values = jax.lax.stop_gradient(zero_masked(sets, mask))
    padding = jnp.zeros(sets.shape, jnp.int32) if mask is None else jnp.broadcast_to(
        (~mask)[..., None], sets.shape).astype(jnp.int32)
    positions = jax.lax.broadcasted_iota(jnp.int32, sets.shape, 1)
    # Sorted by (padding last, value): the real values come first in ascending order.
    _, _, order = jax.lax.sort((padding, _unsigned_zero(values), positions), dimension=1,
                               is_stable=True, num_keys=2)
    counts = real_counts(sets, mask).astype(jnp.int32)  # [B, 1]
    rank = jnp.maximum(counts - 1, 0) // 2
    return jnp.take_along_axis(order, jnp.broadcast_to(rank[:, :, None], (batch, 1, channels)),
                               axis=1)[:, 0]


def median(x: Array, mask: Array | None = None) -> Array:
    """Median pooling: ``[B, *S, C] -> [B, C]``, per channel the lower median of the real
    positions (the value of rank ``floor((n - 1) / 2)``, PyG's ``MedianAggregation``).

    The gradient is one-hot at the median's position; a row without real positions pools
    to 0.
    """
    sets, mask = as_sets(x, mask)
    dtype = result_dtype(sets)
    if sets.shape[1] == 0:
        return jnp.zeros((sets.shape[0], sets.shape[2]), dtype)
    index = _median_index(sets, mask)
    picked = jnp.take_along_axis(zero_masked(sets, mask), index[:, None, :], axis=1)[:, 0]
    return jnp.where(real_counts(sets, mask) > 0, picked, jnp.zeros((), picked.dtype)).astype(dtype)


def _median_weights(x: Array, mask: Array | None) -> Array:
    sets, flat_mask = as_sets(x, mask)
    if sets.shape[1] == 0:
        return jnp.zeros(jnp.shape(x), jnp.float32)
    real = (real_counts(sets, flat_mask) > 0)[:, :, None]
    weights = _one_hot_positions(_median_index(sets, flat_mask), sets.shape[1], real)
    return weights.reshape(jnp.shape(x))


def vpa(x: Array, mask: Array | None = None) -> Array:
    """Variance-preserving aggregation ``sum_i x_i / sqrt(n)`` (Schneckenreiter et al.,
    GNN-VPA, 2024; PyG's ``VariancePreservingAggregation``): ``[B, *S, C] -> [B, C]``.

    For n independent inputs of equal variance the output keeps that variance, between
    the sum (grows like n) and the mean (shrinks like 1/n).
    """
    sets, mask = as_sets(x, mask)
    total = zero_masked(sets, mask).sum(axis=1, dtype=jnp.float32)
    return (total / jnp.sqrt(_counts_at_least_one(sets, mask))).astype(result_dtype(sets))


def _vpa_weights(x: Array, mask: Array | None) -> Array:
    x = jnp.asarray(x)
    real = jnp.ones(x.shape[:-1], bool) if mask is None else jnp.asarray(mask, bool)
    sets, flat_mask = as_sets(x, mask)
    scale = 1.0 / jnp.sqrt(_counts_at_least_one(sets, flat_mask))  # [B, 1]
    return jnp.where(real, scale.reshape((x.shape[0],) + (1,) * (x.ndim - 2)), 0.0)


def _softmax_weights(sets: Array, mask: Array | None, t: Array) -> Array:
    """Per-channel softmax over the real positions of ``t * sets``: ``[B, N, C]`` float32
    summing to one over real positions (zeros for a row without any)."""
    batch, count, channels = sets.shape
    scores = t * zero_masked(sets, mask).astype(jnp.float32)  # [B, N, C]
    # One softmax row per (set, channel): [B * C, N].
    rows = jnp.swapaxes(scores, 1, 2).reshape(batch * channels, count)
    row_mask = None if mask is None else jnp.broadcast_to(
        mask[:, None, :], (batch, channels, count)).reshape(batch * channels, count)
    weights = attention_weights(rows, row_mask).reshape(batch, channels, count)
    return jnp.swapaxes(weights, 1, 2)


def softmax(x: Array, t: Array | float = 1.0, mask: Array | None = None) -> Array:
    """Softmax aggregation ``sum_i softmax_i(t x_i) x_i`` per channel (Li et al., DeeperGCN,
    2020; PyG's ``SoftmaxAggregation``): ``[B, *S, C] -> [B, C]``.

    ``t`` (scalar or per channel ``[C]``, any real) is the inverse temperature: ``t = 0``
    is the mean, ``t -> inf`` the max, ``t -> -inf`` the min. The largest score is
    subtracted first, so nothing overflows.
    """
    sets, mask = as_sets(x, mask)
    t = channel_parameter(t, "t", "softmax", sets.shape[-1])
    weights = _softmax_weights(sets, mask, t)
    pooled = (weights * zero_masked(sets, mask).astype(jnp.float32)).sum(axis=1)
    return pooled.astype(result_dtype(sets))


def _check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"sort: k={k!r} is not valid; it must be an integer >= 1 (the number "
                         f"of positions kept)")
    return int(k)


def sort_pool(x: Array, k: int = 10, mask: Array | None = None) -> Array:
    """SortPool (Zhang et al., DGCNN, 2018; PyG's ``SortAggregation``): ``[B, *S, C] ->
    [B, k * C]``.

    The real positions sorted by their last channel, largest first; the first ``k`` kept
    (zero rows when there are fewer), flattened row by row. Ties keep position order
    (a stable sort), so the pool is permutation invariant up to ties in the last channel.
    """
    k = _check_k(k)
    sets, mask = as_sets(x, mask)
    batch, count, channels = sets.shape
    values = zero_masked(sets, mask)
    kept = min(k, count)
    if kept:
        padding = jnp.zeros((batch, count), jnp.int32) if mask is None else (~mask).astype(
            jnp.int32)
        key = -_unsigned_zero(jax.lax.stop_gradient(values[..., -1]))
        positions = jax.lax.broadcasted_iota(jnp.int32, (batch, count), 1)
        _, _, order = jax.lax.sort((padding, key, positions), dimension=1, is_stable=True,
                                   num_keys=2)
        rows = jnp.take_along_axis(values, order[:, :kept, None], axis=1)  # [B, kept, C]
        slots = jnp.arange(kept)[None, :, None]
        rows = jnp.where(slots < real_counts(sets, mask)[:, :, None], rows,
                         jnp.zeros((), rows.dtype))
    else:
        rows = jnp.zeros((batch, 0, channels), values.dtype)
    rows = jnp.pad(rows, ((0, 0), (0, k - kept), (0, 0)))
    return rows.reshape(batch, k * channels).astype(result_dtype(sets))


def multi(x: Array, pools: Any = ("mean", "max", "std"), pools_kwargs: Any = None,
          mask: Array | None = None) -> Array:
    """Several pools concatenated (PyG's ``MultiAggregation`` with ``mode="cat"``):
    ``[B, *S, C] -> [B, sum of widths]``. ``pools`` are ``POOLS`` names (a tuple or a
    comma-separated string), ``pools_kwargs`` their options (one mapping per pool, or
    ``{name: options}``); each is applied by ``gapjax.pooling.pool`` (a pool with
    parameters at its initial values)."""
    dtype = result_dtype(jnp.asarray(x))
    return jnp.concatenate([pool(name, x, mask, **options).astype(dtype) for name, options
                            in _member_specs("multi: pools", pools, pools_kwargs)], axis=-1)


def degree_scalers(pooled: Array, degree: Array, scalers: Sequence[str],
                   avg_log_degree: Any = None, avg_degree: Any = None) -> Array:
    """PNA's scalers applied to ``pooled [B, W]`` with the degree ``[B, 1]`` of each set,
    concatenated in the order of ``scalers``: ``[B, len(scalers) * W]`` float32.

    ``identity``: 1; ``amplification``: ``log(d + 1) / avg_log_degree``; ``attenuation``:
    ``avg_log_degree / log(max(d, 1) + 1)``; ``linear``: ``d / avg_degree``;
    ``inverse_linear``: ``avg_degree / max(d, 1)`` (PyG's ``DegreeScalerAggregation``).
    """
    pooled = pooled.astype(jnp.float32)
    degree = degree.astype(jnp.float32)
    factors = {
        "identity": lambda: 1.0,
        "amplification": lambda: jnp.log(degree + 1.0) / avg_log_degree,
        "attenuation": lambda: avg_log_degree / jnp.log(jnp.maximum(degree, 1.0) + 1.0),
        "linear": lambda: degree / avg_degree,
        "inverse_linear": lambda: avg_degree / jnp.maximum(degree, 1.0),
    }
    return jnp.concatenate([pooled * factors[name]() for name in scalers], axis=-1)


def _check_degrees(scalers: Sequence[str], avg_log_degree: Any, avg_degree: Any) -> None:
    """The training-set degree statistics the chosen scalers need: given and > 0."""
    needs = {"avg_log_degree": ({"amplification", "attenuation"}, avg_log_degree,
                                "the mean of log(d + 1)"),
             "avg_degree": ({"linear", "inverse_linear"}, avg_degree, "the mean degree d")}
    for field, (users, value, meaning) in needs.items():
        used = sorted(users & set(scalers))
        if not used:
            continue
        if value is None:
            raise ValueError(
                f"pna: {field} is required by the scalers {used}: {meaning} over the training "
                f"set (a readout's degree is its set's node count); "
                f"pna_degree_statistics(histogram) computes it")
        check_positive(f"pna: {field}", value)


def pna(x: Array, avg_log_degree: float | None = None, avg_degree: float | None = None,
        aggregators: Any = ("mean", "min", "max", "std"),
        scalers: Any = ("identity", "amplification", "attenuation"),
        mask: Array | None = None) -> Array:
    """Principal Neighbourhood Aggregation as a readout (Corso et al., 2020; PyG's
    ``DegreeScalerAggregation``): ``[B, *S, C] -> [B, len(scalers) * len(aggregators) * C]``.

    The aggregators' outputs concatenated (``multi``), then scaled by each scaler in turn
    (``degree_scalers``); a set's degree is its number of real positions. The degree
    statistics are the training set's (``pna_degree_statistics``).
    """
    aggregators = _names("pna: aggregators", aggregators)
    scalers = _names("pna: scalers", scalers, SCALERS)
    _check_degrees(scalers, avg_log_degree, avg_degree)
    sets, flat_mask = as_sets(x, mask)
    pooled = multi(x, aggregators, mask=mask)
    scaled = degree_scalers(pooled, real_counts(sets, flat_mask), scalers, avg_log_degree,
                            avg_degree)
    return scaled.astype(result_dtype(sets))


def pna_degree_statistics(histogram: Any) -> dict[str, float]:
    """``{"avg_degree", "avg_log_degree"}`` from a degree histogram, as PyG computes them
    from its ``deg`` argument: ``histogram[d]`` counts the training items of degree ``d``
    (for a readout: the training graphs with ``d`` nodes, ``np.bincount(sizes)``)."""
    histogram = np.asarray(histogram, np.float64)
    if histogram.ndim != 1 or histogram.size == 0 or (histogram < 0).any() or not histogram.sum():
        raise ValueError(f"pna_degree_statistics: histogram must be a non-empty 1-D array of "
                         f"non-negative counts with a positive total; got {histogram!r}")
    degrees = np.arange(histogram.size, dtype=np.float64)
    total = histogram.sum()
    return {"avg_degree": float((degrees * histogram).sum() / total),
            "avg_log_degree": float((np.log(degrees + 1.0) * histogram).sum() / total)}


# --------------------------------------------------------------------------------------
# Linen modules (registered in POOLS)
# --------------------------------------------------------------------------------------


def _weights_result(pooled: Array, weights: Any, return_weights: bool):
    """``pooled``, or ``(pooled, weights())`` when asked (weights computed only then)."""
    return (pooled, weights()) if return_weights else pooled


def _segment_variance(sets: Segments) -> Array:
    deviations = jnp.where(sets.real[:, None], sets.values - sets.gather(sets.mean()), 0.0)
    return sets.sum(jnp.square(deviations)) / jnp.maximum(sets.counts, 1.0)


@POOLS.register("var")
class VarPool(Pool):
    """Variance pooling (``var``): ``[B, *S, C] -> [B, C]``; see ``var``."""

    function: ClassVar = staticmethod(var)

    def __call__(self, x: Array, mask: Array | None = None) -> Array:
        return var(x, mask)

    def segment(self, x, segment_ids, num_segments, mask=None):
        sets = Segments(x, segment_ids, num_segments, mask)
        return _segment_variance(sets).astype(result_dtype(sets.x))


@POOLS.register("std")
class StdPool(Pool):
    """Standard-deviation pooling (``std``): ``[B, *S, C] -> [B, C]``; see ``std``."""

    function: ClassVar = staticmethod(std)

    def __call__(self, x: Array, mask: Array | None = None) -> Array:
        return std(x, mask)

    def segment(self, x, segment_ids, num_segments, mask=None):
        sets = Segments(x, segment_ids, num_segments, mask)
        return _safe_sqrt(_segment_variance(sets)).astype(result_dtype(sets.x))


@POOLS.register("min")
class MinPool(Pool):
    """Global min pooling (``min``): per-channel one-hot weights at the first arg min."""

    weighting: ClassVar[str | None] = "channel"
    function: ClassVar = staticmethod(gmin)

    def __call__(self, x: Array, mask: Array | None = None, return_weights: bool = False):
        return _weights_result(gmin(x, mask), lambda: _min_weights(x, mask), return_weights)

    def segment(self, x, segment_ids, num_segments, mask=None):
        sets = Segments(x, segment_ids, num_segments, mask)
        return (-sets.max(-sets.values)).astype(result_dtype(sets.x))


@POOLS.register("median")
class MedianPool(Pool):
    """Median pooling (``median``, the lower median): per-channel one-hot weights at the
    median's position."""

    weighting: ClassVar[str | None] = "channel"
    function: ClassVar = staticmethod(median)

    def __call__(self, x: Array, mask: Array | None = None, return_weights: bool = False):
        return _weights_result(median(x, mask), lambda: _median_weights(x, mask),
                               return_weights)

    def segment(self, x, segment_ids, num_segments, mask=None):
        sets = Segments(x, segment_ids, num_segments, mask)
        nodes, channels = sets.values.shape
        if nodes == 0:
            return jnp.zeros((num_segments, channels), result_dtype(sets.x))
        # One stable sort of all nodes by (segment, value), dropped nodes last: each
        # segment's values are then a sorted run starting at its offset.
        segment_key = jnp.broadcast_to(jnp.where(sets.real, sets.ids, num_segments)[:, None],
                                       sets.values.shape)
        node_index = jax.lax.broadcasted_iota(jnp.int32, sets.values.shape, 0)
        _, _, order = jax.lax.sort(
            (segment_key, _unsigned_zero(jax.lax.stop_gradient(sets.values)), node_index),
            dimension=0, is_stable=True, num_keys=2)
        counts = sets.counts[:, 0].astype(jnp.int32)
        rank = _segment_starts(sets.counts) + jnp.maximum(counts - 1, 0) // 2
        node = order[jnp.clip(rank, 0, nodes - 1)]  # [S, C]
        picked = jnp.take_along_axis(sets.values, node, axis=0)
        return jnp.where(sets.counts > 0, picked, 0.0).astype(result_dtype(sets.x))


@POOLS.register("vpa")
class VariancePreservingPool(Pool):
    """Variance-preserving aggregation (``vpa``): weight ``1 / sqrt(n)`` at every real
    position."""

    weighting: ClassVar[str | None] = "position"
    function: ClassVar = staticmethod(vpa)

    def __call__(self, x: Array, mask: Array | None = None, return_weights: bool = False):
        return _weights_result(vpa(x, mask), lambda: _vpa_weights(x, mask), return_weights)

    def segment(self, x, segment_ids, num_segments, mask=None):
        sets = Segments(x, segment_ids, num_segments, mask)
        pooled = sets.sum() / jnp.sqrt(jnp.maximum(sets.counts, 1.0))
        return pooled.astype(result_dtype(sets.x))


@POOLS.register("softmax")
class SoftmaxPool(Pool):
    """Softmax aggregation (``softmax``) with inverse temperature ``t``: per-channel weights
    ``softmax_i(t x_i)``.

    Attributes:
      t: the inverse temperature (its initial value when ``learn_t``); any real.
      learn_t: learn ``t`` (parameter ``t``), as PyG's ``learn=True``.
      per_channel: one ``t`` per channel (PyG's ``channels=C``, which needs ``learn``).
    """

    weighting: ClassVar[str | None] = "channel"
    function: ClassVar = staticmethod(softmax)
    t: float = 1.0
    learn_t: bool = False
    per_channel: bool = False

    @nn.compact
    def temperature(self, channels: int) -> Array:
        """``t`` as ``[]`` or ``[C]`` float32."""
        shape = (channels,) if self.per_channel else ()
        if not self.learn_t:
            return jnp.full(shape, self.t, jnp.float32)
        return self.param("t", nn.initializers.constant(self.t), shape, jnp.float32)

    def __call__(self, x: Array, mask: Array | None = None, return_weights: bool = False):
        sets, flat_mask = as_sets(x, mask)
        t = self.temperature(sets.shape[-1])
        weights = _softmax_weights(sets, flat_mask, t)
        pooled = (weights * zero_masked(sets, flat_mask).astype(jnp.float32)).sum(axis=1)
        return _weights_result(pooled.astype(result_dtype(sets)),
                               lambda: weights.reshape(jnp.shape(x)), return_weights)

    def segment(self, x, segment_ids, num_segments, mask=None):
        sets = Segments(x, segment_ids, num_segments, mask)
        scores = jnp.where(sets.real[:, None], self.temperature(sets.values.shape[-1])
                           * sets.values, 0.0)
        peak = jax.lax.stop_gradient(sets.max(scores))
        exps = jnp.where(sets.real[:, None], jnp.exp(scores - sets.gather(peak)), 0.0)
        total = sets.gather(sets.sum(exps))
        weights = exps / jnp.where(total > 0, total, 1.0)
        return sets.sum(weights * sets.values).astype(result_dtype(sets.x))


@POOLS.register("sort")
class SortPool(Pool):
    """SortPool (``sort``): the ``k`` positions with the largest last channel, flattened to
    ``[B, k * C]``; see ``sort_pool``."""

    function: ClassVar = staticmethod(sort_pool)
    k: int = 10

    def output_width(self, channels: int) -> int:
        return _check_k(self.k) * channels

    def __call__(self, x: Array, mask: Array | None = None) -> Array:
        return sort_pool(x, self.k, mask)

    def segment(self, x, segment_ids, num_segments, mask=None):
        k = _check_k(self.k)
        sets = Segments(x, segment_ids, num_segments, mask)
        nodes, channels = sets.values.shape
        dtype = result_dtype(sets.x)
        if nodes == 0:
            return jnp.zeros((num_segments, k * channels), dtype)
        # One stable sort of all nodes by (segment, descending last channel): segment s
        # is then a run of counts[s] rows from its offset, its top k first.
        segment_key = jnp.where(sets.real, sets.ids, num_segments)
        key = -_unsigned_zero(jax.lax.stop_gradient(sets.values[:, -1]))
        _, _, order = jax.lax.sort((segment_key, key, jnp.arange(nodes, dtype=jnp.int32)),
                                   is_stable=True, num_keys=2)
        slots = jnp.arange(k)[None, :]
        rows = order[jnp.clip(_segment_starts(sets.counts)[:, None] + slots, 0, nodes - 1)]
        picked = sets.values[rows]  # [S, k, C]
        picked = jnp.where((slots < sets.counts)[..., None], picked, 0.0)
        return picked.reshape(num_segments, k * channels).astype(dtype)


@POOLS.register("multi")
class MultiPool(Pool):
    """Several pools concatenated (``multi``): ``[B, *S, C] -> [B, sum of their widths]``.

    Attributes:
      pools: ``POOLS`` names (a tuple, or a comma-separated string from the command line),
        e.g. ``("mean", "max", "std")``; any registered pool, learned ones included
        (submodules ``members_0``, ``members_1``, ...).
      pools_kwargs: their options: one mapping per pool, or ``{name: options}``.
      dtype: compute dtype handed to members that take one.
    """

    function: ClassVar = staticmethod(multi)
    pools: Any = ("mean", "max", "std")
    pools_kwargs: Any = None
    dtype: Any = None

    def setup(self):
        self.members = [make_pool(name, dtype=self.dtype, **options)
                        for name, options in _member_specs("multi: pools", self.pools,
                                                           self.pools_kwargs)]

    def output_width(self, channels: int) -> int:
        return sum(detached_pool(name, options).output_width(channels)
                   for name, options in _member_specs("multi: pools", self.pools,
                                                      self.pools_kwargs))

    def __call__(self, x: Array, mask: Array | None = None) -> Array:
        dtype = result_dtype(jnp.asarray(x))
        return jnp.concatenate([member(x, mask).astype(dtype) for member in self.members],
                               axis=-1)

    def segment(self, x, segment_ids, num_segments, mask=None):
        dtype = result_dtype(jnp.asarray(x))
        return jnp.concatenate([member.segment(x, segment_ids, num_segments, mask).astype(dtype)
                                for member in self.members], axis=-1)


@POOLS.register("pna")
class PNAPool(Pool):
    """Principal Neighbourhood Aggregation as a readout (``pna``): every aggregator, scaled
    by every degree scaler, concatenated (scaler-major, as PyG):
    ``[B, *S, C] -> [B, len(scalers) * (sum of aggregator widths)]``.

    A set's degree is its number of real positions (a graph's node count), which is what
    PyG's ``DegreeScalerAggregation`` uses when it reads out whole graphs
    (``index = batch``).

    Attributes:
      aggregators: ``POOLS`` names, default PNA's ``("mean", "min", "max", "std")``.
      scalers: from ``SCALERS``; default ``("identity", "amplification", "attenuation")``.
      avg_log_degree: mean of ``log(d + 1)`` over the training set (required by
        amplification / attenuation); ``pna_degree_statistics`` computes it.
      avg_degree: mean degree over the training set (required by linear /
        inverse_linear).
      train_norm: learn both statistics from their given values (PyG's ``train_norm``).
      dtype: compute dtype handed to aggregators that take one.
    """

    function: ClassVar = staticmethod(pna)
    aggregators: Any = ("mean", "min", "max", "std")
    scalers: Any = ("identity", "amplification", "attenuation")
    avg_log_degree: float | None = None
    avg_degree: float | None = None
    train_norm: bool = False
    dtype: Any = None

    def setup(self):
        self.scaler_names = _names("pna: scalers", self.scalers, SCALERS)
        _check_degrees(self.scaler_names, self.avg_log_degree, self.avg_degree)
        self.aggregate = MultiPool(self.aggregators, dtype=self.dtype)
        self.statistics = {
            field: (self.param(field, nn.initializers.constant(value), (), jnp.float32)
                    if self.train_norm and value is not None else value)
            for field, value in (("avg_log_degree", self.avg_log_degree),
                                 ("avg_degree", self.avg_degree))}

    def output_width(self, channels: int) -> int:
        scalers = _names("pna: scalers", self.scalers, SCALERS)
        aggregate = MultiPool(self.aggregators, parent=None)
        return len(scalers) * aggregate.output_width(channels)

    def _scale(self, pooled: Array, degree: Array, dtype: Any) -> Array:
        return degree_scalers(pooled, degree, self.scaler_names, **self.statistics).astype(dtype)

    def __call__(self, x: Array, mask: Array | None = None) -> Array:
        sets, flat_mask = as_sets(x, mask)
        return self._scale(self.aggregate(x, mask), real_counts(sets, flat_mask),
                           result_dtype(sets))

    def segment(self, x, segment_ids, num_segments, mask=None):
        sets = Segments(x, segment_ids, num_segments, mask)
        return self._scale(self.aggregate.segment(x, segment_ids, num_segments, mask),
                           sets.counts, result_dtype(sets.x))


__all__ = [
    "SCALERS",
    "MedianPool",
    "MinPool",
    "MultiPool",
    "PNAPool",
    "SoftmaxPool",
    "SortPool",
    "StdPool",
    "VarPool",
    "VariancePreservingPool",
    "degree_scalers",
    "detached_pool",
    "gmin",
    "median",
    "multi",
    "pna",
    "pna_degree_statistics",
    "softmax",
    "sort_pool",
    "std",
    "var",
    "vpa",
]
