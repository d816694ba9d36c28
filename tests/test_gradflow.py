"""Gradient-flow diagnostics: analytic cases for GAP and GMP, collisions, conflict, jit."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gapjax import gradflow, pooling
from gapjax.layers import Classifier

NUM_LABELS = 4


class _TinyClassifier(Classifier):
    """Two convolutions and the contract's GAP head: a model written as a fork would."""

    num_classes: int = NUM_LABELS

    def backbone(self, x, train: bool = False):
        del train
        x = nn.relu(self.early_tap(nn.Conv(3, (3, 3), name="stem")(x)))
        return nn.relu(nn.Conv(4, (3, 3), padding="VALID", name="body")(x))


def _batch(seed: int = 0, batch: int = 3, size: int = 5):
    keys = jax.random.split(jax.random.PRNGKey(seed), 2)
    images = jax.random.normal(keys[0], (batch, size, size, 1))
    labels = (jax.random.uniform(keys[1], (batch, NUM_LABELS)) < 0.5).astype(jnp.float32)
    labels = labels.at[:, :2].set(1.0)  # every image has at least two positive labels
    return images, labels


@functools.cache
def _model_and_variables(pool: str):
    model = _TinyClassifier(pool=pool)
    images, _ = _batch()
    return model, jax.jit(model.init)(jax.random.PRNGKey(0), images)


@functools.cache
def _jitted_label_gradients(model):
    return jax.jit(functools.partial(gradflow.per_label_gradients, model, task="multilabel"))


_spread_statistics = jax.jit(gradflow.spread_statistics)
_collision_statistics = jax.jit(gradflow.collision_statistics)


@functools.partial(jax.jit, static_argnums=0)
def _pool_label_gradients(pool_name: str, features, kernel):
    """Per-label gradients of ``sum_b logit[b, k]`` w.r.t. the features: ``[K, B, *S, C]``."""

    def logit_sum(x, k):
        return (pooling.pool(pool_name, x) @ kernel)[:, k].sum()

    return jax.vmap(jax.grad(logit_sum), in_axes=(None, 0))(features, jnp.arange(kernel.shape[1]))


# --------------------------------------------------------------------------------------
# Analytic spread cases
# --------------------------------------------------------------------------------------


@jax.jit
def _gap_spread(features):
    kernel = jnp.array([[1.0, -2.0], [0.5, 3.0], [-1.0, 0.25]])
    grads = _pool_label_gradients("gap", features, kernel)
    folded = grads.reshape(-1, *features.shape[1:])
    return (gradflow.gradient_coverage(folded), gradflow.gradient_entropy(folded),
            gradflow.gradient_gini(folded))


@settings(max_examples=10, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    spatial=st.sampled_from([(1, 2), (3, 4)]),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
)
def test_gap_gradient_covers_every_position_at_any_input(seed, spatial, scale):
    features = scale * jax.random.normal(jax.random.PRNGKey(seed), (2, *spatial, 3))
    coverage, entropy, gini = _gap_spread(features)
    np.testing.assert_array_equal(coverage, 1.0)
    np.testing.assert_allclose(entropy, 1.0, atol=1e-5)
    np.testing.assert_allclose(gini, 0.0, atol=1e-6)


def test_gmp_gradient_hits_exactly_one_position_per_channel_and_image():
    features = jax.random.normal(jax.random.PRNGKey(3), (2, 3, 4, 3))
    # A constant channel is a full tie: the gradient must still pick one position.
    features = features.at[1, :, :, 2].set(0.7)
    kernel = jnp.array([[1.0, -2.0], [0.5, 3.0], [-1.0, 0.25]])
    grads = _pool_label_gradients("gmp", features, kernel)
    nonzero = (grads != 0).reshape(2, 2, -1, 3).sum(axis=2)
    np.testing.assert_array_equal(nonzero, 1)
    folded = grads.reshape(-1, 3, 4, 3)
    positions = 12
    np.testing.assert_allclose(gradflow.gradient_coverage(folded), 1 / positions)
    np.testing.assert_allclose(gradflow.gradient_entropy(folded), 0.0, atol=1e-6)
    np.testing.assert_allclose(gradflow.gradient_gini(folded), 1 - 1 / positions, rtol=1e-6)


