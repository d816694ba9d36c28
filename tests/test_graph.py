"""Segment readouts, padded graph batches and message passing (gapjax.graph)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gapjax import graph, pooling

NAMES = ("sum", "gsp", "mean", "gap", "max", "gmp", "avgmax", "catavgmax", "gem", "lse",
         "attention")

# Compiled once per (name, num_graphs, shapes): eager dispatch of every small op would cost
# far more than the arithmetic.
readout = jax.jit(graph.readout, static_argnums=(0, 3))
dense_pool = jax.jit(pooling.pool, static_argnums=0)


def _random_graphs(rng: np.random.Generator, sizes, channels: int = 3):
    graphs = []
    for size in sizes:
        edges = rng.integers(0, max(size, 1), size=(2, 2 * size)) if size else np.zeros((2, 0))
        graphs.append({"node_features": rng.normal(size=(size, channels)).astype(np.float32),
                       "senders": edges[0], "receivers": edges[1]})
    return graphs


def _dense_sets(graphs, max_nodes: int = 6, channels: int = 3):
    """The same node sets as a padded dense ``[G, max_nodes, C]`` array and its mask."""
    dense = np.zeros((len(graphs), max_nodes, channels), np.float32)
    mask = np.zeros((len(graphs), max_nodes), bool)
    for row, g in enumerate(graphs):
        size = len(g["node_features"])
        dense[row, :size], mask[row, :size] = g["node_features"], True
    return jnp.asarray(dense), jnp.asarray(mask)


@settings(max_examples=6, deadline=None)
@given(sizes=st.lists(st.integers(0, 6), min_size=4, max_size=4), seed=st.integers(0, 2**16))
def test_readout_equals_dense_pool_on_each_graph(sizes, seed):
    graphs = _random_graphs(np.random.default_rng(seed), sizes)
    batch = graph.batch_graphs(graphs, node_budget=30, edge_budget=60, graph_budget=5)
    dense, mask = _dense_sets(graphs)
    for name in NAMES:
        got = readout(name, batch.node_features, batch.node_graph, 5, mask=batch.node_mask)
        want = dense_pool(name, dense, mask)  # an empty set pools to zeros there too
        np.testing.assert_allclose(got[:4], want, rtol=1e-5, atol=1e-5, err_msg=name)
        np.testing.assert_array_equal(got[4], 0.0)


def test_gem_and_lse_take_their_parameters():
    x = jnp.abs(jnp.asarray(np.random.default_rng(0).normal(size=(6, 2)), jnp.float32))
    index = jnp.array([0, 0, 0, 1, 1, 1])
    for name, option, value in (("gem", "p", 7.5), ("lse", "r", 0.3)):
        got = graph.readout(name, x, index, 2, **{option: value})
        want = dense_pool(name, x.reshape(2, 3, 2), **{option: value})
        np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(graph.readout("gem", x, index, 2, p=1.0),
                               graph.readout("mean", x, index, 2), rtol=1e-5)


def test_masked_nodes_change_nothing():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
    index = jnp.array([0, 0, 0, 1, 1, 2, 2, 2])
    mask = jnp.array([1, 1, 0, 1, 0, 1, 1, 1], bool)
    garbage = x.at[jnp.array([2, 4])].set(1e30)
    for name in NAMES:
        np.testing.assert_allclose(readout(name, x, index, 3, mask=mask),
                                   readout(name, garbage, index, 3, mask=mask), err_msg=name)


@pytest.mark.parametrize("name", NAMES)
def test_empty_graph_gives_zeros_and_finite_gradients(name):
    x = jnp.asarray(np.random.default_rng(2).normal(size=(4, 3)), jnp.float32)
    index = jnp.array([0, 0, 2, 2])  # graph 1 has no nodes; node 3 is masked as well
    mask = jnp.array([True, True, True, False])

    def total(x):
        return graph.readout(name, x, index, 3, mask=mask).sum()

    out = readout(name, x, index, 3, mask=mask)
    grads = jax.jit(jax.grad(total))(x)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(grads))
    np.testing.assert_array_equal(out[1], 0.0)
    np.testing.assert_array_equal(grads[3], 0.0)  # a masked node gets no gradient


def test_max_gradient_is_one_hot_at_first_tied_node():
    x = jnp.array([[1.0], [3.0], [3.0], [2.0], [5.0]])
    index = jnp.array([0, 0, 0, 0, 1])
    grads = jax.grad(lambda x: graph.readout("max", x, index, 2).sum())(x)
    np.testing.assert_array_equal(grads[:, 0], [0.0, 1.0, 0.0, 0.0, 1.0])


def test_mean_gradient_is_one_over_graph_size():
    index = jnp.array([0, 0, 1, 1, 1])
    grads = jax.grad(lambda x: graph.readout("mean", x, index, 2).sum())(jnp.ones((5, 2)))
    np.testing.assert_allclose(grads[:, 0], [1 / 2, 1 / 2, 1 / 3, 1 / 3, 1 / 3])


def test_readout_is_invariant_to_node_order():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(9, 4)), jnp.float32)
    index = jnp.asarray(rng.integers(0, 3, size=9))
    order = rng.permutation(9)
    for name in NAMES:
        np.testing.assert_allclose(readout(name, x, index, 3),
                                   readout(name, x[order], index[order], 3), rtol=1e-6)


def test_bad_names_and_shapes_raise_clear_errors():
    x, index = jnp.ones((3, 2)), jnp.zeros(3, int)
    with pytest.raises(KeyError, match=r"choose one of: .*gap"):
        graph.readout("avg", x, index, 1)
    with pytest.raises(ValueError, match=r"pool 'gem' has no option 'q'.*learn_p"):
        graph.readout("gem", x, index, 1, q=2.0)
    with pytest.raises(ValueError, match=r"x of shape \[nodes, channels\]"):
        graph.readout("sum", jnp.ones(3), index, 1)
    with pytest.raises(ValueError, match=r"segment_ids must have shape \[nodes\]"):
        graph.readout("sum", x, jnp.zeros(4, int), 1)
    with pytest.raises(ValueError, match=r"mask must have shape \[nodes\]"):
        graph.readout("sum", x, index, 1, mask=jnp.ones(2, bool))


def test_batch_graphs_pads_to_budgets_and_round_trips():
    graphs = _random_graphs(np.random.default_rng(4), [3, 0, 5])
    batch = graph.batch_graphs(graphs, node_budget=10, edge_budget=20, graph_budget=4)
    assert batch.node_features.shape == (10, 3) and batch.senders.shape == (20,)
    assert (batch.node_budget, batch.edge_budget, batch.graph_budget) == (10, 20, 4)
    np.testing.assert_array_equal(batch.node_graph, [0, 0, 0, 2, 2, 2, 2, 2, 4, 4])
    np.testing.assert_array_equal(batch.graph_mask, [True, True, True, False])
    assert batch.node_mask.sum() == 8 and batch.edge_mask.sum() == 16
    # Padding edges point one past the last node, where segment sums drop them.
    assert np.all(batch.senders[~batch.edge_mask] == 10)
    assert np.all(batch.node_features[~batch.node_mask] == 0)
    back = graph.unbatch_graphs(batch)
    assert len(back) == 3
    for original, restored in zip(graphs, back):
        np.testing.assert_array_equal(original["node_features"], restored["node_features"])
        np.testing.assert_array_equal(original["senders"], restored["senders"])
        np.testing.assert_array_equal(original["receivers"], restored["receivers"])
    assert graph.GraphBatch.from_dict(batch.to_dict()) == batch


def test_batch_graphs_rejects_what_does_not_fit():
    graphs = _random_graphs(np.random.default_rng(5), [4, 4])
    with pytest.raises(ValueError, match="node_budget=6"):
        graph.batch_graphs(graphs, 6, 40, 2)
    with pytest.raises(ValueError, match="edge_budget=10"):
        graph.batch_graphs(graphs, 8, 10, 2)
    with pytest.raises(ValueError, match="graph_budget=1"):
        graph.batch_graphs(graphs, 8, 40, 1)
    bad = [{"node_features": np.zeros((2, 3)), "senders": [0], "receivers": [2]}]
    with pytest.raises(ValueError, match="outside its 2 nodes"):
        graph.batch_graphs(bad, 8, 8, 2)
    with pytest.raises(KeyError, match="missing senders"):
        graph.GraphBatch.from_dict({"node_features": 0})


def test_jitted_step_compiles_once_for_every_batch_of_the_same_budgets():
    traces = []

    @jax.jit
    def embed(batch: graph.GraphBatch):
        traces.append(1)
        messages = graph.aggregate_neighbors("sum", batch.node_features, batch.senders,
                                             batch.receivers, batch.edge_mask)
        return graph.readout("max", messages, batch.node_graph, batch.graph_budget,
                             mask=batch.node_mask)

    rng = np.random.default_rng(6)
    for sizes in ([3, 7], [1], [2, 2, 2, 2]):
        graphs = _random_graphs(rng, sizes)
        out = embed(graph.batch_graphs(graphs, node_budget=16, edge_budget=32, graph_budget=4))
        assert out.shape == (4, 3) and np.all(np.isfinite(out))
    assert len(traces) == 1


def test_aggregate_neighbors_matches_explicit_neighbourhoods():
    x = jnp.array([[1.0], [2.0], [4.0], [8.0]])
    senders = jnp.array([1, 2, 3, 0, 3])
    receivers = jnp.array([0, 0, 0, 1, 1])
    edge_mask = jnp.array([True, True, True, True, False])  # 3 -> 1 is padding
    expected = {"sum": [14.0, 1.0, 0.0, 0.0], "mean": [14 / 3, 1.0, 0.0, 0.0],
                "max": [8.0, 1.0, 0.0, 0.0]}
    for name, want in expected.items():
        got = graph.aggregate_neighbors(name, x, senders, receivers, edge_mask)
        np.testing.assert_allclose(got[:, 0], want, rtol=1e-6, err_msg=name)
    combined = graph.gin_combine(x, graph.aggregate_neighbors("sum", x, senders, receivers), 0.5)
    np.testing.assert_allclose(combined[:, 0], [1.5 + 14.0, 3.0 + 9.0, 6.0, 12.0])
