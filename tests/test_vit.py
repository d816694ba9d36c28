"""Vision Transformers and the MAP pool: timm parity, map identities, rollout, Grad-CAM.

* Parameter counts equal timm's ``vit_{tiny,small,base,large}_patch16_224`` for every
  pool / class-token combination timm builds (timm on the meta device, gapjax through
  ``jax.eval_shape``: nothing is allocated).
* Eval-mode logits equal timm's (random timm weights through ``gapjax.pretrained.load``,
  relative error <= 1e-5) for the token, avg and map heads, at 32x32 (a 2x2 patch grid);
  the head variants run a 4-block ViT-Ti (same layout, a quarter of the compile time), the
  token head the full 12-block ViT-Ti/16.
* Maps: GAP class maps average to ``logits - bias``, contributions of gap, map and
  position / channel weighted pools sum to it (with and without ``fc_norm``), property
  tested over random weights and images; Grad-CAM (``gapjax.cam``) on the last block's
  patch tokens equals the torch gradient recipe; rollout rows are stochastic.
"""

from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers.torch_reference import import_timm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gapjax import cam, graph, models, pretrained
from gapjax.models import vit
from gapjax.pooling import POOLS, MAPPool

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
TIMM_COMBINATIONS = (("token", True), ("avg", True), ("avg", False), ("map", True),
                     ("map", False))
GAPJAX_POOL = {"token": "token", "avg": "gap", "map": "map"}
#: A small ViT for the property tests: 16x16 images, patch 4 (a 4x4 grid), width 32.
SMALL = {"image_size": 16, "patch_size": 4, "width": 32, "depth": 2, "num_heads": 4}


def count(tree) -> int:
    return int(sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))


def perturbed(variables, seed: int, scale: float = 0.2):
    """Variables plus Gaussian noise (zero-initialised leaves become non-trivial)."""
    leaves, treedef = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [leaf + scale * jax.random.normal(key, leaf.shape)
                                        for leaf, key in zip(leaves, keys)])


def small_vit(seed: int = 0, **kwargs):
    model = models.get("vit_ti16", num_classes=5, **{**SMALL, **kwargs})
    images = jax.random.normal(jax.random.key(seed + 100), (3, 16, 16, 3))
    variables = perturbed(jitted(model.init)(jax.random.key(seed), images), seed)
    return model, variables, images


_COMPILED: dict = {}


def jitted(fn, **static):
    """``jax.jit(fn)`` with keyword arguments bound, compiled with fast XLA options and
    cached per function and argument shapes: the tests call the same small programs many
    times (eager Flax dispatch is slow, and so is full XLA optimisation)."""

    def call(*args, **kwargs):
        avals = jax.tree.map(lambda a: (jnp.shape(a), jnp.result_type(a)), (args, kwargs))
        key = (fn, tuple(sorted(static.items())), str(avals))
        if key not in _COMPILED:
            _COMPILED[key] = jax.jit(functools.partial(fn, **static)).lower(
                *args, **kwargs).compile(FAST_COMPILE)
        return _COMPILED[key](*args, **kwargs)

    return call


def _outputs(variables, images, *, model):
    kinds = model.map_kinds
    logits = model.apply(variables, images)
    features = model.apply(variables, images, method="forward_features")
    head = model.apply(variables, features, method="forward_head")
    contributions = (model.apply(variables, features, method="head_contributions")
                     if "contribution" in kinds else None)
    maps = model.apply(variables, features, method="head_class_maps") if "cam" in kinds else None
    return logits, features, head, contributions, maps


def outputs(model, variables, images):
    """``(logits, features, head logits, contributions or None, class maps or None)``."""
    return jitted(_outputs, model=model)(variables, images)


