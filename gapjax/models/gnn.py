"""Graph Isomorphism Network (Xu et al., ICLR 2019) with a readout chosen by ``POOLS`` name.

The model is ``L`` GIN layers ``h' = MLP((1 + eps) h + aggregate(neighbours))`` with a
selectable neighbourhood aggregator (sum / mean / max), a graph readout (any
``gapjax.graph.readout`` name) applied to every layer's node states and concatenated
(jumping knowledge) or to the last layer only, and an MLP classifier. The readout decides
what a graph embedding can know about its node multiset: ``sum`` keeps counts, ``mean``
keeps proportions, ``max`` keeps only which features occur.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gapjax.graph import READOUTS, GraphBatch, aggregate_neighbors, gin_combine, readout
from gapjax.models import MODELS
from gapjax.pooling import POOLS

Array = jax.Array

AGGREGATORS = ("gsp", "gap", "gmp")  # canonical names of sum, mean, max
NORMS = ("batch", "none")


def _check_pool_name(field: str, value: Any, allowed: tuple[str, ...], shown: str) -> None:
    if not isinstance(value, str) or value not in POOLS or POOLS.canonical(value) not in allowed:
        raise ValueError(f"gin: {field}={value!r} is not supported; choose one of: {shown}")


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
        aggregated = aggregate_neighbors(
            self.aggregator, h, graphs.senders, graphs.receivers, graphs.edge_mask
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


@MODELS.register("gin")
class GIN(nn.Module):
    """GIN graph classifier: ``__call__(graphs: GraphBatch, train=False) -> logits [G, K]``.

    With ``mutable=["intermediates"]`` it also exposes the last node states
    (``"features" [N, hidden]``) and the graph embedding before the classifier
    (``"graph_embedding" [G, width]``) from the same forward pass.

    Attributes:
      num_classes: ``K``.
      num_layers: number of GIN layers ``L``.
      hidden: width of node states and of the classifier's hidden layer.
      readout: graph readout, a ``gapjax.graph.readout`` name (sum, mean, max, avgmax,
        catavgmax, gem, lse and their ``POOLS`` aliases).
      jumping_knowledge: read out every layer's node states (input included) and
        concatenate; otherwise read out the last layer only.
      aggregator: neighbourhood aggregator, ``sum`` | ``mean`` | ``max``.
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
      pool / head: accepted because the shared config passes every ``config.model`` key;
        ``pool`` must be None or name the same readout, ``head`` None or ``"gap"`` (the
        readout followed by a classifier is this model's only head).
    """

    num_classes: int
    num_layers: int = 3
    hidden: int = 64
    readout: str = "sum"
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
    pool: str | None = None
    head: str | None = None

    def _check(self) -> None:
        _check_pool_name("readout", self.readout, READOUTS,
                         "sum, mean, max, avgmax, catavgmax, gem, lse (or a POOLS alias)")
        _check_pool_name("aggregator", self.aggregator, AGGREGATORS, "sum, mean, max")
        if self.pool is not None and (
            self.pool not in POOLS or POOLS.canonical(self.pool) != POOLS.canonical(self.readout)
        ):
            raise ValueError(
                f"gin: pool={self.pool!r} differs from readout={self.readout!r}; gin selects its "
                f"graph readout with model.readout (choices: sum, mean, max, avgmax, catavgmax, "
                f"gem, lse), so leave model.pool unset or equal to it"
            )
        if self.head not in (None, "gap"):
            raise ValueError(f"gin: head={self.head!r} is not supported; choose one of: gap")
        if self.norm not in NORMS:
            raise ValueError(f"gin: norm={self.norm!r} is not supported; choose one of: "
                             f"{', '.join(NORMS)}")
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
    def __call__(self, graphs: GraphBatch, train: bool = False) -> Array:
        self._check()
        num_graphs = graphs.graph_mask.shape[0]

        def pooled(h: Array) -> Array:
            return readout(self.readout, h, graphs.node_graph, num_graphs, mask=graphs.node_mask)

        h = self._input_states(graphs)
        readouts = [pooled(h)] if self.jumping_knowledge else []
        for index in range(self.num_layers):
            h = GINLayer(
                self.hidden, self.aggregator, self.learn_eps, self.eps_init, self.mlp_layers,
                self.norm, self.dtype, self.axis_name, name=f"layer{index}",
            )(h, graphs, train)
            if self.jumping_knowledge:
                readouts.append(pooled(h))
        if not self.jumping_knowledge:
            readouts.append(pooled(h))
        # The feature switch of the image classifiers, for graphs: the last node states
        # [N, hidden] (padding rows zero) before they are read out.
        self.sow("intermediates", "features", h)
        embedding = jnp.concatenate(readouts, axis=-1).astype(self.dtype)
        self.sow("intermediates", "graph_embedding", embedding)
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


__all__ = ["AGGREGATORS", "GIN", "GINLayer"]
