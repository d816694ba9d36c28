"""Segment forms: the pools applied to graphs, whose nodes are selected by a segment index.

``Segments`` groups nodes into sets and offers the reductions a pool's ``segment`` method
builds on (sums, counts, maxima with ``gmp``'s tie rule, a stable log-mean-exp), with the
conventions of ``gapjax.pooling.functions``: float32 accumulation, dropped (masked or
out-of-range) nodes never matter, an empty set pools to zeros with finite gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gapjax.pooling.functions import _finite_min

Array = jax.Array


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

    def first(self) -> Array:
        """``[S, C]``: each set's first real node (the lowest index); 0 for an empty set."""
        count = self.x.shape[0]
        if count == 0:
            return jnp.zeros((self.num_segments, self.x.shape[1]), jnp.float32)
        index = jnp.where(self.real, jnp.arange(count), count)
        first = jax.ops.segment_min(index, self.ids, self.num_segments)
        return jnp.where(self.counts > 0, self.values[jnp.clip(first, 0, count - 1)], 0.0)

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
