"""Class activation maps: exact additivity, Grad-CAM, targets, resizing, normalisation."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gapjax import cam, pooling

NUM_CLASSES = 3


class TinyHead(nn.Module):
    """A GAP-style head as the models build it: pool, then Dense ``classifier``."""

    pool: str = "gap"
    num_classes: int = NUM_CLASSES

    @nn.compact
    def __call__(self, features):
        if self.pool in ("weighted", "attention"):
            pooled, weights = pooling.POOLS.get(self.pool)(name="pool")(
                features, return_weights=True
            )
            self.sow("intermediates", "pool_weights", weights)
        else:
            pooled = pooling.POOLS.get(self.pool)(name="pool")(features)
        return nn.Dense(self.num_classes, name="classifier")(pooled)


class TinyFCHead(nn.Module):
    num_classes: int = NUM_CLASSES

    @nn.compact
    def __call__(self, features):
        flat = features.reshape(features.shape[0], -1)
        return nn.Dense(self.num_classes, name="classifier")(flat)


class TinyNet(nn.Module):
    """Conv trunk with the feature switch (docs/ARCHITECTURE.md), stride 2."""

    pool: str = "gap"
    head: str = "gap"
    channels: int = 5

    @nn.compact
    def __call__(self, x, train: bool = False):
        features = nn.relu(nn.Conv(self.channels, (3, 3), strides=2, name="conv")(x))
        self.sow("intermediates", "features", features)
        head = TinyHead(self.pool, name="head") if self.head == "gap" else TinyFCHead(name="head")
        return head(features)


@functools.cache
def _model(pool="gap", head="gap", shape=(3, 12, 20, 2)):
    """A small model, its variables and non-square images (built once per argument set)."""
    model = TinyNet(pool=pool, head=head)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=shape), jnp.float32)
    # Random values in the initialised structure, drawn with NumPy: no RNG kernels to
    # compile, and non-zero biases make "bias is not in the maps" a real check.
    structure = jax.eval_shape(model.init, jax.random.key(1), images)
    variables = jax.tree.map(
        lambda leaf: jnp.asarray(rng.normal(size=leaf.shape) * 0.5, leaf.dtype), structure
    )
    if pool == "gem":  # GeM's exponent keeps its usual value
        variables["params"]["head"]["pool"]["p"] = jnp.float32(3.0)
    return model, variables, images


def _features_and_logits(model, variables, images):
    logits, state = jax.jit(
        functools.partial(model.apply, mutable=["intermediates"])
    )(variables, images)
    return state["intermediates"], logits


@functools.cache
def _map_fn(model, method="auto", **options):
    return cam.make_map_fn(model, method, **options)


def _maps(model, variables, images, targets=None, method="auto", **options):
    return _map_fn(model, method, **options)(variables, images, targets)


# ----------------------------------------------------------------------------- additivity


@settings(max_examples=20, deadline=None)
@given(shape=st.sampled_from([(2, 3, 5, 4, 3), (1, 7, 1, 6, 1)]), seed=st.integers(0, 2**16))
def test_cam_mean_plus_bias_is_gap_logits(shape, seed):
    batch, height, width, channels, classes = shape
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(batch, height, width, channels)).astype(np.float32) * 3
    kernel = rng.normal(size=(channels, classes)).astype(np.float32)
    bias = rng.normal(size=classes).astype(np.float32)
    # float64 reference of what a GAP head computes
    logits = features.astype(np.float64).mean(axis=(1, 2)) @ kernel + bias
    maps = np.asarray(cam.class_activation_map(features, kernel, bias))
    assert maps.shape == (batch, height, width, classes)
    np.testing.assert_allclose(maps.mean(axis=(1, 2)) + bias, logits, rtol=1e-5, atol=1e-5)


def test_cam_of_a_model_adds_up_to_its_logits_on_non_square_maps():
    model, variables, images = _model("gap")
    intermediates, logits = _features_and_logits(model, variables, images)
    features = intermediates["features"][0]
    assert features.shape[1:3] == (6, 10)
    maps = cam.class_activation_map(features, **variables["params"]["head"]["classifier"])
    bias = variables["params"]["head"]["classifier"]["bias"]
    np.testing.assert_allclose(maps.mean(axis=(1, 2)) + bias, logits, atol=1e-5)


@pytest.mark.parametrize("pool", ["weighted", "attention"])
def test_contribution_maps_sum_to_logit_minus_bias(pool):
    model, variables, images = _model(pool)
    if pool == "weighted":  # non-uniform learned weights, so the check is not just GAP's
        logits_param = variables["params"]["head"]["pool"]["logits"]
        bumpy = np.random.default_rng(7).normal(size=logits_param.shape).astype(np.float32)
        variables = {"params": {**variables["params"], "head": {
            **variables["params"]["head"], "pool": {"logits": bumpy}}}}
    intermediates, logits = _features_and_logits(model, variables, images)
    weights = intermediates["head"]["pool_weights"][0]
    assert float(jnp.std(weights)) > 1e-3
    classifier = variables["params"]["head"]["classifier"]
    maps = cam.contribution_map(intermediates["features"][0], weights, **classifier)
    np.testing.assert_allclose(maps.sum(axis=(1, 2)) + classifier["bias"], logits, atol=1e-5)


def test_gmp_map_sums_to_logits_and_lives_on_arg_max_positions():
    rng = np.random.default_rng(3)
    features = rng.normal(size=(2, 4, 7, 3)).astype(np.float32)
    kernel = rng.normal(size=(3, 2)).astype(np.float32)
    maps = jax.jit(cam.gmp_contribution_map)(features, kernel)
    expected = np.asarray(features).max(axis=(1, 2)) @ np.asarray(kernel)
    np.testing.assert_allclose(np.asarray(maps).sum(axis=(1, 2)), expected, atol=1e-5)
    flat = np.asarray(features).reshape(2, -1, 3)
    nonzero = np.abs(np.asarray(maps).reshape(2, -1, 2)).sum(-1) > 0
    for b in range(2):
        assert set(np.flatnonzero(nonzero[b])) <= set(flat[b].argmax(axis=0))


# ----------------------------------------------------------------------------- Grad-CAM


def test_grad_cam_is_cam_over_positions_for_gap_and_linear_head():
    model, variables, images = _model("gap")
    options = {"resize": None, "normalize": False}
    targets = jnp.array([0, 2, 1])
    exact = _maps(model, variables, images, targets, method="cam", **options)
    raw = _maps(model, variables, images, targets, "grad_cam", relu=False, **options)
    positions = exact.maps.shape[1] * exact.maps.shape[2]
    np.testing.assert_allclose(raw.maps * positions, exact.maps, rtol=1e-4, atol=1e-5)
    assert float(jnp.abs(exact.maps).max()) > 1e-3
    relu = _maps(model, variables, images, targets, "grad_cam", **options)
    np.testing.assert_allclose(relu.maps * positions, jax.nn.relu(exact.maps), atol=1e-5)
    np.testing.assert_allclose(raw.logits, exact.logits, atol=1e-6)


def test_grad_cam_of_a_gem_head_matches_an_independent_gradient():
    model, variables, images = _model("gem")
    assert cam.resolve_method(model) == "grad_cam"
    targets = jnp.array([2, 0, 1])
    out = _maps(model, variables, images, targets, resize=None, normalize=False)
    intermediates, _ = _features_and_logits(model, variables, images)
    features = intermediates["features"][0]
    head = variables["params"]["head"]

    def target_logit(x, b):
        pooled = pooling.gem(x[None], head["pool"]["p"])
        logits = pooled @ head["classifier"]["kernel"] + head["classifier"]["bias"]
        return logits[0, targets[b]]

    @jax.jit
    def reference(features):
        gradients = jax.vmap(jax.grad(target_logit))(features, jnp.arange(3))
        return jax.nn.relu((features * gradients.mean(axis=(1, 2), keepdims=True)).sum(-1))

    np.testing.assert_allclose(out.maps, reference(features), rtol=1e-4, atol=1e-6)


def test_grad_cam_pure_function_and_fc_head():
    model, variables, images = _model(head="fc")
    assert cam.available_methods(model) == ("grad_cam",)
    out = _maps(model, variables, images)
    assert out.maps.shape == images.shape[:3]
    assert np.isfinite(np.asarray(out.maps)).all()
    np.testing.assert_array_equal(out.targets, jnp.argmax(out.logits, -1))

    rng = np.random.default_rng(5)
    features = rng.normal(size=(2, 3, 4, 6)).astype(np.float32)
    kernel = rng.normal(size=(6, 4)).astype(np.float32)
    targets = jnp.array([3, 1])
    maps, logits = jax.jit(lambda f: cam.grad_cam(lambda x: pooling.gap(x) @ kernel, f, targets))(
        features)
    expected = jax.jit(lambda f: jax.nn.relu(
        cam.select_targets(cam.class_activation_map(f, kernel), targets)) / 12)(features)
    np.testing.assert_allclose(maps, expected, atol=1e-6)
    assert logits.shape == (2, 4)


# ----------------------------------------------------------------------------- targets


@pytest.mark.parametrize("method", ["cam", "contribution", "grad_cam"])
def test_batch_of_different_targets_equals_one_image_at_a_time(method):
    model, variables, images = _model("gap")
    targets = jnp.array([2, 0, 1])
    batched = _maps(model, variables, images, targets, method=method)
    np.testing.assert_array_equal(batched.targets, targets)
    # The same images with one class for the whole batch, class by class.
    per_class = [_maps(model, variables, images, jnp.full(3, k), method=method).maps
                 for k in range(NUM_CLASSES)]
    for b in range(3):
        np.testing.assert_allclose(batched.maps[b], per_class[int(targets[b])][b], atol=1e-6)
    assert float(jnp.abs(per_class[0][1] - per_class[1][1]).max()) > 1e-3


def test_select_targets_picks_each_images_class():
    maps = jnp.arange(2 * 2 * 3 * 4, dtype=jnp.float32).reshape(2, 2, 3, 4)
    chosen = cam.select_targets(maps, jnp.array([3, 0]))
    np.testing.assert_array_equal(chosen[0], maps[0, ..., 3])
    np.testing.assert_array_equal(chosen[1], maps[1, ..., 0])
    with pytest.raises(ValueError, match="targets must have shape"):
        cam.select_targets(maps, jnp.array([1, 2, 3]))


# ----------------------------------------------------------------------------- resize, norm


def test_resizing_keeps_orientation_of_non_square_maps():
    small = np.zeros((1, 4, 8), np.float32)
    small[0, 0, 7] = 1.0  # top-right corner
    for method in ("bilinear", "cubic"):
        big = np.asarray(cam.resize_maps(small, (16, 32), method))
        assert big.shape == (1, 16, 32)
        row, col = np.unravel_index(big[0].argmax(), big[0].shape)
        assert row < 4 and col >= 28, (method, row, col)
    model, variables, images = _model("gap")
    assert _maps(model, variables, images).maps.shape == (3, 12, 20)


def test_normalize_maps_constant_and_non_finite_give_zeros_never_nan():
    maps = jnp.stack([
        jnp.full((3, 5), 2.5),
        jnp.arange(15.0).reshape(3, 5) - 4,
        jnp.zeros((3, 5)).at[1, 1].set(jnp.nan),
    ])
    normed = np.asarray(jax.jit(cam.normalize_maps)(maps))
    np.testing.assert_array_equal(normed[0], 0)
    np.testing.assert_array_equal(normed[2], 0)
    assert normed[1].min() == 0 and normed[1].max() == 1
    np.testing.assert_allclose(normed[1], np.arange(15.0).reshape(3, 5) / 14, atol=1e-6)
    gradient = jax.jit(jax.grad(lambda m: cam.normalize_maps(m).sum()))(maps[:2])
    assert np.isfinite(np.asarray(gradient)).all()


def test_constant_features_give_zero_maps_for_every_method():
    model, variables, images = _model("gap")
    images = jnp.zeros_like(images)  # conv of zeros is its bias: a constant feature map
    for method in ("cam", "grad_cam"):
        maps = np.asarray(_maps(model, variables, images, method=method).maps)
        assert np.isfinite(maps).all() and np.abs(maps).max() == 0


# ----------------------------------------------------------------------------- errors


def test_clear_errors_for_bad_methods_and_shapes():
    model, _, _ = _model("gem")
    with pytest.raises(ValueError, match="'nope' is not one of"):
        cam.resolve_method(model, "nope")
    with pytest.raises(ValueError, match=r"'cam' does not apply.*pool='gem'.*grad_cam"):
        cam.resolve_method(model, "cam")
    assert cam.resolve_method(TinyNet(pool="gmp")) == "grad_cam"
    assert cam.resolve_method(TinyNet(pool="gmp"), "gmp") == "gmp"
    with pytest.raises(ValueError, match="kernel must have shape"):
        cam.class_activation_map(jnp.zeros((1, 2, 2, 3)), jnp.zeros((4, 2)))
    with pytest.raises(ValueError, match="weights must have shape"):
        cam.contribution_map(jnp.zeros((1, 2, 2, 3)), jnp.zeros((1, 4)), jnp.zeros((3, 2)))
    with pytest.raises(ValueError, match="resize method 'area'"):
        cam.resize_maps(jnp.zeros((1, 2, 2)), (4, 4), "area")


# ----------------------------------------------------------------------------- drawing


def test_overlay_grid_is_written_and_boxes_sit_on_pixel_edges(tmp_path):
    patch = cam.box_patch([0.25, 0.5, 0.75, 1.0], (8, 16), edgecolor="lime")
    assert (patch.get_x(), patch.get_y(), patch.get_width(), patch.get_height()) == (
        7.5, 1.5, 8.0, 4.0)
    images = np.random.default_rng(0).normal(size=(3, 8, 16, 1)).astype(np.float32)
    maps = np.asarray(jax.jit(cam.normalize_maps)(images[..., 0]))
    out = cam.draw_overlays(images, maps, titles=["a", "b", "c"],
                            true_boxes=np.array([[[0.25, 0.5, 0.75, 1.0]]] * 3),
                            predicted_boxes=[np.array([[0.0, 0.0, 0.5, 0.5]])] * 3,
                            columns=2, out=str(tmp_path / "grid.png"))
    with open(out, "rb") as png:
        assert png.read(8) == b"\x89PNG\r\n\x1a\n"