# --------------------------------------------------------------------------------------
# timm parity
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(vit.TIMM_NAMES))
def test_parameter_counts_equal_timm_for_every_pool_and_class_token(name):
    timm = import_timm()
    for timm_pool, class_token in TIMM_COMBINATIONS:
        with torch.device("meta"):
            reference = timm.create_model(vit.TIMM_NAMES[name], pretrained=False,
                                          global_pool=timm_pool, class_token=class_token)
        expected = sum(p.numel() for p in reference.parameters())
        model = models.get(name, num_classes=1000, pool=GAPJAX_POOL[timm_pool],
                           class_token=class_token)
        shapes = jax.eval_shape(model.init, jax.random.key(0),
                                jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
        assert count(shapes) == expected, (name, timm_pool, class_token)


def timm_vit(tmp_path, timm_pool: str, class_token: bool, depth: int, seed: int = 0,
             img_size: int = 32):
    """A randomly initialised timm ViT-Ti/16 (every tensor perturbed) and its saved file."""
    timm = import_timm()
    torch.manual_seed(seed)
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=7,
                                  global_pool=timm_pool, class_token=class_token,
                                  img_size=img_size, depth=depth).eval()
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    path = tmp_path / f"vit_{timm_pool}_{class_token}_{depth}.safetensors"
    from safetensors.torch import save_file

    save_file({key: value.contiguous() for key, value in reference.state_dict().items()},
              str(path))
    return reference, path


def jax_logits(model, variables, images_nchw: np.ndarray) -> np.ndarray:
    images = jnp.asarray(images_nchw.transpose(0, 2, 3, 1))
    compiled = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(
        variables, images).compile(FAST_COMPILE)
    return np.asarray(compiled(variables, images))


@pytest.mark.parametrize("timm_pool,class_token,depth", [
    ("token", True, 12), ("avg", True, 4), ("avg", False, 4), ("map", False, 4),
    ("map", True, 4)])
def test_logits_equal_timm(tmp_path, timm_pool, class_token, depth):
    reference, path = timm_vit(tmp_path, timm_pool, class_token, depth)
    model, variables = pretrained.load("vit_ti16", path, image_size=32, depth=depth,
                                       pool=GAPJAX_POOL[timm_pool], class_token=class_token)
    images = np.random.default_rng(1).standard_normal((3, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(images)).numpy()
    got = jax_logits(model, variables, images)
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) <= 1e-5
    assert (got.argmax(-1) == expected.argmax(-1)).all()
    # And back: the saved variables load into timm strictly, tensor for tensor.
    state = pretrained.state_dict_from_variables("vit_ti16", variables)
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    for key, value in reference.state_dict().items():
        np.testing.assert_array_equal(state[key], value.numpy())


def test_position_embeddings_resample_when_the_image_size_differs(tmp_path, caplog):
    reference, path = timm_vit(tmp_path, "token", True, depth=1)
    with caplog.at_level(logging.WARNING):
        model, variables = pretrained.load("vit_ti16", path, image_size=64, depth=1)
    assert "resampling 4 position embeddings to 16" in caplog.text
    table = np.asarray(variables["params"]["pos_embed"])
    source = reference.pos_embed.detach().numpy()
    assert table.shape == (1, 17, 192)
    np.testing.assert_array_equal(table[0, 0], source[0, 0])  # class token row kept
    # The patch rows are an upsampling of the 2x2 grid: with bilinear interpolation the
    # resampler agrees with torch's interpolate(align_corners=False).
    bilinear = vit.resample_pos_embed(source, (4, 4), num_prefix_tokens=1, method="bilinear",
                                      antialias=False)
    grid = torch.from_numpy(source[:, 1:].reshape(1, 2, 2, 192)).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(grid, size=(4, 4), mode="bilinear",
                                               align_corners=False)
    np.testing.assert_allclose(bilinear[0, 1:], expected.permute(0, 2, 3, 1).reshape(16, 192),
                               rtol=1e-5, atol=1e-6)
    logits = model.apply(variables, jnp.zeros((1, 64, 64, 3)))
    assert logits.shape == (1, 7) and bool(jnp.isfinite(logits).all())
    same = vit.resample_pos_embed(source, (2, 2), num_prefix_tokens=1)
    np.testing.assert_array_equal(same, source)


