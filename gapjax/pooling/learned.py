"""Learned readouts of sets and graphs, on the one pool registry (PyG's learned aggregations).

    name             what it learns                                              width
    set2set          an LSTM that queries the set by content attention, T steps   2C
    deepsets         rho(sum_i phi(x_i)): local and global MLPs                   features
    set_transformer  SAB encoders, PMA with learned seeds, SAB decoders           seeds C | C
    gmt              Graph Multiset Transformer: PMA to k seeds, SABs, PMA to one  C

Each is a ``POOLS`` member, so it works on images ``[B, H, W, C]``, masked padded sets
``[B, N, C]`` + ``mask [B, N]`` and graph segments (``Pool.segment``). The graph forms need
no padded batch: set2set and deepsets use ``jax.ops.segment_*``; the attention readouts
let every node attend to the nodes of its own graph through an ``[N, N]`` same-graph mask
and the seeds of graph ``g`` attend to graph ``g``'s nodes through an ``[G, N]`` mask.

Parameters follow PyG's modules one to one (tests/test_readouts_pyg.py ports PyG's random
weights into these variables and compares to 1e-5): Dense kernels are PyTorch's weights
transposed; an LSTM cell's ``ih`` / ``hh`` kernels hold PyTorch's gates in its order
(input, forget, cell, output); a multihead attention block's ``query`` / ``key`` /
``value`` are the three row blocks of PyTorch's ``in_proj_weight`` and ``out`` its
``out_proj``. Initialisers follow PyTorch's defaults for the same layers (deepsets' MLPs,
which PyG leaves to the user, start from Flax's defaults).

Conventions of the pool family hold: attention softmaxes and sums accumulate in float32,
padding never reaches a result or a gradient (it is zeroed before any layer and masked as
a key), and a set without real positions reads out zeros with finite gradients. PyG gives
such a set a constant instead (the LSTM state, ``global_nn(0)``, the decoded seeds); see
docs/readouts.md.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gapjax.pooling.base import POOLS, Pool, make_pool
from gapjax.pooling.functions import (
    as_sets,
    attention_weights,
    real_counts,
    result_dtype,
    zero_masked,
)
from gapjax.pooling.segments import Segments
from gapjax.pooling.statistics import detached_pool

Array = jax.Array

#: LayerNorm epsilon of PyTorch's ``LayerNorm`` (the set transformers' norms).
TORCH_LAYERNORM_EPSILON = 1e-5


def symmetric_uniform(bound: float):
    """Initialiser ``U(-bound, bound)``: PyTorch's default for Linear / LSTM weights."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def torch_linear(features: int, fan_in: int, dtype: Any, name: str,
                 bias_init: Any = None) -> nn.Dense:
    """A Dense initialised as ``torch.nn.Linear``: kernel and bias ``U(+-1/sqrt(fan_in))``."""
    bound = fan_in**-0.5
    return nn.Dense(features, dtype=dtype, name=name, kernel_init=symmetric_uniform(bound),
                    bias_init=bias_init or symmetric_uniform(bound))


def _check_count(pool_name: str, field: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{pool_name}: {field}={value!r} is not valid; it must be an "
                         f"integer >= {minimum}")
    return value


def _empty_to_zeros(pooled: Array, counts: Array, like: Array) -> Array:
    """Rows of sets without real positions set to 0; the result in ``like``'s pool dtype."""
    return jnp.where(counts > 0, pooled.astype(jnp.float32), 0.0).astype(result_dtype(like))


# --------------------------------------------------------------------------------------
# set2set
# --------------------------------------------------------------------------------------


