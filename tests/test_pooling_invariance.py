"""Pools are functions of a *set*: order and padding never matter.

Property tests (hypothesis) over every pool, pure functions and the attention module:
permuting positions changes nothing; appending masked garbage positions (huge values,
the float32 extremes) changes neither the result nor the gradient on real positions and
gives zero gradient to the padding; a fully masked row pools to zeros with finite
forward and backward passes. Shapes are fixed so each property compiles once.
"""

import functools

import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings

from gapjax import pooling
from gapjax.pooling import POOLS

B, N, C, PAD = 2, 6, 3, 4
IMAGE = (2, 3)  # an image of H x W = 6 positions, so sets and images share N
FLOAT32 = np.finfo(np.float32)
EXTREMES = [1e30, -1e30, float(FLOAT32.max), float(FLOAT32.min), float(FLOAT32.tiny), 0.0]
HUGE_WEIGHTS = [1e30, float(FLOAT32.max)]
PROPERTY = settings(max_examples=25, deadline=None, derandomize=True)


@functools.cache
def attention_module() -> tuple[pooling.AttentionPool, dict]:
    module = pooling.AttentionPool(hidden=4)
    variables = jax.jit(module.init)(jax.random.PRNGKey(0), jnp.ones((B, N, C)))
    return module, variables


def every_pool() -> dict:
    """Every pool of the family as ``f(x [B, *S, C], aux [B, *S], mask, attention_variables)
    -> [B, width]``, with ``aux >= 0`` serving as weights and as scores."""
    module, _ = attention_module()
    pools = {
        name: lambda x, aux, mask, v, name=name: pooling.pool(name, x, mask)
        for name in ("gap", "gmp", "gsp", "avgmax", "catavgmax")
    }
    return {
        **pools,
        "gem": lambda x, aux, mask, v: pooling.gem(x, 3.0, mask),
        "gem_p500": lambda x, aux, mask, v: pooling.gem(x, 500.0, mask),
        "lse": lambda x, aux, mask, v: pooling.lse(x, 4.0, mask),
        "weighted": lambda x, aux, mask, v: pooling.weighted(x, aux, mask),
        "attention": lambda x, aux, mask, v: pooling.attention(x, aux, mask),
        "attention_module": lambda x, aux, mask, v: module.apply(v, x, mask),
    }


@jax.jit
def pools(x, aux, mask, attention_variables):
    """Every pool's output, name -> ``[B, width]``."""
    return {name: fn(x, aux, mask, attention_variables) for name, fn in every_pool().items()}


@jax.jit
def pools_and_gradients(x, aux, mask, attention_variables):
    """Pooled outputs and, per pool, the gradients w.r.t. ``x``, ``aux`` and the
    attention parameters of a fixed linear read-out of the output."""
    outputs, gradients = {}, {}
    for name, fn in every_pool().items():
        def readout(x, aux, variables, fn=fn):
            out = fn(x, aux, mask, variables).astype(jnp.float32)
            weights = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
            return (out * weights).sum(), out

        grads, outputs[name] = jax.grad(readout, argnums=(0, 1, 2), has_aux=True)(
            x, aux, attention_variables
        )
        gradients[name] = grads
    return outputs, gradients


def values(shape, low=-10.0, high=10.0):
    # No subnormals: XLA on CPU flushes them to zero, which is not the pools' business.
    elements = st.floats(low, high, width=32, allow_subnormal=False)
    return hnp.arrays(np.float32, shape, elements=elements)


def masks(shape):
    return hnp.arrays(np.bool_, shape, elements=st.booleans())


def assert_close(actual: dict, expected: dict, rtol=1e-5, atol=1e-5):
    for name in expected:
        np.testing.assert_allclose(actual[name], expected[name], rtol=rtol, atol=atol,
                                   err_msg=name)


@PROPERTY
@given(x=values((B, N, C)), aux=values((B, N), 0.0, 5.0), mask=masks((B, N)),
       order=st.permutations(range(N)))