def test_grad_cam_on_the_last_blocks_patch_tokens_matches_torch(tmp_path):
    reference, path = timm_vit(tmp_path, "token", True, depth=2)
    model, variables = pretrained.load("vit_ti16", path, image_size=32, depth=2)
    images = np.random.default_rng(2).standard_normal((2, 3, 32, 32)).astype(np.float32)
    targets = np.array([3, 5])
    # The recipe of pytorch-grad-cam for ViTs: activations and gradients of the tokens
    # entering the last block, class token dropped, Grad-CAM weights = mean gradient.
    captured = {}
    hook = reference.blocks[0].register_forward_hook(
        lambda module, args, output: captured.update(tokens=output) or output.retain_grad())
    logits = reference(torch.from_numpy(images))
    hook.remove()
    logits[torch.arange(2), torch.from_numpy(targets)].sum().backward()
    tokens = captured["tokens"][:, 1:].detach().numpy().reshape(2, 2, 2, 192)
    grads = captured["tokens"].grad[:, 1:].numpy().reshape(2, 2, 2, 192)
    expected = np.maximum((tokens * grads.mean(axis=(1, 2), keepdims=True)).sum(-1), 0)

    maps = cam.compute_maps(model, variables, images.transpose(0, 2, 3, 1), targets,
                            method="grad_cam", resize=None, normalize=False).maps
    np.testing.assert_allclose(maps, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


# --------------------------------------------------------------------------------------
# The model contract and the map identities
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("pool,class_token,kinds", [
    ("token", True, ()), ("gap", True, ("cam", "contribution")),
    ("gap", False, ("cam", "contribution")), ("map", False, ("contribution",)),
    ("gem", True, ()), ("attention", False, ("contribution",))])
def test_contract_features_head_and_map_kinds(pool, class_token, kinds):
    model, variables, images = small_vit(pool=pool, class_token=class_token)
    assert model.map_kinds == kinds
    logits, features, head, _, _ = outputs(model, variables, images)
    width = 2 * SMALL["width"] if pool == "token" else SMALL["width"]
    assert features.shape == (3, 4, 4, width)
    np.testing.assert_allclose(head, logits, rtol=1e-6, atol=1e-6)
    if "contribution" not in kinds:
        with pytest.raises(ValueError, match="contribution"):
            jax.eval_shape(lambda v, f: model.apply(v, f, method="head_contributions"),
                           variables, features)
    if pool in ("token", "gap", "map"):
        # The cam package accepts every head (Grad-CAM, or the exact maps it has).
        output = cam.make_map_fn(model, "auto")(variables, images)
        assert output.maps.shape == (3, 16, 16) and bool(jnp.isfinite(output.maps).all())


@pytest.mark.parametrize("pool,class_token,fc_norm", [
    ("gap", True, None), ("gap", False, False), ("map", False, None), ("map", True, True),
    ("attention", True, False), ("gmp", False, None), ("gsp", False, True)])
@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), scale=st.floats(0.1, 3.0))
def test_contributions_sum_to_the_logits(pool, class_token, fc_norm, seed, scale):
    model, variables, images = small_vit(seed, pool=pool, class_token=class_token,
                                         fc_norm=fc_norm)
    images = images * scale
    logits, _, _, contributions, maps = outputs(model, variables, images)
    bias = variables["params"]["head"]["classifier"]["bias"]
    assert contributions.shape == (3, 4, 4, 5)
    np.testing.assert_allclose(contributions.sum(axis=(1, 2)) + bias, logits, rtol=1e-4,
                               atol=1e-4 * float(jnp.abs(logits).max()))
    if "cam" in model.map_kinds:
        np.testing.assert_allclose(maps.mean(axis=(1, 2)) + bias, logits, rtol=1e-4,
                                   atol=1e-4 * float(jnp.abs(logits).max()))


def test_gap_class_maps_without_fc_norm_are_plain_cam():
    model, variables, images = small_vit(pool="gap", fc_norm=False)
    _, features, _, _, maps = outputs(model, variables, images)
    kernel = variables["params"]["head"]["classifier"]["kernel"]
    np.testing.assert_allclose(maps, cam.class_activation_map(features, kernel), rtol=1e-5,
                               atol=1e-5)


