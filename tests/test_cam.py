"""Class activation maps: exact additivity, the gradient / perturbation family, targets,
smoothing, resizing, normalisation, errors.

The model here is a tiny classifier written against the model contract directly
(forward_features / forward_head / head_class_maps / head_contributions / map_kinds), so
these tests pin what gapjax.cam asks of a model; tests/test_cam_reference.py checks the
maps of a real ResNet against pytorch-grad-cam.
"""

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
from gapjax.layers import FCHead, GAPHead, head_map_kinds, project

NUM_CLASSES = 3
GRADIENT_METHODS = ("grad_cam", "hires_cam", "grad_cam_pp", "xgrad_cam", "layer_cam")


class TinyNet(nn.Module):
    """Stride-2 conv trunk + ``head`` (gapjax's pooling head, or a flatten + Dense head),
    following the model contract."""

    pool: str = "gap"
    head_kind: str = "gap"
    channels: int = 5
    num_classes: int = NUM_CLASSES

    def setup(self):
        self.conv = nn.Conv(self.channels, (3, 3), strides=2)
        self.head = (FCHead(self.num_classes, widths=(), dropout=0.0) if self.head_kind == "fc"
                     else GAPHead(self.num_classes, self.pool))

    @property
    def map_kinds(self):
        return () if self.head_kind == "fc" else head_map_kinds(self.pool)

    def __call__(self, x, train=False):
        return self.forward_head(self.forward_features(x, train), train)

    def forward_features(self, x, train=False):
        return nn.relu(self.conv(x))

    def forward_head(self, features, train=False):
        return self.head(features)

    def head_class_maps(self, features):
        return self.head(features, output="class_maps")

    def head_contributions(self, features):
        return self.head(features, output="contributions")


@functools.cache
def _model(pool="gap", head="gap", shape=(3, 12, 20, 2)):
    """A small model, its variables and non-square images (built once per argument set)."""
    model = TinyNet(pool=pool, head_kind=head)
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


def _features(model, variables, images):
    return jax.jit(functools.partial(model.apply, method="forward_features"))(variables, images)


def _classifier(variables):
    return variables["params"]["head"]["classifier"]


@functools.cache
def _map_fn(model, method="auto", **options):
    return cam.make_map_fn(model, method, **options)


def _maps(model, variables, images, targets=None, method="auto", **options):
    return _map_fn(model, method, **options)(variables, images, targets)


RAW = {"resize": None, "normalize": False}


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
    out = _maps(model, variables, images, jnp.array([0, 1, 2]), method="cam", **RAW)
    assert out.maps.shape == (3, 6, 10)
    bias = _classifier(variables)["bias"]
    picked = np.asarray(out.logits)[np.arange(3), [0, 1, 2]]
    np.testing.assert_allclose(out.maps.mean(axis=(1, 2)) + bias[:3], picked, atol=1e-5)


@pytest.mark.parametrize("pool", ["weighted", "attention", "gmp"])
def test_contribution_maps_sum_to_logit_minus_bias(pool):
    model, variables, images = _model(pool)
    if pool == "weighted":  # non-uniform learned weights, so the check is not just GAP's
        logits_param = variables["params"]["head"]["pool"]["logits"]
        bumpy = np.random.default_rng(7).normal(size=logits_param.shape).astype(np.float32)
        variables = {"params": {**variables["params"], "head": {
            **variables["params"]["head"], "pool": {"logits": bumpy}}}}
    targets = jnp.array([[0, 1, 2]] * 3)  # every class of every image at once
    out = _maps(model, variables, images, targets, method="contribution", **RAW)
    assert out.maps.shape == (3, 3, 6, 10)
    np.testing.assert_allclose(out.maps.sum(axis=(2, 3)) + _classifier(variables)["bias"],
                               out.logits, atol=1e-5)
    expected = "grad_cam" if pool == "gmp" else "contribution"
    assert cam.resolve_method(model) == expected