def test_permuting_set_positions_changes_nothing(x, aux, mask, order):
    _, variables = attention_module()
    order = np.asarray(order)
    out = pools(x, aux, mask, variables)
    permuted = pools(x[:, order], aux[:, order], mask[:, order], variables)
    assert_close(permuted, out)
    # Max is exact whatever the order.
    np.testing.assert_array_equal(permuted["gmp"], out["gmp"])


@PROPERTY
@given(x=values((B, *IMAGE, C)), aux=values((B, *IMAGE), 0.0, 5.0), mask=masks((B, *IMAGE)),
       order=st.permutations(range(N)))
def test_permuting_image_positions_changes_nothing(x, aux, mask, order):
    _, variables = attention_module()

    def shuffle(a):  # the same permutation of the H*W positions for every channel
        flat = a.reshape(B, N, *a.shape[3:])[:, np.asarray(order)]
        return flat.reshape(a.shape)

    out = pools(x, aux, mask, variables)
    permuted = pools(shuffle(x), shuffle(aux), shuffle(mask), variables)
    assert_close(permuted, out)


@PROPERTY
@given(x=values((B, N, C)), aux=values((B, N), 0.0, 5.0), mask=masks((B, N)),
       garbage=hnp.arrays(np.float32, (B, PAD, C), elements=st.sampled_from(EXTREMES)),
       garbage_aux=hnp.arrays(np.float32, (B, PAD), elements=st.sampled_from(HUGE_WEIGHTS)))
def test_masked_garbage_padding_changes_nothing(x, aux, mask, garbage, garbage_aux):
    _, variables = attention_module()
    padded_x = np.concatenate([x, garbage], axis=1)
    padded_aux = np.concatenate([aux, garbage_aux], axis=1)
    padded_mask = np.concatenate([mask, np.zeros((B, PAD), bool)], axis=1)
    out, grads = pools_and_gradients(x, aux, mask, variables)
    padded_out, padded_grads = pools_and_gradients(padded_x, padded_aux, padded_mask, variables)
    assert_close(padded_out, out)
    for name, (grad_x, grad_aux, grad_params) in padded_grads.items():
        leaves = jax.tree.leaves((grad_x, grad_aux, grad_params))
        assert all(np.isfinite(leaf).all() for leaf in leaves), name
        # Padding receives nothing; real positions receive what they did without it.
        assert np.abs(np.asarray(grad_x)[:, N:]).max() == 0.0, name
        assert np.abs(np.asarray(grad_aux)[:, N:]).max() == 0.0, name
        np.testing.assert_allclose(grad_x[:, :N], grads[name][0], rtol=1e-4, atol=1e-5,
                                   err_msg=name)
        np.testing.assert_allclose(grad_aux[:, :N], grads[name][1], rtol=1e-4, atol=1e-5,
                                   err_msg=name)
        for padded_leaf, leaf in zip(jax.tree.leaves(grad_params),
                                     jax.tree.leaves(grads[name][2])):
            np.testing.assert_allclose(padded_leaf, leaf, rtol=1e-4, atol=1e-5, err_msg=name)