def test_options_are_checked_with_one_clear_error():
    with pytest.raises(ValueError, match="class_token=True"):
        small_vit(pool="token", class_token=False)
    with pytest.raises(ValueError, match="posemb='fourier' is not valid"):
        small_vit(posemb="fourier")
    with pytest.raises(ValueError, match="unknown pool 'avgg'"):
        small_vit(pool="avgg")
    model, variables, _ = small_vit()
    with pytest.raises(ValueError, match="image_size"):
        model.apply(variables, jnp.zeros((1, 32, 32, 3)))
    with pytest.raises(ValueError, match="num_heads"):
        small_vit(pool="map", pool_kwargs={"num_heads": 5})


def test_sincos_posemb_has_no_parameters_and_any_grid():
    learned, _, _ = small_vit()
    _, variables, images = small_vit(posemb="sincos2d")
    assert "pos_embed" not in variables["params"]
    shapes = jax.eval_shape(learned.init, jax.random.key(0), images)
    assert count(shapes) - count(variables) == 17 * SMALL["width"]
    table = vit.sincos_2d_posemb((4, 4), 32)
    assert table.shape == (16, 32) and float(jnp.abs(table).max()) <= 1.0
    assert len({tuple(np.round(row, 5)) for row in np.asarray(table)}) == 16  # all distinct


def test_drop_path_and_dropout_act_in_training_only():
    model, variables, images = small_vit(drop_path=0.5, dropout=0.3, pool="gap")
    train = jax.jit(lambda v, x, key: model.apply(v, x, train=True, rngs={"dropout": key}))
    first = train(variables, images, jax.random.key(1))
    second = train(variables, images, jax.random.key(2))
    assert not np.allclose(first, second)
    evaluate = jitted(model.apply)
    np.testing.assert_array_equal(evaluate(variables, images), evaluate(variables, images))


def test_bfloat16_compute_keeps_float32_logits_and_parameters():
    model, variables, images = small_vit(dtype=jnp.bfloat16, pool="map")
    logits = jitted(model.apply)(variables, images)
    assert logits.dtype == jnp.float32
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
    reference = jitted(models.get("vit_ti16", num_classes=5, pool="map", **SMALL).apply)(
        variables, images)
    assert float(jnp.abs(logits - reference).max()) < 0.1 * float(jnp.abs(reference).max())


# --------------------------------------------------------------------------------------
# Attention rollout
# --------------------------------------------------------------------------------------


def test_rollout_of_uniform_attention_and_of_a_model():
    tokens, grid = 5, (2, 2)
    uniform = jnp.full((3, 1, 2, tokens, tokens), 1.0 / tokens)
    class_token = jnp.eye(tokens)[:1]
    # Without residual mixing every layer spreads the class token evenly.
    flat = cam.attention_rollout(uniform, class_token, grid, residual=0.0)
    np.testing.assert_allclose(flat, np.full((1, 2, 2), 1 / tokens), rtol=1e-6)
    # Identity attention never moves anything: the class token keeps its own share.
    identity = jnp.broadcast_to(jnp.eye(tokens), (3, 1, 2, tokens, tokens))
    np.testing.assert_allclose(cam.attention_rollout(identity, class_token, grid), 0.0,
                               atol=1e-7)
    with pytest.raises(ValueError, match="do not cover a"):
        cam.attention_rollout(uniform, class_token, (3, 2))

    rollout = functools.partial(cam.compute_maps, method="rollout", resize=None,
                                normalize=False)
    model, variables, images = small_vit(pool="gap", class_token=False)
    assert "rollout" in cam.available_methods(model)
    maps = jitted(rollout, model=model)(variables=variables, images=images).maps
    assert maps.shape == (3, 4, 4)
    np.testing.assert_allclose(maps.sum(axis=(1, 2)), 1.0, rtol=1e-5)  # no prefix: all mass
    model, variables, images = small_vit(pool="token")
    maps = jitted(rollout, model=model)(variables=variables, images=images).maps
    assert bool((maps >= 0).all()) and bool((maps.sum(axis=(1, 2)) < 1.0).all())


# --------------------------------------------------------------------------------------
# The MAP pool on its own: sets, images, graphs
# --------------------------------------------------------------------------------------


MAP = MAPPool(num_heads=4)


