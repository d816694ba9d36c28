"""Tasks own their loss, metrics, evaluation and model inputs; the loop never names one."""

from __future__ import annotations

import ast
import functools
import math
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gapjax import graph, tasks
from gapjax.data.spec import DatasetSpec
from gapjax.evaluators import eval_step, zero_eval_sums
from gapjax.tasks import TASKS, Classification, GraphClassification, MultiLabel, Task
from gapjax.train.state import create_train_state
from gapjax.train.steps import train_step

REPO = Path(__file__).resolve().parents[1]


@TASKS.register("test_soft_targets")
class SoftTargets(Task):
    """A fork's task, defined here only: labels are class distributions ``[b, K]``."""

    def losses(self, logits, labels, train=False):
        return optax.softmax_cross_entropy(logits.astype(jnp.float32), labels)

    def correct(self, logits, labels):
        return (jnp.argmax(logits, -1) == jnp.argmax(labels, -1)).astype(jnp.float32)


class Linear(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, x, train=False):
        return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


def _weighted_mean(values, weight):
    return float((np.asarray(values) * weight).sum() / weight.sum())


def test_registry_lists_the_tasks_and_specs_are_checked_against_it():
    assert {"classification", "multilabel", "graph"} <= set(TASKS.names())
    assert isinstance(tasks.get("graph", num_classes=2), GraphClassification)
    with pytest.raises(ValueError, match=r"task='multi_label' is not a registered task; "
                                         r"choose one of: classification, graph, multilabel"):
        DatasetSpec(name="x", builder_class=object, task="multi_label", num_classes=2,
                    input_shape=(2,))
    spec = DatasetSpec(name="x", builder_class=object, task="test_soft_targets", num_classes=2,
                       input_shape=(2,))
    assert spec.task == "test_soft_targets"


def test_classification_smooths_only_the_training_loss_and_reports_top5_from_ten_classes():
    logits = jnp.array([[2.0, 1.0, 0.0], [0.0, 0.0, 5.0]])
    labels = jnp.array([0, 1])
    task = Classification(num_classes=3, label_smoothing=0.3)
    log_p = jax.nn.log_softmax(logits)
    np.testing.assert_allclose(task.losses(logits, labels), -log_p[jnp.arange(2), labels],
                               atol=1e-6)
    targets = 0.7 * jax.nn.one_hot(labels, 3) + 0.1
    np.testing.assert_allclose(task.losses(logits, labels, train=True),
                               -(targets * log_p).sum(-1), atol=1e-6)
    assert task.metric_names == ("loss", "accuracy")
    assert Classification(num_classes=10).metric_names == ("loss", "accuracy", "top5_accuracy")
    with pytest.raises(ValueError, match=r"label_smoothing=1.5 must lie in \[0, 1\)"):
        Classification(num_classes=3, label_smoothing=1.5)


def test_multilabel_average_precision_per_label_and_its_mean():
    logits = np.array([[0.9, 0.2, 0.5], [0.8, 0.1, 0.4], [0.7, 0.3, 0.3], [0.1, 0.4, 0.2]])
    labels = np.array([[1, 0, 1], [0, 0, 1], [1, 0, 0], [0, 0, 0]], np.float32)
    metrics = MultiLabel(num_classes=3).summarize(logits, labels)
    # Label 0: positives at ranks 1 and 3 -> (1/1 + 2/3) / 2; label 2: ranks 1, 2 -> 1.
    assert metrics["ap_0"] == pytest.approx((1 + 2 / 3) / 2)
    assert math.isnan(metrics["ap_1"])  # no positive: left out of the mean
    assert metrics["ap_2"] == pytest.approx(1.0)
    assert metrics["map"] == pytest.approx(((1 + 2 / 3) / 2 + 1.0) / 2)
    with pytest.raises(ValueError, match="multilabel task does not smooth labels"):
        MultiLabel(num_classes=3, label_smoothing=0.1)


def test_graph_task_feeds_a_graph_batch_whole():
    graphs = [{"node_features": np.eye(3, dtype=np.float32)[[0, 1]],
               "senders": np.array([0], np.int32), "receivers": np.array([1], np.int32)}]
    batch = {**graph.batch_graphs(graphs, 4, 4, 2).to_dict(), "label": np.zeros(2, np.int32)}
    task = tasks.get("graph", num_classes=2)
    assert not task.rows_split and not task.spatial_inputs
    inputs = jax.jit(task.model_inputs)(batch)
    assert isinstance(inputs, graph.GraphBatch) and inputs.graph_budget == 2
    assert task.init_inputs(batch).node_budget == 4  # the whole batch, never a row of it


def test_eval_step_sums_are_the_task_metrics_weighted_over_real_rows():
    task = Classification(num_classes=12)
    model = Linear(12)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 2, 2, 1)).astype(np.float32)
    labels = rng.integers(0, 12, size=6).astype(np.int32)
    weight = np.array([1, 1, 1, 1, 0, 0], np.float32)
    variables = model.init(jax.random.key(0), x[:1])
    step = jax.jit(functools.partial(eval_step, model=model, task=task))
    sums, logits = step(variables, {"image": x, "label": labels, "weight": weight},
                        zero_eval_sums(task))
    assert set(sums) == {"loss", "accuracy", "top5_accuracy", "weight"}
    assert float(sums["weight"]) == 4.0
    log_p = np.asarray(jax.nn.log_softmax(logits))
    expected_loss = _weighted_mean(-log_p[np.arange(6), labels], weight)
    assert float(sums["loss"]) / 4 == pytest.approx(expected_loss, rel=1e-5)
    ranks = (np.asarray(logits) > np.asarray(logits)[np.arange(6), labels][:, None]).sum(-1)
    assert float(sums["accuracy"]) / 4 == pytest.approx(_weighted_mean(ranks == 0, weight))
    assert float(sums["top5_accuracy"]) / 4 == pytest.approx(_weighted_mean(ranks < 5, weight))


def test_a_task_defined_outside_gapjax_trains_and_evaluates():
    task = tasks.get("test_soft_targets", num_classes=3)
    model = Linear(3)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 4)).astype(np.float32)
    targets = np.asarray(jax.nn.softmax(x[:, :3] * 3.0))
    batch = {"image": x, "label": targets, "weight": np.ones(8, np.float32)}
    tx = optax.sgd(0.5)
    state = create_train_state(model, tx, task.init_inputs(batch), seed=0)
    step = jax.jit(functools.partial(train_step, model=model, tx=tx, task=task))
    evaluate = jax.jit(functools.partial(eval_step, model=model, task=task))
    first, _ = evaluate(state.variables(), batch, zero_eval_sums(task))
    for _ in range(20):
        state = step(state, batch)
    last, _ = evaluate(state.variables(), batch, zero_eval_sums(task))
    assert set(last) == {"loss", "accuracy", "weight"}
    assert float(last["loss"]) < 0.8 * float(first["loss"])
    assert float(state.sums["steps"]) == 20.0


def test_loop_and_steps_never_name_a_task():
    names = set(TASKS.names(aliases=True))
    for path in ("gapjax/train/loop.py", "gapjax/train/steps.py"):
        tree = ast.parse((REPO / path).read_text())
        literals = {node.value for node in ast.walk(tree)
                    if isinstance(node, ast.Constant) and isinstance(node.value, str)}
        assert not literals & names, (path, literals & names)