class LSTMCell(nn.Module):
    """One LSTM layer step in PyTorch's layout: ``(inputs [B, I], (h, c) [B, H]) ->
    (h', (h', c'))``, gates ``i, f, g, o`` in that order along the kernels' output axis
    (``ih``: PyTorch's ``weight_ih`` transposed, ``hh``: ``weight_hh`` transposed). The
    hidden width is the carry's."""

    dtype: Any = None

    @nn.compact
    def __call__(self, inputs: Array, carry: tuple[Array, Array]) -> tuple[Array, Any]:
        h, c = carry
        hidden = h.shape[-1]
        init = symmetric_uniform(hidden**-0.5)  # PyTorch's LSTM init, biases included
        gates = (nn.Dense(4 * hidden, dtype=self.dtype, kernel_init=init, bias_init=init,
                          name="ih")(inputs)
                 + nn.Dense(4 * hidden, dtype=self.dtype, kernel_init=init, bias_init=init,
                            name="hh")(h)).astype(jnp.float32)
        i, f, g, o = jnp.split(gates, 4, axis=-1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return h, (h, c)


@POOLS.register("set2set")
class Set2SetPool(Pool):
    """Set2Set (Vinyals et al., 2016; PyG's ``Set2Set``): ``[B, *S, C] -> [B, 2C]``.

    ``steps`` times: ``q = LSTM(q*)``, ``a_i = softmax_i(x_i . q)``, ``r = sum_i a_i x_i``,
    ``q* = [q, r]``; the output is the last ``q*``. Not a weighted sum of the inputs
    (``q`` is in it), so ``weighting`` is None.

    Attributes:
      steps: processing steps ``T`` (PyG's ``processing_steps``).
      num_layers: stacked LSTM layers (PyG's LSTM ``num_layers``); submodules ``cells_0``, ...
      dtype: compute dtype of the LSTM; attention and sums accumulate in float32.
    """

    steps: int = 3
    num_layers: int = 1
    dtype: Any = None

    def setup(self):
        _check_count("set2set", "steps", self.steps, 1)
        _check_count("set2set", "num_layers", self.num_layers, 1)
        self.cells = [LSTMCell(self.dtype) for _ in range(self.num_layers)]

    def output_width(self, channels: int) -> int:
        return 2 * channels

    def _process(self, attend, rows: int, channels: int) -> Array:
        """The LSTM loop, ``attend(q [rows, C]) -> r [rows, C]`` reading the sets."""
        zeros = jnp.zeros((rows, channels), jnp.float32)
        carries = [(zeros, zeros)] * self.num_layers
        q_star = jnp.zeros((rows, 2 * channels), jnp.float32)
        for _ in range(self.steps):  # a few static steps, unrolled
            q = q_star
            for layer, cell in enumerate(self.cells):
                q, carries[layer] = cell(q, carries[layer])
            q_star = jnp.concatenate([q, attend(q)], axis=-1)
        return q_star

    def __call__(self, x: Array, mask: Array | None = None) -> Array:
        sets, flat_mask = as_sets(x, mask)
        values = zero_masked(sets, flat_mask).astype(jnp.float32)

        def attend(q):
            weights = attention_weights(jnp.einsum("bnc,bc->bn", values, q), flat_mask)
            return jnp.einsum("bn,bnc->bc", weights, values)

        out = self._process(attend, sets.shape[0], sets.shape[-1])
        return _empty_to_zeros(out, real_counts(sets, flat_mask), sets)

    def segment(self, x, segment_ids, num_segments, mask=None):
        sets = Segments(x, segment_ids, num_segments, mask)
        real = sets.real[:, None]

        def attend(q):
            scores = jnp.where(real, (sets.values * sets.gather(q)).sum(-1, keepdims=True), 0.0)
            peak = jax.lax.stop_gradient(sets.max(scores))
            exps = jnp.where(real, jnp.exp(scores - sets.gather(peak)), 0.0)
            total = sets.gather(sets.sum(exps))
            return sets.sum(exps / jnp.where(total > 0, total, 1.0) * sets.values)

        out = self._process(attend, num_segments, sets.values.shape[-1])
        return _empty_to_zeros(out, sets.counts, sets.x)


# --------------------------------------------------------------------------------------
# deepsets
# --------------------------------------------------------------------------------------


class MLP(nn.Module):
    """``layers`` Dense layers with ReLU between them (and after the last when
    ``activate_last``): ``[..., I] -> [..., out or I]``, hidden width ``hidden or I``;
    submodules ``dense0``, ``dense1``, ... ``layers = 0`` is the identity."""

    layers: int
    hidden: int | None = None
    out: int | None = None
    activate_last: bool = False
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        width = x.shape[-1]
        for index in range(self.layers):
            last = index == self.layers - 1
            features = (self.out or width) if last else (self.hidden or width)
            x = nn.Dense(features, dtype=self.dtype, name=f"dense{index}")(x)
            if not last or self.activate_last:
                x = nn.relu(x)
        return x


@POOLS.register("deepsets")
class DeepSetsPool(Pool):
    """Deep Sets (Zaheer et al., 2017; PyG's ``DeepSetsAggregation``):
    ``rho(aggregate_i phi(x_i))``: ``[B, *S, C] -> [B, features or C]``.

    ``phi`` (``local_nn``): ``local_layers`` Dense layers of width ``hidden``, ReLU after each
    (so the summed features are non-negative, as in the paper's sum decomposition);
    ``rho`` (``global_nn``): ``global_layers`` Dense layers, ReLU between them, the last of
    width ``features``. PyG takes both networks from the user; these are its common choice.

    Attributes:
      hidden: width of ``phi`` and of ``rho``'s hidden layers (default: ``C``).
      features: output width (default: the aggregate's width, ``hidden`` for a sum).
      local_layers / global_layers: depths of ``phi`` / ``rho`` (0: identity).
      aggregate: the ``POOLS`` name that reduces ``phi``'s outputs (PyG: ``"sum"``).
      dtype: compute dtype of the MLPs.
    """

    hidden: int | None = None
    features: int | None = None
    local_layers: int = 2
    global_layers: int = 2
    aggregate: str = "sum"
    dtype: Any = None

    def setup(self):
        _check_count("deepsets", "local_layers", self.local_layers, 0)
        _check_count("deepsets", "global_layers", self.global_layers, 0)
        if self.features is not None and not self.global_layers:
            raise ValueError(f"deepsets: features={self.features!r} needs global_layers >= 1 "
                             f"(rho's last layer has that width); got global_layers=0")
        self.local_nn = MLP(self.local_layers, self.hidden, self.hidden, activate_last=True,
                            dtype=self.dtype)
        self.reduce = make_pool(self.aggregate, dtype=self.dtype)
        self.global_nn = MLP(self.global_layers, self.hidden, self.features, dtype=self.dtype)

    def output_width(self, channels: int) -> int:
        if self.features and self.global_layers:
            return self.features
        width = (self.hidden or channels) if self.local_layers else channels
        return detached_pool(self.aggregate, {}).output_width(width)

    def __call__(self, x: Array, mask: Array | None = None) -> Array:
        sets, flat_mask = as_sets(x, mask)
        # Zeroed first: a non-finite pad through phi would turn the gradient of phi's
        # weights into NaN even though the aggregate masks phi's output there.
        local = self.local_nn(zero_masked(sets, flat_mask))
        out = self.global_nn(self.reduce(local, flat_mask))
        return _empty_to_zeros(out, real_counts(sets, flat_mask), sets)

    def segment(self, x, segment_ids, num_segments, mask=None):
        sets = Segments(x, segment_ids, num_segments, mask)
        local = self.local_nn(sets.values if self.dtype is None else
                              sets.values.astype(self.dtype))
        out = self.global_nn(self.reduce.segment(local, sets.ids, num_segments, sets.real))
        return _empty_to_zeros(out, sets.counts, sets.x)


# --------------------------------------------------------------------------------------
# Set Transformer blocks (Lee et al., 2019) and the two readouts built from them
# --------------------------------------------------------------------------------------


def _torch_in_proj_init(channels: int):
    """PyTorch's ``MultiheadAttention`` in-projection init: Xavier-uniform over the stacked
    ``[3C, C]`` matrix, i.e. ``U(+-sqrt(6 / 4C))`` for each of query, key and value."""
    return symmetric_uniform((6.0 / (4 * channels)) ** 0.5)


class MultiheadAttentionBlock(nn.Module):
    """MAB (PyG's ``MultiheadAttentionBlock``): ``queries [B, M, C]`` attend to ``keys
    [B or 1, N, C]`` (one key set shared by every row when its batch is 1):

        h   = queries + Multihead(queries, keys, keys)    (then LayerNorm ``norm1``)
        out = h + relu(lin(h))                            (then LayerNorm ``norm2``)

    ``key_mask [B, M or 1, N]`` (True = may attend) masks keys per query; a query without
    any key attends to nothing (a zero attention output, as PyTorch's SDPA gives).
    ``query_mask [B, M]`` zeroes the attention output of padded queries (PyG's
    ``x_mask``). Heads split the channels in contiguous blocks, as PyTorch's.
    """

    heads: int = 1
    layer_norm: bool = False
    dtype: Any = None

    @nn.compact
    def __call__(self, queries: Array, keys: Array, key_mask: Array | None = None,
                 query_mask: Array | None = None) -> Array:
        batch, count, channels = queries.shape
        if self.heads < 1 or channels % self.heads:
            raise ValueError(f"set attention: channels={channels} must be divisible by "
                             f"heads={self.heads}; set pool_kwargs heads to a divisor of "
                             f"{channels}")
        head_dim = channels // self.heads
        projection = {"kernel_init": _torch_in_proj_init(channels),
                      "bias_init": nn.initializers.zeros, "dtype": self.dtype}
        q = nn.Dense(channels, name="query", **projection)(queries)
        k = nn.Dense(channels, name="key", **projection)(keys)
        v = nn.Dense(channels, name="value", **projection)(keys)
        q = q.reshape(batch, count, self.heads, head_dim).astype(jnp.float32) * head_dim**-0.5
        k = k.reshape(*k.shape[:2], self.heads, head_dim).astype(jnp.float32)
        v = v.reshape(*v.shape[:2], self.heads, head_dim).astype(jnp.float32)
        shared = keys.shape[0] == 1 and batch != 1
        scores = (jnp.einsum("bmhd,nhd->bhmn", q, k[0]) if shared
                  else jnp.einsum("bmhd,bnhd->bhmn", q, k))
        mask = None
        if key_mask is not None:
            mask = jnp.broadcast_to(key_mask[:, None], scores.shape).reshape(-1, scores.shape[-1])
        weights = attention_weights(scores.reshape(-1, scores.shape[-1]), mask)
        weights = weights.reshape(scores.shape)
        attended = (jnp.einsum("bhmn,nhd->bmhd", weights, v[0]) if shared
                    else jnp.einsum("bhmn,bnhd->bmhd", weights, v))
        out = nn.Dense(channels, dtype=self.dtype, name="out",
                       kernel_init=symmetric_uniform(channels**-0.5),
                       bias_init=nn.initializers.zeros)(attended.reshape(batch, count, channels))
        if query_mask is not None:
            out = jnp.where(query_mask[..., None], out, jnp.zeros((), out.dtype))
        out = out + queries
        if self.layer_norm:
            out = nn.LayerNorm(TORCH_LAYERNORM_EPSILON, dtype=self.dtype, name="norm1")(out)
        out = out + nn.relu(torch_linear(channels, channels, self.dtype, "lin")(out))
        if self.layer_norm:
            out = nn.LayerNorm(TORCH_LAYERNORM_EPSILON, dtype=self.dtype, name="norm2")(out)
        return out


class PoolingByMultiheadAttention(nn.Module):
    """PMA (PyG's ``PoolingByMultiheadAttention``): ``seeds`` learned vectors attend to
    ``relu(lin(x))``: ``keys [B or 1, N, C]``, ``key_mask [rows, 1, N]`` ->
    ``[rows, seeds, C]``. Parameters ``seed [seeds, C]``, ``lin``, ``mab``."""

    seeds: int = 1
    heads: int = 1
    layer_norm: bool = False
    dtype: Any = None

    @nn.compact
    def __call__(self, keys: Array, key_mask: Array | None, rows: int) -> Array:
        channels = keys.shape[-1]
        keys = nn.relu(torch_linear(channels, channels, self.dtype, "lin")(keys))
        # PyTorch's Xavier-uniform of a [1, seeds, C] tensor: fans seeds * C and C.
        bound = (6.0 / ((self.seeds + 1) * channels)) ** 0.5
        seed = self.param("seed", symmetric_uniform(bound), (self.seeds, channels), jnp.float32)
        queries = jnp.broadcast_to(seed.astype(keys.dtype), (rows, self.seeds, channels))
        return MultiheadAttentionBlock(self.heads, self.layer_norm, self.dtype,
                                       name="mab")(queries, keys, key_mask)


def _same_graph_mask(sets: Segments) -> Array:
    """``[1, N, N]``: node ``j`` is a key of node ``i`` when both are real and in one graph."""
    return (sets.real[:, None] & sets.real[None, :]
            & (sets.ids[:, None] == sets.ids[None, :]))[None]


def _membership(sets: Segments) -> Array:
    """``[S, 1, N]``: node ``j`` is a key of the seeds of graph ``s`` when it is real and in
    ``s``."""
    member = sets.real[None, :] & (sets.ids[None, :] == jnp.arange(sets.num_segments)[:, None])
    return member[:, None, :]


def _set_inputs(x: Array, mask: Array | None, dtype: Any) -> tuple[Array, Array | None, Array]:
    """``(sets [B, N, C] zero-padded in the compute dtype, mask [B, N] | None, counts)``."""
    sets, flat_mask = as_sets(x, mask)
    values = zero_masked(sets, flat_mask)
    return values.astype(dtype or values.dtype), flat_mask, real_counts(sets, flat_mask)


@POOLS.register("set_transformer")
class SetTransformerPool(Pool):
    """Set Transformer readout (Lee et al., 2019; PyG's ``SetTransformerAggregation``):
    ``encoder_blocks`` SABs over the set, a PMA with ``seeds`` learned seeds, then
    ``decoder_blocks`` SABs over the seeds: ``[B, *S, C] -> [B, seeds * C]`` (``concat``)
    or ``[B, C]`` (the seeds' mean).

    Attributes (PyG's names in brackets):
      seeds: seed vectors of the PMA [``num_seed_points``], default 1.
      encoder_blocks / decoder_blocks: SABs before / after it [``num_encoder_blocks`` /
        ``num_decoder_blocks``], default 1 each.
      heads: attention heads (must divide ``C``), default 1.
      concat: flatten the seeds (True) or average them.
      layer_norm: LayerNorms in every block (PyG's default False).
      dtype: compute dtype; attention softmaxes accumulate in float32.
    PyG's attention ``dropout`` is not offered: pools are called without a training flag.
    """

    seeds: int = 1
    encoder_blocks: int = 1
    decoder_blocks: int = 1
    heads: int = 1
    concat: bool = True
    layer_norm: bool = False
    dtype: Any = None

    def setup(self):
        _check_count("set_transformer", "seeds", self.seeds, 1)
        _check_count("set_transformer", "encoder_blocks", self.encoder_blocks, 0)
        _check_count("set_transformer", "decoder_blocks", self.decoder_blocks, 0)
        block = {"heads": self.heads, "layer_norm": self.layer_norm, "dtype": self.dtype}
        self.encoders = [MultiheadAttentionBlock(**block) for _ in range(self.encoder_blocks)]
        self.pma = PoolingByMultiheadAttention(self.seeds, **block)
        self.decoders = [MultiheadAttentionBlock(**block) for _ in range(self.decoder_blocks)]

    def output_width(self, channels: int) -> int:
        return self.seeds * channels if self.concat else channels

    def _readout(self, seeds: Array, counts: Array, like: Array) -> Array:
        for decoder in self.decoders:
            seeds = decoder(seeds, seeds)
        rows = seeds.shape[0]
        out = seeds.reshape(rows, -1) if self.concat else seeds.astype(jnp.float32).mean(axis=1)
        return _empty_to_zeros(out, counts, like)

    def __call__(self, x: Array, mask: Array | None = None) -> Array:
        h, flat_mask, counts = _set_inputs(x, mask, self.dtype)
        key_mask = None if flat_mask is None else flat_mask[:, None, :]
        for encoder in self.encoders:
            h = encoder(h, h, key_mask, flat_mask)
        return self._readout(self.pma(h, key_mask, h.shape[0]), counts, jnp.asarray(x))

    def segment(self, x, segment_ids, num_segments, mask=None):
        sets = Segments(x, segment_ids, num_segments, mask)
        h = sets.values.astype(self.dtype or sets.x.dtype)[None]  # all nodes as one set
        same_graph = _same_graph_mask(sets) if self.encoders else None
        for encoder in self.encoders:
            h = encoder(h, h, same_graph, sets.real[None])
        seeds = self.pma(h, _membership(sets), num_segments)
        return self._readout(seeds, sets.counts, sets.x)


@POOLS.register("gmt")
class GraphMultisetTransformerPool(Pool):
    """Graph Multiset Transformer readout (Baek et al., 2021), as PyG 2.8's
    ``GraphMultisetTransformer``: a PMA to ``k`` seeds over the nodes, ``encoder_blocks``
    SABs among the seeds, a PMA to one seed: ``[B, *S, C] -> [B, C]``.

    (PyG 2.8's version works on node features only: the paper's GNN-based keys and
    values of the first pooling block are not part of it.)

    Attributes (PyG's names in brackets):
      k: seeds of the first PMA, default 4.
      encoder_blocks: SABs between the two PMAs [``num_encoder_blocks``], default 1.
      heads: attention heads (must divide ``C``), default 1.
      layer_norm: LayerNorms in every block (PyG's default False).
      dtype: compute dtype; attention softmaxes accumulate in float32.
    """

    k: int = 4
    encoder_blocks: int = 1
    heads: int = 1
    layer_norm: bool = False
    dtype: Any = None

    def setup(self):
        _check_count("gmt", "k", self.k, 1)
        _check_count("gmt", "encoder_blocks", self.encoder_blocks, 0)
        block = {"heads": self.heads, "layer_norm": self.layer_norm, "dtype": self.dtype}
        self.pma1 = PoolingByMultiheadAttention(self.k, **block)
        self.encoders = [MultiheadAttentionBlock(**block) for _ in range(self.encoder_blocks)]
        self.pma2 = PoolingByMultiheadAttention(1, **block)

    def _readout(self, seeds: Array, counts: Array, like: Array) -> Array:
        for encoder in self.encoders:
            seeds = encoder(seeds, seeds)
        out = self.pma2(seeds, None, seeds.shape[0])[:, 0]
        return _empty_to_zeros(out, counts, like)

    def __call__(self, x: Array, mask: Array | None = None) -> Array:
        h, flat_mask, counts = _set_inputs(x, mask, self.dtype)
        key_mask = None if flat_mask is None else flat_mask[:, None, :]
        return self._readout(self.pma1(h, key_mask, h.shape[0]), counts, jnp.asarray(x))

    def segment(self, x, segment_ids, num_segments, mask=None):
        sets = Segments(x, segment_ids, num_segments, mask)
        h = sets.values.astype(self.dtype or sets.x.dtype)[None]
        return self._readout(self.pma1(h, _membership(sets), num_segments), sets.counts, sets.x)


__all__ = [
    "MLP",
    "TORCH_LAYERNORM_EPSILON",
    "DeepSetsPool",
    "GraphMultisetTransformerPool",
    "LSTMCell",
    "MultiheadAttentionBlock",
    "PoolingByMultiheadAttention",
    "Set2SetPool",
    "SetTransformerPool",
    "symmetric_uniform",
    "torch_linear",
]