def test_gmp_model_feature_gradients_are_one_hot_per_channel_and_image():
    model, variables = _model_and_variables("gmp")
    images, labels = _batch()
    grads = _jitted_label_gradients(model)(variables, images, labels, weights=jnp.ones((3,)))
    assert grads["features"].shape == (NUM_LABELS, 3, 3, 3, 4)
    assert grads["early"].shape == (NUM_LABELS, 3, 5, 5, 3)  # output of the first conv
    kernel = variables["params"]["head"]["classifier"]["kernel"]  # [C, K]
    uses_channel = (kernel.T != 0)[:, None, :]  # [K, 1, C]
    nonzero = (grads["features"] != 0).reshape(NUM_LABELS, 3, 9, 4).sum(axis=2)
    np.testing.assert_array_equal(nonzero, np.broadcast_to(uses_channel, nonzero.shape))
    spread = _spread_statistics(grads["features"].reshape(-1, 3, 3, 4))
    np.testing.assert_allclose(spread["coverage"], 1 / 9, rtol=1e-6)
    np.testing.assert_allclose(spread["entropy"], 0.0, atol=1e-6)


def test_spread_statistics_known_values_and_padding():
    # One slice: magnitudes (0, 1, 1, 2) over 4 positions.
    grads = jnp.array([0.0, -1.0, 1.0, 2.0]).reshape(1, 2, 2, 1)
    probs = np.array([1, 1, 2]) / 4
    expected_entropy = -(probs * np.log(probs)).sum() / np.log(4)
    expected_gini = (-3 * 0 - 1 * 1 + 1 * 1 + 3 * 2) / (4 * 4)
    np.testing.assert_allclose(gradflow.gradient_coverage(grads), [[0.75]])
    np.testing.assert_allclose(gradflow.gradient_entropy(grads), [[expected_entropy]], rtol=1e-6)
    np.testing.assert_allclose(gradflow.gradient_gini(grads), [[expected_gini]], rtol=1e-6)
    # A padded row and an all-zero slice must not move the average.
    padded = jnp.concatenate([grads, jnp.ones_like(grads), jnp.zeros_like(grads)])
    stats = _spread_statistics(padded, weights=jnp.array([1.0, 0.0, 1.0]))
    np.testing.assert_allclose(stats["coverage"], 0.75)
    np.testing.assert_allclose(stats["gini"], expected_gini, rtol=1e-6)


# --------------------------------------------------------------------------------------
# Collisions and conflict
# --------------------------------------------------------------------------------------


def test_collisions_on_constructed_input():
    # Labels 0 and 1 share channel 0; label 2 reads channel 1 only.
    kernel = jnp.array([[1.0, 2.0, 0.0], [0.0, 0.0, 1.0]])
    features = jnp.zeros((2, 2, 2, 2)).at[:, 0, 1, 0].set(5.0).at[:, 1, 1, 1].set(3.0)
    positives = jnp.array([[1, 1, 0], [1, 0, 1]])  # image 0: labels 0+1, image 1: labels 0+2
    gmp_grads = _pool_label_gradients("gmp", features, kernel)
    gmp = _collision_statistics(gmp_grads, positives)
    assert float(gmp["collision_triples"]) == 1.0  # only (image 0, channel 0, labels 0/1)
    assert float(gmp["collision_rate"]) == 1.0
    gap = _collision_statistics(_pool_label_gradients("gap", features, kernel), positives)
    assert float(gap["collision_triples"]) == 1.0
    assert float(gap["collision_rate"]) == 0.0
    # Padding out image 0 leaves no shared channel: no triple, rate 0.
    padded = _collision_statistics(gmp_grads, positives, weights=jnp.array([0.0, 1.0]))
    assert float(padded["collision_triples"]) == 0.0
    assert float(padded["collision_rate"]) == 0.0


def test_concentrated_gradients_at_different_positions_do_not_collide():
    # Two labels, one image, one channel, 4 positions.
    label_grads = jnp.array([[0.9, 0.1, 0.0, 0.0], [0.0, 0.0, 0.2, 0.8]]).reshape(2, 1, 2, 2, 1)
    positives = jnp.array([[1, 1]])
    apart = _collision_statistics(label_grads, positives)
    assert float(apart["collision_rate"]) == 0.0 and float(apart["collision_triples"]) == 1.0
    together = _collision_statistics(label_grads.at[1].set(label_grads[0]), positives)
    assert float(together["collision_rate"]) == 1.0


def test_pairwise_cosine_on_constructed_vectors():
    vectors = jnp.array([[1.0, 0.0], [-2.0, 0.0], [0.0, 3.0], [5.0, 5.0]])
    stats = gradflow.pairwise_cosine(vectors, valid=jnp.array([True, True, True, False]))
    np.testing.assert_allclose(stats["conflict_mean"], -1 / 3, rtol=1e-6)
    np.testing.assert_allclose(stats["conflict_negative"], 1 / 3, rtol=1e-6)


