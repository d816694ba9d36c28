"""Graph Isomorphism Network (Xu et al., ICLR 2019) with a readout chosen by ``POOLS`` name.

The model is ``L`` GIN layers ``h' = MLP((1 + eps) h + aggregate(neighbours))`` with a
neighbourhood aggregator and a graph readout that are both ``POOLS`` members in their
segment form (sum / mean / max, GeM, attention, a fork's pool, ...), the readout applied to
every layer's node states concatenated (jumping knowledge) or to the last layer only, and
an MLP classifier. The readout decides what a graph embedding can know about its node
multiset: ``sum`` keeps counts, ``mean`` keeps proportions, ``max`` keeps only which
features occur.

The model contract for graphs: ``forward_features(graphs)`` returns the batch with its
``node_features`` replaced by the node states the readout pools (``[N, C]``, padding rows
zero), and ``forward_head(features)`` reads them out and classifies.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gapjax.graph import GraphBatch, gin_combine
from gapjax.layers import check_choice, check_num_classes
from gapjax.models import register_preset
from gapjax.pooling import make_pool

Array = jax.Array

NORMS = ("batch", "none")


class GINLayer(nn.Module):
    """One GIN layer on a padded graph batch: ``[N, C] -> [N, features]``.

    ``MLP((1 + eps) h_v + aggregate_{u in N(v)} h_u)``; ``eps`` is a learned scalar
    (initialised to ``eps_init``) when ``learn_eps``, else fixed at ``eps_init``. Batch
    statistics, when ``norm="batch"``, are taken over real nodes only.
    """

    features: int
    aggregator: str = "sum"
    learn_eps: bool = True
    eps_init: float = 0.0
    mlp_layers: int = 2
    norm: str = "batch"
    dtype: Any = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, h: Array, graphs: GraphBatch, train: bool = False) -> Array:
        if self.learn_eps:
            epsilon = self.param("eps", nn.initializers.constant(self.eps_init), (), jnp.float32)
        else:
            epsilon = jnp.asarray(self.eps_init, jnp.float32)
        aggregate = make_pool(self.aggregator, name="aggregate")
        if aggregate.output_width(h.shape[-1]) != h.shape[-1]:
            raise ValueError(f"gin: aggregator={self.aggregator!r} changes the node width; "
                             "choose a pool whose output width equals its input's")
        messages = jnp.take(h, graphs.senders, axis=0, mode="clip")
        aggregated = aggregate.segment(
            messages, graphs.receivers, h.shape[0], graphs.edge_mask
        )
        x = gin_combine(h.astype(jnp.float32), aggregated.astype(jnp.float32), epsilon)
        x = x.astype(self.dtype)
        for index in range(self.mlp_layers):
            x = nn.Dense(self.features, dtype=self.dtype, name=f"dense{index}")(x)
            if self.norm == "batch":
                x = nn.BatchNorm(
                    use_running_average=not train, momentum=0.9, dtype=self.dtype,
                    axis_name=self.axis_name, name=f"norm{index}",
                )(x, mask=graphs.node_mask[:, None])
            x = nn.relu(x)
        # Padding nodes stay exactly zero, whatever the biases and norms did to them.
        return jnp.where(graphs.node_mask[:, None], x, jnp.zeros((), x.dtype))


class GIN(nn.Module):
    """GIN graph classifier: ``__call__(graphs: GraphBatch, train=False) -> logits [G, K]``.

    Attributes:
      num_classes: ``K``.
      num_layers: number of GIN layers ``L``.
      hidden: width of node states and of the classifier's hidden layer.
      pool: graph readout, any ``POOLS`` name; ``pool_kwargs`` its options.
      jumping_knowledge: read out every layer's node states (input included),
        concatenated; otherwise read out the last layer only.
      aggregator: neighbourhood aggregator, a ``POOLS`` name that keeps the width
        (``sum``, ``mean``, ``max``, ...).
      learn_eps: learn GIN's epsilon (else fixed at ``eps_init``).
      eps_init: initial (or fixed) epsilon.
      mlp_layers: dense layers in each GIN layer's MLP.
      norm: ``"batch"`` (BatchNorm over real nodes in the MLPs and over real graphs on the
        graph embedding) or ``"none"``.
      num_colors: when ``node_features`` are int colours ``[N]``, their number (the
        one-hot width); None means ``node_features`` are float vectors ``[N, F]``.
      dropout: dropout rate before the classifier (needs a ``dropout`` rng in training).
      dtype: compute dtype; parameters stay float32 and readouts accumulate in float32.
      axis_name: pmap axis for BatchNorm statistics.
    """

    num_classes: int
    num_layers: int = 3
    hidden: int = 64
    pool: str = "sum"
    pool_kwargs: Any = None
    jumping_knowledge: bool = True
    aggregator: str = "sum"
    learn_eps: bool = True
    eps_init: float = 0.0
    mlp_layers: int = 2
    norm: str = "batch"
    num_colors: int | None = None
    dropout: float = 0.0
    dtype: Any = jnp.float32
    axis_name: str | None = None

    def _check(self) -> None:
        check_num_classes(self.num_classes)
        check_choice("gin: norm", self.norm, NORMS)
        if self.num_layers < 0:
            raise ValueError(f"gin: num_layers={self.num_layers} must be >= 0")

    def _input_states(self, graphs: GraphBatch) -> Array:
        features = jnp.asarray(graphs.node_features)
        if jnp.issubdtype(features.dtype, jnp.integer):
            if features.ndim != 1 or not self.num_colors:
                raise ValueError(
                    f"gin: integer node_features must be colours of shape [nodes] with "
                    f"num_colors set; got shape {tuple(features.shape)} and "
                    f"num_colors={self.num_colors!r}"
                )
            features = jax.nn.one_hot(features, self.num_colors, dtype=jnp.float32)
        elif features.ndim != 2:
            raise ValueError(
                f"gin: float node_features must have shape [nodes, features]; got "
                f"{tuple(features.shape)}"
            )
        return jnp.where(graphs.node_mask[:, None], features, 0.0).astype(self.dtype)

    @nn.compact
    def __call__(self, graphs: GraphBatch, train: bool = False, output: str = "logits"):
        """``output``: ``"logits"`` or ``"features"`` of a batch; ``"head"`` of features."""
        self._check()
        check_choice("output", output, ("logits", "features", "head"))
        if output != "head":
            h = self._input_states(graphs)
            states = [h] if self.jumping_knowledge else []
            for index in range(self.num_layers):
                h = GINLayer(
                    self.hidden, self.aggregator, self.learn_eps, self.eps_init,
                    self.mlp_layers, self.norm, self.dtype, self.axis_name, name=f"layer{index}",
                )(h, graphs, train)
                if self.jumping_knowledge:
                    states.append(h)
            nodes = jnp.concatenate(states, axis=-1) if self.jumping_knowledge else h
            graphs = graphs.replace(node_features=nodes)
            if output == "features":
                return graphs
        readout = make_pool(self.pool, name="readout", **dict(self.pool_kwargs or {}))
        embedding = readout.segment(graphs.node_features, graphs.node_graph,
                                    graphs.graph_mask.shape[0], graphs.node_mask)
        embedding = embedding.astype(self.dtype)
        if self.norm == "batch":
            # Sum readouts grow with graph size; normalising each feature over the real
            # graphs of the batch (an invertible affine map, so nothing is lost) keeps the
            # classifier well conditioned whatever the readout's scale.
            embedding = nn.BatchNorm(
                use_running_average=not train, momentum=0.9, dtype=self.dtype,
                axis_name=self.axis_name, name="embedding_norm",
            )(embedding, mask=graphs.graph_mask[:, None])
        x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype, name="hidden")(embedding))
        x = nn.Dropout(self.dropout, deterministic=not train or self.dropout == 0.0)(x)
        logits = nn.Dense(self.num_classes, dtype=self.dtype, name="classifier")(x)
        return logits.astype(jnp.float32)

    def forward_features(self, graphs: GraphBatch, train: bool = False) -> GraphBatch:
        """The batch with ``node_features`` = the node states the readout pools ``[N, C]``."""
        return self(graphs, train, output="features")

    def forward_head(self, features: GraphBatch, train: bool = False) -> Array:
        """Readout, embedding norm and classifier: ``-> float32 logits [G, K]``."""
        return self(features, train, output="head")


register_preset("gin", GIN, {}, "GIN graph classifier; keyword arguments are GIN attributes "
                "(num_classes, num_layers, hidden, pool, pool_kwargs, aggregator, ...).")

__all__ = ["GIN", "NORMS", "GINLayer"]
