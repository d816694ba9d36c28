"""The gin model, the gapjax_graph_tasks dataset, its config and the readouts experiment."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gapjax import graph, models, tasks
from gapjax.data import graph_tasks
from gapjax.experiments import readouts

BUDGETS = {"node_budget": 48, "edge_budget": 96, "graph_budget": 6}


def _graphs(seed: int, count: int = 4):
    """Random coloured graphs with edges between any nodes (not only same colour)."""
    rng = np.random.default_rng(seed)
    graphs = []
    for _ in range(count):
        size = int(rng.integers(2, 9))
        edges = rng.integers(0, size, size=(2, 2 * size))
        graphs.append({"node_features": np.eye(3, dtype=np.float32)[rng.integers(0, 3, size)],
                       "senders": edges[0], "receivers": edges[1]})
    return graphs


def _model(pool: str = "sum", **kwargs):
    return models.get("gin", num_classes=3, num_layers=1, hidden=8, pool=pool, **kwargs)


def _init(model, batch):
    return model.init(jax.random.key(0), jax.tree_util.tree_map(jnp.asarray, batch))


def _apply(model):
    return jax.jit(lambda variables, batch: model.apply(variables, batch))


def _permute_nodes(batch: graph.GraphBatch, order: np.ndarray) -> graph.GraphBatch:
    """The same graphs with node slot ``i`` holding old node ``order[i]``."""
    new_index = np.empty_like(order)
    new_index[order] = np.arange(len(order))
    remap = np.append(new_index, batch.node_budget)  # padding edges keep pointing past the end
    return batch.replace(
        node_features=batch.node_features[order], node_graph=batch.node_graph[order],
        node_mask=batch.node_mask[order], senders=remap[batch.senders],
        receivers=remap[batch.receivers])


@pytest.mark.parametrize("readout", ["sum", "mean", "max"])
def test_gin_is_invariant_to_node_and_graph_order(readout):
    model = _model(readout)
    graphs = _graphs(0)
    batch = graph.batch_graphs(graphs, **BUDGETS)
    variables = _init(model, batch)
    apply = _apply(model)
    logits = np.asarray(apply(variables, batch))
    assert logits.shape == (6, 3) and logits.dtype == np.float32

    order = np.random.default_rng(1).permutation(batch.node_budget)
    np.testing.assert_allclose(apply(variables, _permute_nodes(batch, order)), logits,
                               rtol=1e-5, atol=1e-5)

    graph_order = [2, 0, 3, 1]
    shuffled = graph.batch_graphs([graphs[i] for i in graph_order], **BUDGETS)
    np.testing.assert_allclose(apply(variables, shuffled)[:4], logits[graph_order],
                               rtol=1e-5, atol=1e-5)


def test_padding_nodes_edges_and_graphs_change_nothing_in_eval_and_training():
    model = _model("max")
    graphs = _graphs(2, count=3)
    tight = graph.batch_graphs(graphs, node_budget=sum(len(g["node_features"]) for g in graphs),
                               edge_budget=sum(len(g["senders"]) for g in graphs),
                               graph_budget=3)
    loose = graph.batch_graphs(graphs, **BUDGETS)
    variables = _init(model, tight)
    np.testing.assert_allclose(_apply(model)(variables, loose)[:3],
                               _apply(model)(variables, tight), rtol=1e-5, atol=1e-5)

    @jax.jit
    def train_forward(variables, batch):
        return model.apply(variables, batch, train=True, mutable=["batch_stats"])

    tight_logits, tight_stats = train_forward(variables, tight)
    loose_logits, loose_stats = train_forward(variables, loose)
    np.testing.assert_allclose(loose_logits[:3], tight_logits, rtol=1e-4, atol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(tight_stats), jax.tree_util.tree_leaves(loose_stats)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)  # statistics skip padding


def test_max_readout_of_an_empty_graph_gives_finite_logits_and_gradients():
    model = _model("max")
    graphs = _graphs(3, count=2)
    graphs.insert(1, {"node_features": np.zeros((0, 3), np.float32), "senders": [],
                      "receivers": []})
    batch = jax.tree_util.tree_map(jnp.asarray, graph.batch_graphs(graphs, **BUDGETS))
    variables = _init(model, batch)

    def embedding_of_empty_graph(params):
        features = model.apply({**variables, "params": params}, batch, method="forward_features")
        return graph.readout("max", features.node_features, features.node_graph,
                             features.graph_mask.shape[0], mask=features.node_mask)[1]

    embedding = jax.jit(embedding_of_empty_graph)(variables["params"])
    np.testing.assert_array_equal(embedding, 0.0)
    grads = jax.jit(jax.grad(lambda p: model.apply({**variables, "params": p}, batch).sum()))(
        variables["params"])
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(grads))


def test_integer_colours_are_one_hot_encoded():
    model_vectors = _model(num_colors=None)
    model_colours = _model(num_colors=3)
    batch = graph.batch_graphs(_graphs(4), **BUDGETS)
    colours = batch.replace(node_features=np.argmax(batch.node_features, -1).astype(np.int32))
    variables = _init(model_vectors, batch)
    np.testing.assert_allclose(_apply(model_colours)(variables, colours),
                               _apply(model_vectors)(variables, batch), rtol=1e-6)


def test_bad_options_raise_clear_errors():
    batch = jax.tree_util.tree_map(jnp.asarray, graph.batch_graphs(_graphs(5, 1), 16, 32, 2))
    cases = [({"pool": "avg"}, "unknown pool 'avg'; choose one of: .*attention"),
             ({"aggregator": "catavgmax"}, "aggregator='catavgmax' changes the node width"),
             ({"norm": "layer"}, "norm='layer' is not valid; choose one of: 'batch', 'none'"),
             ({"pool": "gem", "pool_kwargs": {"q": 2}}, "pool 'gem' has no option 'q'")]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            _model(**kwargs).init(jax.random.key(0), batch)
    with pytest.raises(ValueError, match="model 'gin' has no option 'readout'"):
        _model(readout="sum")
    colours = batch.replace(node_features=jnp.zeros(16, jnp.int32))
    with pytest.raises(ValueError, match="num_colors"):
        _model().init(jax.random.key(0), colours)


def test_fig3_pairs_are_separated_exactly_as_theory_says():
    rows = readouts.fig3_separation([graph_tasks.preprocess(e, None)
                                     for e in graph_tasks.fig3_examples()])
    assert len(rows) == 9
    for row in rows:
        assert row["aggregate_separates"] == row["theory_separates"], row
        assert row["gin_layer_separates"] == row["theory_separates"], row
    assert [row["theory_separates"] for row in rows if row["aggregator"] == "mean"] == [
        False, True, False]


@pytest.mark.parametrize("task", graph_tasks.VARIANTS)
def test_generated_labels_follow_the_colour_multiset(task):
    rng = np.random.default_rng(7)
    examples = [graph_tasks.generate_example(task, rng) for _ in range(300)]
    labels = np.array([e["label"] for e in examples])
    sizes = np.array([len(e["colors"]) for e in examples])
    red = np.array([(e["colors"] == graph_tasks.RED).sum() for e in examples])
    assert sizes.min() >= graph_tasks.MIN_NODES and sizes.max() <= graph_tasks.MAX_NODES
    assert 0.4 < labels.mean() < 0.6
    expected = {"presence": red > 0, "proportion": 2 * red > sizes,
                "count": red >= graph_tasks.COUNT_THRESHOLD}[task]
    np.testing.assert_array_equal(labels, expected)
    for e in examples:  # two messages per node, both from its own colour
        np.testing.assert_array_equal(np.bincount(e["receivers"], minlength=len(e["colors"])), 2)
        np.testing.assert_array_equal(e["colors"][e["senders"]], e["colors"][e["receivers"]])
    if task == "count":  # the red fraction does not give the count away
        fraction = red / sizes
        assert abs(fraction[labels == 1].mean() - fraction[labels == 0].mean()) < 0.05
    again = graph_tasks.generate_example(task, np.random.default_rng(7))
    np.testing.assert_array_equal(again["colors"], examples[0]["colors"])


def test_builder_writes_the_splits_and_the_pipeline_hooks_batch_them(tmp_path):
    config = graph_tasks.builder_config({"task": "count", "num_train": 6, "num_test": 3})
    builder = graph_tasks.GapjaxGraphTasks(data_dir=str(tmp_path), config=config,
                                           file_format="array_record")
    builder.download_and_prepare()
    sources = builder.as_data_source()
    assert {name: len(sources[name]) for name in ("train", "test", "fig3")} == {
        "train": 6, "test": 3, "fig3": 6}
    first = sources["train"][0]
    expected = graph_tasks.generate_example("count", np.random.default_rng([2, 1, 0]))
    train = [sources["train"][i] for i in range(6)]
    assert any(np.array_equal(e["colors"], expected["colors"]) for e in train)
    examples = [graph_tasks.preprocess(sources["train"][i], None) for i in range(3)]
    batch = graph_tasks.SPEC.collate(examples, 4)
    assert batch["node_features"].shape == (4 * graph_tasks.MAX_NODES, 3)
    np.testing.assert_array_equal(batch["weight"], [1, 1, 1, 0])
    assert batch["label"][0] == first["label"]
    graphs = tasks.get(graph_tasks.SPEC.task, num_classes=2).model_inputs(batch)
    assert isinstance(graphs, graph.GraphBatch) and graphs.graph_budget == 4
    with pytest.raises(ValueError, match=r"config.dataset.task='colour'.*presence, proportion"):
        graph_tasks.builder_config({"task": "colour"})


def _load_config_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / "graph_readout.py"
    spec = importlib.util.spec_from_file_location("graph_readout_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_builds_gin_with_the_chosen_readout_and_task():
    config = _load_config_module().get_config("mean,proportion")
    assert (config.model.pool, config.dataset.task) == ("mean", "proportion")
    kwargs = {key: value for key, value in config.model.items() if key != "name"}
    model = models.get(config.model.name, num_classes=2, dtype=jnp.float32, axis_name=None,
                       **kwargs)
    assert model.pool == "mean" and model.num_layers == config.model.num_layers
    spec = graph_tasks.SPEC
    assert spec.name == config.dataset.name and spec.task == "graph"
    assert spec.builder_config(config.dataset).task == "proportion"


def test_failure_checks_compare_each_predicted_failure_with_sum():
    matrix = {"sum": {"presence": [100.0], "proportion": [99.0], "count": [97.0]},
              "mean": {"presence": [100.0], "proportion": [99.0], "count": [60.0]},
              "max": {"presence": [100.0], "proportion": [85.0], "count": [55.0]}}
    checks = {(c["readout"], c["task"]): c["fails"] for c in readouts.failure_checks(matrix)}
    assert checks == {("mean", "count"): True, ("max", "count"): True,
                      ("max", "proportion"): False}
