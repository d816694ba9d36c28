"""Hide-and-Seek, CutMix and ADL; the WSOL backbone options of ResNet and VGG."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gapjax import models
from gapjax import wsol_methods as wm
from gapjax.tasks import Classification


def test_hide_and_seek_hides_whole_patches_and_jits():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(10, 9, 3)).astype(np.float32) + 5.0  # no zero pixels
    uniforms = rng.random(wm.patch_grid(10, 9, 4))
    assert uniforms.shape == (3, 3)
    hidden = wm.hide_and_seek(image, uniforms, 4, 0.5)
    for row in range(3):
        for column in range(3):
            patch = hidden[4 * row:4 * row + 4, 4 * column:4 * column + 4]
            if uniforms[row, column] <= 0.5:
                assert not patch.any()
            else:
                assert np.array_equal(patch, image[4 * row:4 * row + 4, 4 * column:4 * column + 4])
    jitted = jax.jit(functools.partial(wm.hide_and_seek, grid_size=4, drop_rate=0.5, xp=jnp))
    assert np.array_equal(np.asarray(jitted(image, uniforms)), hidden)
    assert wm.hide_and_seek(image, uniforms, 0) is image  # grid 0: off


def test_cutmix_box_share_and_partner_labels():
    rng = np.random.default_rng(1)
    images = rng.normal(size=(4, 16, 12, 2)).astype(np.float32)
    labels = np.array([0, 1, 2, 3])
    permutation = np.array([2, 3, 0, 1])
    mixed, partner, share = wm.cutmix(images, labels, permutation, 0.75, 8, 6)
    # sqrt(1 - 0.75) = 0.5: an 8 x 6 box centred at (8, 6): rows 4..11, columns 3..8.
    assert wm.cutmix_box(16, 12, 0.75, 8, 6) == (4, 3, 12, 9)
    assert np.array_equal(mixed[:, 4:12, 3:9], images[permutation][:, 4:12, 3:9])
    outside = np.ones((16, 12), bool)
    outside[4:12, 3:9] = False
    assert np.array_equal(mixed[:, outside], images[:, outside])
    assert partner.tolist() == [2, 3, 0, 1]
    np.testing.assert_allclose(share, 1 - 48 / 192)
    # A box clipped at the border keeps a larger share.
    _, _, clipped = wm.cutmix(images, labels, permutation, 0.75, 0, 0)
    np.testing.assert_allclose(clipped, 1 - (4 * 3) / 192)
    jitted = jax.jit(functools.partial(wm.cutmix, xp=jnp))
    got = jitted(images, labels, permutation, 0.75, 8, 6)
    assert np.array_equal(np.asarray(got[0]), mixed)
    np.testing.assert_allclose(np.asarray(got[2]), share)
    # The task owns the mixed loss: share * l(label) + (1 - share) * l(partner's label).
    task = Classification(num_classes=3)
    logits = jnp.array([[2.0, 0.0, -1.0]])
    mixed = task.training_losses(logits, {"label": jnp.array([0]), "label_mix": jnp.array([2]),
                                          "mix": jnp.array([0.25])})
    np.testing.assert_allclose(mixed, 0.25 * task.losses(logits, jnp.array([0]))
                               + 0.75 * task.losses(logits, jnp.array([2])), rtol=1e-6)


def test_adl_selects_importance_or_drop_mask():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 5, 5, 4)), jnp.float32)
    rngs = {"dropout": jax.random.key(0)}
    assert jnp.array_equal(wm.ADL().apply({}, x, train=False), x)
    attention = x.mean(axis=-1, keepdims=True)
    importance = wm.ADL(drop_rate=0.0).apply({}, x, train=True, rngs=rngs)
    np.testing.assert_allclose(importance, x * jax.nn.sigmoid(attention), rtol=1e-6)
    dropped = wm.ADL(drop_rate=1.0, threshold=0.9).apply({}, x, train=True, rngs=rngs)
    peak = attention.max(axis=(1, 2, 3), keepdims=True)
    np.testing.assert_allclose(dropped, x * (attention < 0.9 * peak), rtol=1e-6)
    with pytest.raises(ValueError, match=r"drop_rate=1\.5"):
        wm.ADL(drop_rate=1.5).apply({}, x, train=True, rngs=rngs)


def _feature_shape(model, size):
    """Feature-map shape and parameter tree of ``model`` on ``size`` images (shapes only)."""
    images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)
    features = jax.eval_shape(
        lambda v, x: model.apply(v, x, method="forward_features"), variables, images)
    return features.shape, variables


def test_wsol_backbones_keep_larger_maps():
    common = dict(num_classes=3, base_width=4, head="gap", pool="gap")
    shape, _ = _feature_shape(models.get("resnet50", stage_strides=(1, 2, 2, 1), **common), 224)
    assert shape[1:3] == (14, 14)  # the reference's ResNet-50 CAM map
    shape, _ = _feature_shape(models.get("resnet50", stage_strides=(1, 2, 1, 1), **common), 224)
    assert shape[1:3] == (28, 28)  # its larger final feature map
    vgg = models.get("vgg16", pool_after=(1, 2, 3, 4), extra_convs=(1024,), **common)
    shape, variables = _feature_shape(vgg, 224)
    assert shape == (1, 14, 14, 1024) and "conv6_1" in variables["params"]
    large = models.get("vgg16", pool_after=(1, 2, 3), extra_convs=(1024,), **common)
    assert _feature_shape(large, 224)[0][1:3] == (28, 28)


def test_adl_in_the_backbone_has_no_parameters_and_acts_only_in_training():
    common = dict(num_classes=3, base_width=4, head="gap", pool="gap",
                  stage_strides=(1, 2, 2, 1))
    plain = models.get("resnet50", **common)
    adl = models.get("resnet50", adl_blocks=wm.ADL_BLOCKS["resnet"], **common)
    plain_shape, plain_variables = _feature_shape(plain, 64)
    adl_shape, adl_variables = _feature_shape(adl, 64)
    assert plain_shape == adl_shape
    assert jax.tree.structure(adl_variables) == jax.tree.structure(plain_variables)
    images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)

    def train_forward(model):
        return jax.eval_shape(lambda v, x: model.apply(v, x, train=True,
                                                       mutable=["batch_stats"]),
                              plain_variables, images)

    train_forward(plain)  # no randomness in the plain backbone
    with pytest.raises(Exception, match="dropout"):  # ADL draws from the dropout stream
        train_forward(adl)
    vgg = models.get("vgg16", pool_after=(1, 2, 3, 4), adl_blocks=wm.ADL_BLOCKS["vgg"],
                     num_classes=3, base_width=4, head="gap", pool="gap")
    shape, vgg_variables = _feature_shape(vgg, 32)
    assert shape == (1, 2, 2, 32) and not any("adl" in k for k in vgg_variables["params"])
    with pytest.raises(Exception, match="dropout"):
        jax.eval_shape(lambda v, x: vgg.apply(v, x, train=True),
                       vgg_variables, jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
