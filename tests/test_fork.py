"""A fork's pool, registered in this file, works everywhere a pool name is taken.

No gapjax module is edited: the pool below declares what it can do (a weighted sum of
positions with a learned sharpness) and the GAP head, the SE squeeze, masked sets, GIN's
readout and CAM pick it up by name.
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gapjax import cam, graph, models, pooling
from gapjax.pooling import POOLS, Pool


@POOLS.register("fork_softnorm")
class SoftNormPool(Pool):
    """Positions weighted by ``softmax(t * |x_i|)``: louder positions count more.

    ``t`` is learned (initialised to ``init_t``); ``t = 0`` is GAP. Declared a
    ``"position"`` weighting, so class maps of a head with this pool are exact.
    """

    weighting: ClassVar[str | None] = "position"
    init_t: float = 1.0

    @nn.compact
    def sharpness(self) -> jax.Array:
        return self.param("t", nn.initializers.constant(self.init_t), (), jnp.float32)

    def __call__(self, x, mask=None, return_weights=False):
        norms = jnp.linalg.norm(jnp.asarray(x, jnp.float32), axis=-1)  # [B, *S]
        return pooling.attention(x, self.sharpness() * norms, mask, return_weights=return_weights)


def _images(batch=2, size=16):
    return jax.random.normal(jax.random.key(0), (batch, size, size, 1))


def _tiny_cnn(**kwargs):
    return models.get("cnn", num_classes=3, widths=(4, 8), strides=(1, 2), **kwargs)


def test_fork_pool_in_a_gap_head_takes_its_options_and_gives_exact_maps():
    model = _tiny_cnn(pool="fork_softnorm", pool_kwargs={"init_t": 0.5})
    images = _images()
    variables = jax.jit(model.init)(jax.random.key(1), images)
    assert float(variables["params"]["head"]["pool"]["t"]) == 0.5
    assert model.map_kinds == ("contribution",)

    @jax.jit
    def logits_maps_and_grads(variables):
        output = cam.compute_maps(model, variables, images, method="auto", resize=None,
                                  normalize=False)
        grads = jax.grad(lambda v: model.apply(v, images).sum())(variables)
        return model.apply(variables, images), output, grads

    logits, output, grads = logits_maps_and_grads(variables)
    bias = variables["params"]["head"]["classifier"]["bias"]
    np.testing.assert_allclose(output.maps.sum(axis=(1, 2)),
                               logits[jnp.arange(2), output.targets] - bias[output.targets],
                               rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(grads["params"]["head"]["pool"]["t"])) > 0  # t is trained


def test_fork_pool_as_the_se_squeeze():
    model = _tiny_cnn(attn="se", se_pool="fork_softnorm")
    images = _images()
    variables = jax.jit(model.init)(jax.random.key(1), images)
    assert "t" in variables["params"]["stage1_se"]["squeeze"]
    assert np.isfinite(np.asarray(jax.jit(model.apply)(variables, images))).all()


def test_fork_pool_on_masked_sets_ignores_padding():
    sets = jax.random.normal(jax.random.key(2), (3, 7, 5))
    mask = jnp.arange(7)[None, :] < jnp.array([[7], [3], [1]])
    garbage = jnp.where(mask[..., None], sets, 1e6)
    np.testing.assert_allclose(pooling.pool("fork_softnorm", sets, mask),
                               pooling.pool("fork_softnorm", garbage, mask), rtol=1e-6)
    np.testing.assert_allclose(pooling.pool("fork_softnorm", sets[1:2, :3]),
                               pooling.pool("fork_softnorm", sets, mask)[1:2], rtol=1e-6)


def test_fork_pool_as_a_graph_readout_and_in_gin():
    rng = np.random.default_rng(0)
    sizes = [3, 5, 2]
    graphs = [{"node_features": rng.normal(size=(n, 4)).astype(np.float32),
               "senders": rng.integers(0, n, 2 * n), "receivers": rng.integers(0, n, 2 * n)}
              for n in sizes]
    batch = jax.tree.map(jnp.asarray, graph.batch_graphs(graphs, node_budget=12,
                                                         edge_budget=24, graph_budget=4))
    pooled = jax.jit(graph.readout, static_argnums=(0, 3))(
        "fork_softnorm", batch.node_features, batch.node_graph, 4, mask=batch.node_mask)
    for index, g in enumerate(graphs):
        np.testing.assert_allclose(pooled[index],
                                   pooling.pool("fork_softnorm", g["node_features"][None])[0],
                                   rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(pooled[3], 0.0)  # the padding graph
    model = models.get("gin", num_classes=2, num_layers=1, hidden=8, pool="fork_softnorm")
    variables = jax.jit(model.init)(jax.random.key(0), batch)
    assert "t" in variables["params"]["readout"]
    assert jax.jit(model.apply)(variables, batch).shape == (4, 2)


@POOLS.register("fork_rms")
class RootMeanSquarePool(Pool):
    """``sqrt(mean_i x_i^2)``: no weighting declared, so CAM falls back to Grad-CAM."""

    def __call__(self, x, mask=None):
        return jnp.sqrt(pooling.gap(jnp.square(x), mask) + 1e-12)


def test_a_pool_without_weights_falls_back_to_grad_cam():
    model = _tiny_cnn(pool="fork_rms")
    assert model.map_kinds == ()
    images = _images()
    variables = jax.jit(model.init)(jax.random.key(1), images)
    assert cam.resolve_method(model, "auto") == "grad_cam"
    with pytest.raises(ValueError, match="fork_rms"):
        cam.resolve_method(model, "contribution")
    maps = cam.make_map_fn(model, "grad_cam")(variables, images).maps
    assert maps.shape == (2, 16, 16) and np.isfinite(np.asarray(maps)).all()