@PROPERTY
@given(x=values((B, N, C)), aux=values((B, N), 0.0, 5.0), mask=masks((B, N)))
def test_masked_pools_equal_the_pools_of_the_real_positions(x, aux, mask):
    # Row by row, masking is the same as removing the masked positions.
    _, variables = attention_module()
    out, _ = pools_and_gradients(x, aux, mask, variables)
    for row in range(B):
        keep = mask[row]
        if not keep.any():
            continue
        real = x[row][keep][None]
        mean, peak = real.mean(axis=1), real.max(axis=1)
        np.testing.assert_allclose(out["gap"][row], mean[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(out["gmp"][row], peak[0])
        np.testing.assert_allclose(out["gsp"][row], real.sum(axis=1)[0], rtol=1e-5, atol=1e-4)
        w = aux[row][keep]
        if w.sum() > 0:
            expected = (w[:, None] * real[0]).sum(0) / w.sum()
            np.testing.assert_allclose(out["weighted"][row], expected, rtol=1e-4, atol=1e-4)


@jax.jit
def identities(x, mask, weight):
    """GAP beside its special cases: uniform weights, GeM at p = 1, flat attention scores."""
    uniform = jnp.full(x.shape[:-1], weight)
    return {
        "gap": pooling.gap(x, mask),
        "uniform_weights": pooling.weighted(x, uniform, mask),
        "gem_p1": pooling.gem(x, 1.0, mask),
        "flat_attention": pooling.attention(x, uniform, mask),
    }


@PROPERTY
@given(x=values((B, N, C), 0.0, 100.0), mask=masks((B, N)),
       weight=st.floats(1e-3, 1e3))
def test_uniform_weights_and_gem_p1_are_gap(x, mask, weight):
    out = identities(x, mask, np.float32(weight))
    for name in ("uniform_weights", "flat_attention"):
        np.testing.assert_allclose(out[name], out["gap"], rtol=1e-5, atol=1e-6, err_msg=name)
    # GeM clamps inputs to eps = 1e-6 first, so positions below it count as eps.
    np.testing.assert_allclose(out["gem_p1"], out["gap"], rtol=1e-5, atol=2e-6)


def test_fully_masked_rows_pool_to_zeros_with_finite_gradients():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(B, N, C)).astype(np.float32)
    x[0, :3] = [FLOAT32.max, FLOAT32.min, 1e30]  # extremes hidden behind the mask
    aux = rng.uniform(0.0, 5.0, (B, N)).astype(np.float32)
    aux[0, :2] = [1e30, FLOAT32.max]
    mask = np.ones((B, N), bool)
    mask[0] = False
    _, variables = attention_module()
    out, grads = pools_and_gradients(x, aux, mask, variables)
    for name, pooled in out.items():
        assert np.isfinite(pooled).all(), name
        assert np.abs(pooled[0]).max() == 0.0, name
        assert np.abs(pooled[1]).max() > 0.0, name
        leaves = jax.tree.leaves(grads[name])
        assert all(np.isfinite(leaf).all() for leaf in leaves), name
        assert np.abs(np.asarray(grads[name][0])[0]).max() == 0.0, name


def test_fully_masked_rows_give_finite_parameter_gradients_in_every_module():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(B, *IMAGE, C)), jnp.float32)
    x = x.at[0, 0, 0].set(1e30)
    mask = jnp.ones((B, *IMAGE), bool).at[0].set(False)
    names = ["gap", "gmp", "gsp", "avgmax", "catavgmax", "gem", "lse", "weighted", "attention"]
    modules = {name: POOLS.get(name)() for name in names}
    init = jax.jit(lambda key, x: {n: m.init(key, x) for n, m in modules.items()})
    all_variables = init(jax.random.PRNGKey(0), x)

    @jax.jit
    def forward_and_backward(all_variables, x, mask):
        def loss(all_variables, x):
            outs = {n: m.apply(all_variables[n], x, mask) for n, m in modules.items()}
            return sum(o.sum() for o in outs.values()), outs

        return jax.grad(loss, argnums=(0, 1), has_aux=True)(all_variables, x)

    (param_grads, x_grad), outs = forward_and_backward(all_variables, x, mask)
    for name, pooled in outs.items():
        assert np.abs(np.asarray(pooled[0])).max() == 0.0, name
        assert np.isfinite(np.asarray(pooled)).all(), name
    leaves = jax.tree.leaves(param_grads)
    assert len(leaves) >= 4  # p, r, the weight logits, the attention projection
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in leaves)
    assert np.isfinite(np.asarray(x_grad)).all() and np.abs(np.asarray(x_grad[0])).max() == 0.0