def map_pool(channels: int = 16, seed: int = 0):
    x = jax.random.normal(jax.random.key(seed), (2, 6, channels))
    return MAP, perturbed(jitted(MAP.init)(jax.random.key(seed), x), seed)


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 10_000), real=st.integers(1, 6))
def test_map_pool_is_a_set_function(seed, real):
    pool, variables = map_pool(seed=seed % 5)
    apply = jitted(pool.apply)
    x = jax.random.normal(jax.random.key(seed), (2, 6, 16))
    mask = jnp.arange(6)[None, :] < jnp.array([[real], [6]])
    pooled = apply(variables, x, mask)
    # Padding never matters, whatever it holds; permutations never matter.
    garbage = jnp.where(mask[..., None], x, 1e6)
    np.testing.assert_allclose(apply(variables, garbage, mask), pooled, rtol=1e-5, atol=1e-5)
    order = jax.random.permutation(jax.random.key(seed + 1), 6)
    np.testing.assert_allclose(apply(variables, x[:, order], mask[:, order]), pooled,
                               rtol=1e-4, atol=1e-5)
    first = jnp.where(jnp.arange(6)[:, None] < real, x[0], 0.0)[None]
    np.testing.assert_allclose(apply(variables, first, mask[:1]), pooled[:1], rtol=1e-4,
                               atol=1e-5)
    alpha = jitted(pool.apply, method="attention")(variables, x, mask)
    np.testing.assert_allclose(alpha.sum(-1), 1.0, rtol=1e-5)
    shares, weights = jitted(pool.apply, method="contributions")(variables, x, mask)
    np.testing.assert_allclose(shares.sum(axis=1), pooled, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-5)
    assert float(jnp.abs(shares[0, real:]).sum()) == 0.0  # padding contributes nothing


def test_map_pool_empty_sets_pool_to_zeros_with_finite_gradients():
    pool, variables = map_pool()
    x = jax.random.normal(jax.random.key(3), (2, 6, 16))
    mask = jnp.zeros((2, 6), bool).at[1, :2].set(True)
    pooled = jitted(pool.apply)(variables, x, mask)
    assert float(jnp.abs(pooled[0]).max()) == 0.0 and float(jnp.abs(pooled[1]).max()) > 0
    grads = jax.jit(jax.grad(lambda v: pool.apply(v, x, mask).sum()))(variables)
    assert all(bool(jnp.isfinite(leaf).all()) for leaf in jax.tree.leaves(grads))


def test_map_pool_as_a_graph_readout_and_a_cnn_head():
    pool, variables = map_pool()
    nodes = jax.random.normal(jax.random.key(4), (7, 16))
    graph_index = jnp.array([0, 0, 1, 1, 1, 2, 2])
    segments = jax.jit(lambda v, n, g: pool.apply(v, n, g, 3, method="segment"))(
        variables, nodes, graph_index)
    dense = jnp.zeros((3, 3, 16)).at[graph_index, jnp.array([0, 1, 0, 1, 2, 0, 1])].set(nodes)
    members = jnp.array([[1, 1, 0], [1, 1, 1], [1, 1, 0]], bool)
    np.testing.assert_allclose(segments, jitted(pool.apply)(variables, dense, members),
                               rtol=1e-4, atol=1e-5)
    readout = jax.jit(lambda n, g: graph.readout("map", n, g, 3, num_heads=4))
    assert readout(nodes, graph_index).shape == (3, 16)
    assert "map" in POOLS.names()

    cnn = models.get("cnn", num_classes=4, widths=(8, 16), pool="map",
                     pool_kwargs={"num_heads": 2})
    images = jnp.ones((2, 16, 16, 1))
    cnn_variables = jax.eval_shape(cnn.init, jax.random.key(0), images)
    logits = jax.eval_shape(cnn.apply, cnn_variables, images)
    assert logits.shape == (2, 4)
    assert set(cnn_variables["params"]["head"]["pool"]) == {"latent", "q", "kv", "proj", "norm",
                                                            "mlp"}
    assert cnn.map_kinds == ("contribution",)  # one head: MAP's exact split on a CNN too