def test_gmp_map_sums_to_logits_and_lives_on_arg_max_positions():
    rng = np.random.default_rng(3)
    features = rng.normal(size=(2, 4, 7, 3)).astype(np.float32)
    kernel = rng.normal(size=(3, 2)).astype(np.float32)
    shares, _ = pooling.GlobalMaxPool().apply({}, features, method="contributions")
    maps = project(shares, kernel)
    expected = np.asarray(features).max(axis=(1, 2)) @ np.asarray(kernel)
    np.testing.assert_allclose(np.asarray(maps).sum(axis=(1, 2)), expected, atol=1e-5)
    flat = np.asarray(features).reshape(2, -1, 3)
    nonzero = np.abs(np.asarray(maps).reshape(2, -1, 2)).sum(-1) > 0
    for b in range(2):
        assert set(np.flatnonzero(nonzero[b])) <= set(flat[b].argmax(axis=0))


# ----------------------------------------------------------------------------- gradients


def test_gradient_methods_have_their_closed_forms_for_a_gap_linear_head():
    """For logits = mean_i(A_i) W + b the gradient is W_k / N at every position, so each
    method has a closed form in A and W."""
    model, variables, images = _model("gap")
    targets = jnp.array([0, 2, 1])
    features = np.asarray(_features(model, variables, images), np.float64)
    kernel = np.asarray(_classifier(variables)["kernel"], np.float64)
    positions = features.shape[1] * features.shape[2]
    w = kernel[:, np.asarray(targets)].T[:, None, None, :] / positions  # [B, 1, 1, C]
    total = features.sum(axis=(1, 2), keepdims=True)
    pp_weights = np.maximum(w, 0) * positions * w**2 / (2 * w**2 + total * w**3 + 1e-6)
    expected = {
        "grad_cam": (w * features).sum(-1),
        "hires_cam": (w * features).sum(-1),
        "xgrad_cam": (w * features).sum(-1),  # sum_i A_i / sum_j A_j = 1
        "layer_cam": (np.maximum(w, 0) * features).sum(-1),
        "grad_cam_pp": (pp_weights * features).sum(-1),
    }
    exact = _maps(model, variables, images, targets, method="cam", **RAW).maps
    np.testing.assert_allclose(exact / positions, expected["grad_cam"], rtol=1e-4, atol=1e-6)
    for method, reference in expected.items():
        raw = _maps(model, variables, images, targets, method, relu=False, **RAW)
        np.testing.assert_allclose(raw.maps, reference, rtol=1e-4, atol=1e-6, err_msg=method)
        relu = _maps(model, variables, images, targets, method, **RAW)
        np.testing.assert_allclose(relu.maps, np.maximum(reference, 0), rtol=1e-4, atol=1e-6)
        assert float(np.abs(reference).max()) > 1e-3
    # HiResCAM is a first-order Taylor split: its positions sum to logit - bias here.
    hires = _maps(model, variables, images, targets, "hires_cam", relu=False, **RAW)
    logits = np.asarray(hires.logits)[np.arange(3), np.asarray(targets)]
    bias = np.asarray(_classifier(variables)["bias"])[np.asarray(targets)]
    np.testing.assert_allclose(np.asarray(hires.maps).sum(axis=(1, 2)), logits - bias,
                               rtol=1e-4, atol=1e-5)


def test_grad_cam_of_a_gem_head_matches_an_independent_gradient():
    model, variables, images = _model("gem")
    assert cam.resolve_method(model) == "grad_cam"
    targets = jnp.array([2, 0, 1])
    out = _maps(model, variables, images, targets, **RAW)
    features = _features(model, variables, images)
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
    assert cam.available_methods(model) == cam.METHODS[3:-1]  # no attention: no rollout
    assert cam.resolve_method(model) == "grad_cam"
    out = _maps(model, variables, images)
    assert out.maps.shape == images.shape[:3]
    assert np.isfinite(np.asarray(out.maps)).all()
    np.testing.assert_array_equal(out.targets, jnp.argmax(out.logits, -1))

    rng = np.random.default_rng(5)
    features = rng.normal(size=(2, 3, 4, 6)).astype(np.float32)
    kernel = rng.normal(size=(6, 4)).astype(np.float32)
    targets = jnp.array([3, 1])
    logits, pullback = jax.vjp(lambda x: pooling.gap(x) @ kernel, features)
    assert logits.shape == (2, 4)
    (gradients,) = pullback(jax.nn.one_hot(targets, 4))
    maps = cam.grad_cam_from_gradients(features, gradients)
    expected = jax.nn.relu(cam.select_targets(cam.class_activation_map(features, kernel),
                                              targets)) / 12
    np.testing.assert_allclose(maps, expected, atol=1e-6)


