"""Faithfulness metrics: known answers on a constructed model, ROAD's imputation against
pytorch-grad-cam's, and a map equal to the true object mask beating a random map on every
metric."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.torch_reference import import_grad_cam

from gapjax.cam import faithfulness

SIZE = 24


def object_model(images):
    """Two classes; class 1's logit rewards bright (> 0.6) pixels and penalises dim ones,
    so its score depends on the object pixels and on the background in known ways."""
    x = images[..., 0]
    bright = jax.nn.relu(x - 0.6).mean(axis=(1, 2))
    dim = (jnp.abs(x) * (x < 0.6)).mean(axis=(1, 2))
    logit = 40.0 * (bright - 0.5 * dim)
    return jnp.stack([jnp.zeros_like(logit), logit], axis=-1)


def object_images(batch=4, seed=0):
    """Noise (std 0.3) with one bright 12x12 square at a random place; its mask."""
    rng = np.random.default_rng(seed)
    images = rng.normal(scale=0.3, size=(batch, SIZE, SIZE, 1)).astype(np.float32)
    masks = np.zeros((batch, SIZE, SIZE), np.float32)
    for b in range(batch):
        top, left = rng.integers(0, SIZE - 12, size=2)
        masks[b, top:top + 12, left:left + 12] = 1.0
    images[..., 0] = np.where(masks > 0, 1.0, images[..., 0])
    return images, masks


def test_a_map_equal_to_the_true_mask_beats_a_random_map_on_every_metric():
    images, masks = object_images()
    random_maps = np.random.default_rng(1).uniform(size=masks.shape).astype(np.float32)
    targets = jnp.ones(len(images), jnp.int32)
    key = jax.random.key(0)
    true = faithfulness.evaluate(object_model, images, masks, targets, key, steps=8,
                                 percentiles=(20, 50, 80))
    random = faithfulness.evaluate(object_model, images, random_maps, targets, key, steps=8,
                                   percentiles=(20, 50, 80))
    assert set(true) == set(faithfulness.METRICS)
    for name, higher_is_better in faithfulness.METRICS.items():
        ours, theirs = float(true[name].mean()), float(random[name].mean())
        assert (ours > theirs) if higher_is_better else (ours < theirs), (name, ours, theirs)
    assert float(true["increase"].mean()) == 1.0 and float(true["average_drop"].max()) == 0.0


def test_deletion_and_insertion_curves_have_known_end_points_and_areas():
    images, masks = object_images(batch=2)
    targets = jnp.array([1, 0])
    scores = faithfulness.target_scores(object_model, jnp.asarray(images), targets)
    deletion = np.asarray(faithfulness.deletion_curve(object_model, images, masks, targets,
                                                      steps=4))
    assert deletion.shape == (2, 5)
    np.testing.assert_allclose(deletion[:, 0], scores, rtol=1e-6)
    np.testing.assert_allclose(deletion[:, -1], 0.5, rtol=1e-6)  # all-zero image: logit 0
    insertion = np.asarray(faithfulness.insertion_curve(object_model, images, masks, targets,
                                                        steps=4))
    np.testing.assert_allclose(insertion[:, -1], scores, rtol=1e-6)
    blurred = faithfulness.blur(jnp.asarray(images))
    np.testing.assert_allclose(insertion[:, 0],
                               faithfulness.target_scores(object_model, blurred, targets),
                               rtol=1e-5)
    np.testing.assert_allclose(faithfulness.area_under_curve(jnp.array([[0.0, 0.5, 1.0]])),
                               [0.5])
    # the first quarter of the steps removes exactly the 144 object pixels (ranked first)
    ranks = np.asarray(faithfulness.saliency_ranks(masks))
    assert set(ranks[0][masks[0] > 0].ravel()) == set(range(144))


def test_linear_imputation_reproduces_a_linear_ramp_and_equals_pytorch_grad_cam():
    rows, cols = np.meshgrid(np.arange(10.0), np.arange(12.0), indexing="ij")
    ramp = (0.3 * rows - 0.2 * cols + 1.0).astype(np.float32)[None, :, :, None]
    removed = np.zeros((1, 10, 12), bool)
    removed[0, 3:7, 4:9] = True  # an interior hole: the harmonic fill of a plane is the plane
    filled = faithfulness.noisy_linear_imputation(ramp, removed, jax.random.key(0), noise=0.0)
    np.testing.assert_allclose(filled, ramp, atol=1e-4)

    import_grad_cam()
    import torch
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer

    rng = np.random.default_rng(3)
    image = rng.normal(size=(10, 12, 3)).astype(np.float32)
    keep = rng.uniform(size=(10, 12)) > 0.6  # 60 % removed, including border pixels
    theirs = NoisyLinearImputer(noise=0.0)(torch.from_numpy(image.transpose(2, 0, 1).copy()),
                                           torch.from_numpy(keep.astype(np.float32)))
    ours = faithfulness.noisy_linear_imputation(image[None], ~keep[None], jax.random.key(0),
                                                noise=0.0)
    np.testing.assert_allclose(np.asarray(ours)[0], theirs.numpy().transpose(1, 2, 0),
                               atol=1e-4)
    noisy = faithfulness.noisy_linear_imputation(image[None], ~keep[None], jax.random.key(1),
                                                 noise=0.01)
    spread = np.asarray(noisy - ours)[0][~keep]
    assert 0.005 < spread.std() < 0.02 and np.all(np.asarray(noisy)[0][keep] == image[keep])


def test_road_removes_the_percentile_share_and_confidence_change_is_exact():
    images, masks = object_images(batch=2)
    targets = jnp.array([1, 1])
    scores = faithfulness.road(object_model, images, masks, targets, jax.random.key(0),
                               percentiles=(50,))
    assert scores.morf.shape == scores.lerf.shape == (2, 1) and scores.combined.shape == (2,)
    np.testing.assert_allclose(scores.combined, (scores.lerf - scores.morf)[:, 0] / 2)
    keep = np.asarray(faithfulness._percentile_keep(jnp.arange(10.0)[None, None], 30.0))
    np.testing.assert_array_equal(keep[0, 0], np.arange(10) < 2.7)  # numpy's percentile

    ones = np.ones_like(masks)
    change = faithfulness.confidence_change(object_model, images, ones, targets)
    np.testing.assert_array_equal(change.drop, 0.0)
    np.testing.assert_array_equal(change.increase, 0.0)
    zeros = faithfulness.confidence_change(object_model, images, np.zeros_like(masks), targets)
    plain = np.asarray(faithfulness.target_scores(object_model, jnp.asarray(images), targets))
    np.testing.assert_allclose(zeros.drop, np.maximum(plain - 0.5, 0) / plain, rtol=1e-5)


def test_clear_errors():
    images, masks = object_images(batch=1)
    with pytest.raises(ValueError, match=r"maps must have shape \[batch, H, W\]"):
        faithfulness.deletion_auc(object_model, images, masks[:, :4], jnp.array([1]))
    with pytest.raises(ValueError, match="baseline='black' is not one of"):
        faithfulness.deletion_auc(object_model, images, masks, jnp.array([1]), baseline="black")
    with pytest.raises(ValueError, match="score='prob' is not one of"):
        faithfulness.target_scores(object_model, images, jnp.array([1]), score="prob")
