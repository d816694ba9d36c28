"""Graphs as sets selected by a segment index: readouts, padded batches, message passing.

A batch of graphs is one big disjoint graph. Node ``i`` belongs to graph
``node_graph[i]``; edge ``j`` carries a message from node ``senders[j]`` to node
``receivers[j]``. A graph readout pools each graph's nodes the way
``gapjax.pooling`` pools the positions of an image, and a neighbourhood aggregation is
the same readout applied to the incoming messages of each node. Both are the
``POOLS`` modules' segment forms (``Pool.segment``, ``jax.ops.segment_*`` for the built-in
pools), so they honour the conventions of the pool family: float32
accumulation, padding never changes a result, and an empty segment (a graph with no
nodes, a node with no neighbours) pools to zeros with finite gradients.

Shapes are static: ``batch_graphs`` pads variable-size graphs on the host into fixed
node, edge and graph budgets, so one jitted step serves every batch without recompiling.
Padding nodes and edges are masked and point one past the last real slot (graph index
``graph_budget``, node index ``node_budget``), where ``jax.ops.segment_*`` drops them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from gapjax.pooling import make_pool

Array = jax.Array

# --------------------------------------------------------------------------------------
# Readouts: the pools of the one registry, in their segment form
# --------------------------------------------------------------------------------------


def readout(
    name: str,
    node_features: Array,
    graph_index: Array,
    num_graphs: int,
    mask: Array | None = None,
    **pool_kwargs: Any,
) -> Array:
    """Pools the nodes of each graph: ``[N, C]`` -> ``[num_graphs, width]``.

    Args:
      name: any ``POOLS`` name or alias (``sum``/``gsp``, ``mean``/``gap``, ``max``/``gmp``,
        ``gem``, ``lse``, ``attention``, a fork's pool, ...), applied through its
        ``Pool.segment`` form; pools with parameters use their initial values (a model
        that learns them holds the pool module itself, as ``GIN`` does).
      node_features: ``[N, C]`` node states.
      graph_index: ``[N]`` int, the graph of each node. Indices outside
        ``[0, num_graphs)`` are dropped.
      num_graphs: static number of output rows.
      mask: optional ``[N]`` bool, True for real nodes; masked nodes change nothing.
      **pool_kwargs: the pool's options (``p`` of ``gem``, ``r`` of ``lse``, ...).

    Returns:
      ``[num_graphs, width]`` (``width = pool.output_width(C)``), float32 accumulation; a
      graph without nodes gets zeros, with finite gradients. Equals the dense pool applied
      to each graph's node set.
    """
    module = make_pool(name, **pool_kwargs)
    # One pass: init's output is the readout at the initial parameters.
    pooled, _ = module.init_with_output(jax.random.key(0), node_features, graph_index,
                                        num_graphs, mask, method="segment")
    return pooled


def readout_width(name: str, channels: int, **pool_kwargs: Any) -> int:
    """Output width of ``readout(name, ...)`` for ``channels`` input channels."""
    return make_pool(name, **pool_kwargs).output_width(channels)


# --------------------------------------------------------------------------------------
# Padded batches
# --------------------------------------------------------------------------------------


@flax.struct.dataclass
class GraphBatch:
    """A padded batch of graphs with static shapes (a pytree, usable inside jit).

    Budgets are the array shapes: ``N`` nodes, ``E`` edges, ``G`` graphs.

    Attributes:
      node_features: ``[N, F]`` float vectors, or ``[N]`` int colours (one-hot in models).
      senders: ``[E]`` int32, source node of each directed edge.
      receivers: ``[E]`` int32, target node of each directed edge.
      node_graph: ``[N]`` int32, graph of each node; padding nodes hold ``G``.
      node_mask: ``[N]`` bool, True for real nodes.
      edge_mask: ``[E]`` bool, True for real edges; padding edges hold node index ``N``.
      graph_mask: ``[G]`` bool, True for real graphs.
    """

    node_features: Any
    senders: Any
    receivers: Any
    node_graph: Any
    node_mask: Any
    edge_mask: Any
    graph_mask: Any

    @property
    def node_budget(self) -> int:
        return self.node_mask.shape[-1]

    @property
    def edge_budget(self) -> int:
        return self.edge_mask.shape[-1]

    @property
    def graph_budget(self) -> int:
        return self.graph_mask.shape[-1]

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (the batch keys of the input pipeline)."""
        return {name: getattr(self, name) for name in GRAPH_BATCH_KEYS}

    @classmethod
    def from_dict(cls, batch: Mapping[str, Any]) -> GraphBatch:
        """Builds a batch from a mapping holding at least the ``GRAPH_BATCH_KEYS``."""
        missing = [key for key in GRAPH_BATCH_KEYS if key not in batch]
        if missing:
            raise KeyError(
                f"a graph batch needs the keys {', '.join(GRAPH_BATCH_KEYS)}; missing "
                f"{', '.join(missing)}"
            )
        return cls(**{key: batch[key] for key in GRAPH_BATCH_KEYS})


GRAPH_BATCH_KEYS = (
    "node_features", "senders", "receivers", "node_graph", "node_mask", "edge_mask",
    "graph_mask",
)


def batch_graphs(
    graphs: Sequence[Mapping[str, Any]],
    node_budget: int,
    edge_budget: int,
    graph_budget: int,
) -> GraphBatch:
    """Concatenates variable-size graphs into one padded ``GraphBatch`` (NumPy, on the host).

    Args:
      graphs: each a mapping with ``node_features`` (``[n, F]`` float or ``[n]`` int
        colours; the same kind for all graphs), ``senders`` and ``receivers`` (``[e]``
        int, local node indices in ``[0, n)``).
      node_budget / edge_budget / graph_budget: the static shapes of the batch; fixed
        budgets mean a jitted step compiles once.

    Returns:
      A ``GraphBatch`` of NumPy arrays. Graph ``g`` of the input is row ``g``; padding
      nodes and graphs are masked, padding node features are zeros.
    """
    if len(graphs) > graph_budget:
        raise ValueError(
            f"graph_budget={graph_budget} is smaller than the {len(graphs)} graphs to batch"
        )
    sizes = [len(np.asarray(g["node_features"])) for g in graphs]
    edge_counts = [len(np.asarray(g["senders"])) for g in graphs]
    if sum(sizes) > node_budget:
        raise ValueError(
            f"node_budget={node_budget} is smaller than the {sum(sizes)} nodes of the batch"
        )
    if sum(edge_counts) > edge_budget:
        raise ValueError(
            f"edge_budget={edge_budget} is smaller than the {sum(edge_counts)} edges of the "
            f"batch"
        )
    if graphs:
        sample = np.asarray(graphs[0]["node_features"])
        feature_shape, feature_dtype = sample.shape[1:], sample.dtype
    else:
        feature_shape, feature_dtype = (), np.int32
    if np.issubdtype(feature_dtype, np.integer):
        feature_dtype = np.int32
    elif np.issubdtype(feature_dtype, np.floating):
        feature_dtype = np.float32
    node_features = np.zeros((node_budget, *feature_shape), feature_dtype)
    senders = np.full(edge_budget, node_budget, np.int32)
    receivers = np.full(edge_budget, node_budget, np.int32)
    node_graph = np.full(node_budget, graph_budget, np.int32)
    node_mask = np.zeros(node_budget, bool)
    edge_mask = np.zeros(edge_budget, bool)
    graph_mask = np.zeros(graph_budget, bool)
    node_offset = edge_offset = 0
    for index, (graph, size, count) in enumerate(zip(graphs, sizes, edge_counts)):
        features = np.asarray(graph["node_features"])
        if features.shape[1:] != feature_shape:
            raise ValueError(
                f"graph {index} has node_features of shape {features.shape}; every graph of "
                f"a batch needs per-node shape {feature_shape}"
            )
        local_senders = np.asarray(graph["senders"], np.int64)
        local_receivers = np.asarray(graph["receivers"], np.int64)
        if local_receivers.shape != local_senders.shape:
            raise ValueError(
                f"graph {index} has {local_senders.shape} senders but "
                f"{local_receivers.shape} receivers"
            )
        if count and (min(local_senders.min(), local_receivers.min()) < 0
                      or max(local_senders.max(), local_receivers.max()) >= size):
            raise ValueError(
                f"graph {index} has an edge endpoint outside its {size} nodes [0, {size})"
            )
        nodes = slice(node_offset, node_offset + size)
        edges = slice(edge_offset, edge_offset + count)
        node_features[nodes] = features
        node_graph[nodes] = index
        node_mask[nodes] = True
        senders[edges] = local_senders + node_offset
        receivers[edges] = local_receivers + node_offset
        edge_mask[edges] = True
        graph_mask[index] = True
        node_offset += size
        edge_offset += count
    return GraphBatch(node_features, senders, receivers, node_graph, node_mask, edge_mask,
                      graph_mask)


def unbatch_graphs(batch: GraphBatch) -> list[dict[str, np.ndarray]]:
    """Inverse of ``batch_graphs`` for the real graphs of a batch (host side, NumPy)."""
    arrays = jax.tree_util.tree_map(np.asarray, batch)
    graphs = []
    for index in np.flatnonzero(arrays.graph_mask):
        nodes = np.flatnonzero(arrays.node_mask & (arrays.node_graph == index))
        edges = arrays.edge_mask & np.isin(arrays.receivers, nodes)
        offset = nodes[0] if len(nodes) else 0
        graphs.append({
            "node_features": arrays.node_features[nodes],
            "senders": arrays.senders[edges] - offset,
            "receivers": arrays.receivers[edges] - offset,
        })
    return graphs


# --------------------------------------------------------------------------------------
# Message passing
# --------------------------------------------------------------------------------------


def aggregate_neighbors(
    name: str,
    node_features: Array,
    senders: Array,
    receivers: Array,
    edge_mask: Array | None = None,
    **params: Any,
) -> Array:
    """Pools each node's incoming messages: ``[N, C]`` -> ``[N, C]`` (``catavgmax``: 2C).

    The message on edge ``j`` is ``node_features[senders[j]]``; node ``v`` gets
    ``readout(name)`` of the messages with ``receivers == v``. A node without (real)
    neighbours gets zeros. ``name`` is any ``readout`` name (``sum``, ``mean``, ``max``, ...).

    Args:
      node_features: ``[N, C]``.
      senders / receivers: ``[E]`` int node indices.
      edge_mask: optional ``[E]`` bool, True for real edges.
    """
    num_nodes = node_features.shape[0]
    messages = jnp.take(node_features, senders, axis=0, mode="clip")
    return readout(name, messages, receivers, num_nodes, mask=edge_mask, **params)


def gin_combine(node_features: Array, aggregated: Array, epsilon: Array | float) -> Array:
    """GIN's pre-MLP combination ``(1 + epsilon) * h_v + aggregate(h_u, u in N(v))``.

    With a sum aggregator and an injective MLP after it, this is as discriminative as the
    Weisfeiler-Lehman test (Xu et al., ICLR 2019); ``epsilon`` may be fixed or learned.
    Shapes: ``[N, C]``, ``[N, C]``, scalar -> ``[N, C]``.
    """
    return (1.0 + epsilon) * node_features + aggregated


__all__ = [
    "GRAPH_BATCH_KEYS",
    "GraphBatch",
    "aggregate_neighbors",
    "batch_graphs",
    "gin_combine",
    "readout",
    "readout_width",
    "unbatch_graphs",
]