# ----------------------------------------------------------------------------- perturbation


def test_ablation_cam_has_its_closed_form_for_a_gap_linear_head():
    """Zeroing channel c lowers logit k by W_ck mean_i(A_ic): weights are that over s_k."""
    model, variables, images = _model("gap")
    targets = jnp.array([1, 0, 2])
    out = _maps(model, variables, images, targets, "ablation_cam", relu=False,
                channel_chunk=2, **RAW)  # 5 channels + reference in 3 chunks of 2
    features = np.asarray(_features(model, variables, images), np.float64)
    kernel = np.asarray(_classifier(variables)["kernel"], np.float64)
    scores = np.asarray(out.logits, np.float64)[np.arange(3), np.asarray(targets)]
    drop = kernel[:, np.asarray(targets)].T * features.mean(axis=(1, 2))  # [B, C]
    weights = drop / scores[:, None]
    np.testing.assert_allclose(out.maps, (weights[:, None, None] * features).sum(-1),
                               rtol=2e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["score_cam", "ablation_cam"])
def test_chunk_progress_reports_every_batched_call_in_order(method):
    """``on_chunk`` sees each chunk of channels once, in order, and changes no map."""
    model, variables, images = _model("gap")
    seen = []
    fn = cam.make_map_fn(model, method, channel_chunk=2,
                         on_chunk=lambda index, count: seen.append((index, count)))
    with_progress = fn(variables, images)
    jax.effects_barrier()
    chunks = -(-(5 + (method == "ablation_cam")) // 2)  # 5 channels (+ the reference)
    assert seen == [(index, chunks) for index in range(chunks)]
    plain = cam.make_map_fn(model, method, channel_chunk=2)(variables, images)
    np.testing.assert_array_equal(with_progress.maps, plain.maps)


def test_score_cam_weights_match_a_channel_by_channel_loop():
    model, variables, images = _model("gap", shape=(2, 8, 6, 2))
    features = np.asarray(_features(model, variables, images))  # [2, 4, 3, 5]
    targets = np.array([[2, 0], [1, 1]])
    out = _maps(model, variables, images, jnp.asarray(targets), "score_cam", relu=False,
                channel_chunk=3, **RAW)
    forward = jax.jit(lambda x: model.apply(variables, x))
    rows = np.asarray(cam.methods.align_corners_matrix(4, 8))
    cols = np.asarray(cam.methods.align_corners_matrix(3, 6))
    np.testing.assert_allclose(rows.sum(1), 1, atol=1e-6)
    np.testing.assert_allclose(rows[[0, -1]], np.eye(4)[[0, -1]], atol=1e-6)  # corners
    for b in range(2):
        scores = []
        for c in range(features.shape[-1]):
            up = rows @ features[b, :, :, c] @ cols.T
            mask = (up - up.min()) / (up.max() - up.min() + 1e-8)
            scores.append(np.asarray(forward(images[b:b + 1] * mask[None, :, :, None]))[0])
        scores = np.stack(scores)  # [C, K]
        for t in range(2):
            picked = scores[:, targets[b, t]]
            weights = np.exp(picked - picked.max()) / np.exp(picked - picked.max()).sum()
            expected = (weights * features[b]).sum(-1)
            np.testing.assert_allclose(out.maps[b, t], expected, rtol=1e-4, atol=1e-6)


def test_eigen_cam_recovers_a_rank_one_pattern_with_a_fixed_sign():
    rng = np.random.default_rng(2)
    pattern = rng.normal(size=(2, 4, 5))
    direction = np.abs(rng.normal(size=(2, 6))) + 0.1
    features = pattern[..., None] * direction[:, None, None, :] + 3.0
    maps = np.asarray(jax.jit(cam.eigen_cam_map)(features.astype(np.float32)))
    centred = pattern - pattern.mean(axis=(1, 2), keepdims=True)
    for b in range(2):
        scale = np.linalg.norm(direction[b])
        # positive direction: the projection agrees in sign with the channel sum
        np.testing.assert_allclose(maps[b], centred[b] * scale, rtol=1e-4, atol=1e-4)
        flipped = np.asarray(cam.eigen_cam_map(-features[b:b + 1].astype(np.float32)))[0]
        np.testing.assert_allclose(flipped, -centred[b] * scale, rtol=1e-4, atol=1e-4)


def test_eigen_smoothing_of_rank_one_terms_keeps_the_map_and_is_refused_for_cam():
    rng = np.random.default_rng(4)
    pattern = rng.normal(size=(1, 2, 3, 4))
    terms = pattern[..., None] * np.array([1.0, 2.0, 0.5])  # [1, 2, 3, 4, 3]
    smooth = np.asarray(cam.reduce_terms(terms.astype(np.float32), 2, eigen_smooth=True))
    plain = terms.sum(-1)
    centred = plain - plain.mean(axis=(2, 3), keepdims=True)
    np.testing.assert_allclose(smooth, centred / 3.5 * np.linalg.norm([1, 2, 0.5]),
                               rtol=1e-4, atol=1e-5)
    model, variables, images = _model("gap")
    with pytest.raises(ValueError, match="eigen_smooth applies to methods with channel terms"):
        cam.compute_maps(model, variables, images, method="cam", eigen_smooth=True)
    out = _maps(model, variables, images, method="grad_cam", eigen_smooth=True)
    assert out.maps.shape == (3, 12, 20) and np.isfinite(np.asarray(out.maps)).all()


def test_augmentation_smoothing_is_flip_equivariant_and_keeps_the_plain_logits():
    model, variables, images = _model("gap", shape=(2, 12, 20, 2))
    targets = jnp.array([1, 2])
    smooth = _maps(model, variables, images, targets, "grad_cam", aug_smooth=True)
    mirrored = _maps(model, variables, jnp.flip(images, 2), targets, "grad_cam",
                     aug_smooth=True)
    np.testing.assert_allclose(mirrored.maps, np.flip(np.asarray(smooth.maps), -1), atol=1e-5)
    plain = _maps(model, variables, images, targets, "grad_cam")
    np.testing.assert_allclose(smooth.logits, plain.logits, atol=1e-6)
    assert float(np.abs(np.asarray(smooth.maps) - np.asarray(plain.maps)).max()) > 1e-3
    assert float(smooth.maps.min()) == 0.0 and float(smooth.maps.max()) == 1.0
    predicted = _maps(model, variables, images, None, "grad_cam", aug_smooth=True)
    np.testing.assert_array_equal(predicted.targets, jnp.argmax(plain.logits, -1))


# ----------------------------------------------------------------------------- targets


@pytest.mark.parametrize("method", ["cam", "grad_cam_pp", "ablation_cam", "eigen_cam"])
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
    # several targets per image in one call: [B, T] maps equal the single-target ones
    many = _maps(model, variables, images, jnp.array([[0, 1, 2]] * 3), method=method)
    assert many.maps.shape == (3, 3, 12, 20)
    for k in range(NUM_CLASSES):
        np.testing.assert_allclose(many.maps[:, k], per_class[k], atol=1e-6)
    differs = float(jnp.abs(per_class[0][1] - per_class[1][1]).max()) > 1e-3
    assert differs == (method != "eigen_cam")  # Eigen-CAM is class-agnostic


def test_select_targets_picks_each_images_class_and_checks_the_range():
    maps = jnp.arange(2 * 2 * 3 * 4, dtype=jnp.float32).reshape(2, 2, 3, 4)
    chosen = cam.select_targets(maps, jnp.array([3, 0]))
    np.testing.assert_array_equal(chosen[0], maps[0, ..., 3])
    np.testing.assert_array_equal(chosen[1], maps[1, ..., 0])
    both = cam.select_targets(maps, jnp.array([[3, 1], [0, 2]]))
    np.testing.assert_array_equal(both[1, 1], maps[1, ..., 2])
    with pytest.raises(ValueError, match="targets must have shape"):
        cam.select_targets(maps, jnp.array([1, 2, 3]))
    with pytest.raises(ValueError, match=r"^targets holds class index 4, outside the valid "
                       r"range \[0, 4\)"):
        cam.select_targets(maps, np.array([4, 0]))
    with pytest.raises(ValueError, match=r"class index -1, outside the valid range \[0, 4\)"):
        cam.select_targets(maps, [0, -1])
    model, variables, images = _model("gap")
    with pytest.raises(ValueError, match=r"class index 3, outside the valid range \[0, 3\)"):
        _maps(model, variables, images, np.array([0, 3, 1]), method="grad_cam")


def test_one_compilation_per_shape():
    model, variables, images = _model("gap")
    map_fn = cam.make_map_fn(model, "xgrad_cam")
    for shift in (0.0, 1.0, 2.0):
        map_fn(variables, images + shift, jnp.array([0, 1, 2]))
    assert map_fn.jitted._cache_size() == 1


def test_the_localization_evaluator_takes_every_registry_name():
    from gapjax import wsol

    model, variables, images = _model("gap")
    batch = {"image": images, "label": np.array([0, 1, 2]), "weight": np.ones(3),
             "bbox": np.array([[[0.0, 0.0, 0.5, 0.5]]] * 3, np.float32)}
    evaluator = wsol.LocalizationEvaluator(model, "layer_cam")
    evaluator.update(variables, batch)
    assert evaluator.method == "layer_cam"
    assert 0.0 <= evaluator.result()["max_box_acc_v2"] <= 1.0
    with pytest.raises(ValueError, match="'nope' is not one of"):
        wsol.LocalizationEvaluator(model, "nope")


def test_a_registered_gradient_method_is_taken_by_name(monkeypatch):
    from gapjax.cam import methods

    monkeypatch.setattr(methods.CAM_METHODS, "_entries", dict(methods.CAM_METHODS._entries))
    methods.register_gradient_method("abs_gradient_cam", lambda a, g: jnp.abs(g) * a[:, None])
    assert cam.method_names()[-1] == "abs_gradient_cam"
    model, variables, images = _model("gap")
    out = cam.compute_maps(model, variables, images, jnp.array([0, 1, 2]),
                           method="abs_gradient_cam", **RAW)
    layer = cam.compute_maps(model, variables, images, jnp.array([0, 1, 2]),
                             method="layer_cam", **RAW)
    features = np.asarray(_features(model, variables, images))
    weights = np.abs(np.asarray(_classifier(variables)["kernel"]))[:, [0, 1, 2]].T / 60
    np.testing.assert_allclose(out.maps, (weights[:, None, None] * features).sum(-1),
                               rtol=1e-5, atol=1e-6)
    assert not np.allclose(out.maps, layer.maps)


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


def test_constant_features_give_finite_zero_maps_for_every_method():
    model, variables, images = _model("gap", shape=(1, 6, 6, 2))
    # A zero conv kernel makes the features the constant relu(bias) at every position.
    params = variables["params"]
    variables = {"params": {**params, "conv": {
        "kernel": jnp.zeros_like(params["conv"]["kernel"]),
        "bias": jnp.abs(params["conv"]["bias"]) + 0.1}}}
    # the methods that divide (by sums, spreads or scores) and the exact map
    for method in ("cam", "grad_cam_pp", "xgrad_cam", "eigen_cam", "score_cam",
                   "ablation_cam"):
        maps = np.asarray(_maps(model, variables, images, method=method, resize=None).maps)
        assert np.isfinite(maps).all() and np.abs(maps).max() == 0, method


# ----------------------------------------------------------------------------- errors


def test_clear_errors_for_bad_methods_models_and_shapes():
    model = TinyNet(pool="gem")
    with pytest.raises(ValueError, match="'nope' is not one of"):
        cam.resolve_method(model, "nope")
    with pytest.raises(ValueError, match=r"'cam' does not apply.*pool='gem'.*grad_cam"):
        cam.resolve_method(model, "cam")
    assert cam.resolve_method(TinyNet(pool="gmp"), "contribution") == "contribution"
    with pytest.raises(ValueError, match=r"'rollout' does not apply.*grad_cam"):
        cam.resolve_method(model, "rollout")  # no forward_attention: no rollout

    class NoContract(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            return nn.Dense(2)(x.mean((1, 2)))

    with pytest.raises(ValueError, match=r"follows the model contract.*NoContract does not"):
        cam.resolve_method(NoContract())
    with pytest.raises(ValueError, match="kernel must have shape"):
        cam.class_activation_map(jnp.zeros((1, 2, 2, 3)), jnp.zeros((4, 2)))
    with pytest.raises(ValueError, match="resize method 'area'"):
        cam.resize_maps(jnp.zeros((1, 2, 2)), (4, 4), "area")
    with pytest.raises(ValueError, match="gradients must have shape"):
        cam.grad_cam_terms(jnp.zeros((1, 2, 2, 3)), jnp.zeros((1, 2, 2, 3)))