def test_per_label_gradients_match_autodiff_of_each_label_loss():
    model, variables = _model_and_variables("gmp")
    images, labels = _batch(seed=1)
    weights = jnp.array([1.0, 1.0, 0.0])
    grads = _jitted_label_gradients(model)(variables, images, labels, weights=weights)

    @jax.jit
    def label_loss_gradient(params, k):
        def label_loss(params):
            logits = model.apply({**variables, "params": params}, images)
            losses = -(labels * jax.nn.log_sigmoid(logits)
                       + (1 - labels) * jax.nn.log_sigmoid(-logits))
            return (losses[:, k] * weights).sum() / weights.sum()

        return jax.grad(label_loss)(params)

    for k in (0, 3):
        expected = label_loss_gradient(variables["params"], k)
        for layer in ("stem", "body"):
            np.testing.assert_allclose(
                grads["backbone"][layer]["kernel"][k], expected[layer]["kernel"],
                rtol=1e-4, atol=1e-7,
            )
    assert "head" not in grads["backbone"]
    np.testing.assert_array_equal(grads["features"][:, 2], 0.0)  # padding row: no gradient


# --------------------------------------------------------------------------------------
# The hook, jit and errors
# --------------------------------------------------------------------------------------


def test_diagnostics_run_under_jit():
    model, variables = _model_and_variables("gmp")
    images, labels = _batch(seed=2)
    jitted = jax.jit(functools.partial(gradflow.gradient_diagnostics, model, task="multilabel"))
    stats = jitted(variables, images, labels, weights=jnp.ones((3,)))
    assert all(value.shape == () and np.isfinite(value) for value in stats.values())
    np.testing.assert_allclose(stats["coverage"], 1 / 9, rtol=1e-6)
    assert float(stats["collision_rate"]) == 1.0 and float(stats["collision_triples"]) > 0
    assert -1.0 <= float(stats["conflict_mean"]) <= 1.0
    assert 0.0 < float(stats["early_coverage"]) <= 1.0


def test_training_hook_on_the_project_cnn_with_classification_labels():
    from gapjax import models

    model = models.get("cnn", num_classes=NUM_LABELS, widths=(4,), depth=1, pool="gap")
    images, _ = _batch()
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), images)
    batch = {"image": images, "label": jnp.array([0, 2, 3]), "weight": jnp.array([1, 1, 0])}
    stats = gradflow.training_diagnostics(model, variables, batch, "classification")
    assert set(stats) == {
        "coverage", "entropy", "gini", "early_coverage", "early_entropy", "early_gini",
        "conflict_mean", "conflict_negative", "collision_rate", "collision_triples",
    }
    assert all(isinstance(value, float) and np.isfinite(value) for value in stats.values())
    assert stats["coverage"] == 1.0
    assert stats["collision_triples"] == 0.0  # one positive label per image: no pairs


def test_user_errors_name_the_field_and_choices():
    model, variables = _model_and_variables("gmp")
    images, labels = _batch()
    with pytest.raises(ValueError, match=r"task 'graph'.*classification, multilabel"):
        gradflow.training_diagnostics(model, variables, {"image": images, "label": labels}, "graph")
    with pytest.raises(ValueError, match="no 'label' entry"):
        gradflow.training_diagnostics(model, variables, {"image": images}, "multilabel")
    with pytest.raises(ValueError, match="no 'early' perturbation"):
        gradflow.per_label_gradients(_NoEarlyTap(), variables, images, labels, "multilabel")


class _NoEarlyTap(_TinyClassifier):
    def backbone(self, x, train: bool = False):
        x = nn.relu(nn.Conv(3, (3, 3), name="stem")(x))
        return nn.relu(nn.Conv(4, (3, 3), padding="VALID", name="body")(x))


def test_experiment_verdict_follows_the_numbers():
    from gapjax.experiments import gradient_flow

    def row(coverage, collision, conflict, negative):
        return {"coverage": coverage, "entropy": 0.0, "gini": 0.0, "early_coverage": 0.4,
                "conflict_mean": conflict, "conflict_negative": negative,
                "collision_rate": collision, "collision_triples": 10.0, "positions": 64}

    rows = {"gap": row(1.0, 0.0, 0.2, 0.1), "gmp": row(1 / 64, 1.0, 0.0, 0.5)}
    holds, parts, verdict = gradient_flow.judge(rows)
    assert holds and all(parts.values()) and verdict.startswith("The claim holds.")
    rows["gap"]["conflict_negative"] = 0.6
    holds, parts, verdict = gradient_flow.judge(rows)
    assert not holds and not parts["gap_conflicts_averaged_out"]
    assert "gap_conflicts_averaged_out" in verdict and "0.600" in verdict
    records = [{"step": 40, "train/grad_coverage": 0.5}, {"step": 40, "eval/map": 0.9},
               {"step": 80, "train/grad_coverage": 0.25}, {"step": 40, "train/grad_coverage": 0.4}]
    assert gradient_flow.training_curves(records) == ([40, 80], [0.4, 0.25])
