"""Identities, limits, gradients, dtypes, transformations and errors of the pool family.

Invariances under permutation and padding live in ``test_pooling_invariance.py``.
"""

import importlib.util
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gapjax import pooling
from gapjax.pooling import POOLS
from gapjax.registry import UnknownNameError

RNG = np.random.default_rng(0)
PARAMETER_FREE = ["gap", "gmp", "gsp", "avgmax", "catavgmax"]


def run(fn, *args):
    """``fn(*args)`` compiled as one program, results as NumPy.

    One compilation per test instead of one per primitive keeps the suite fast on CPU.
    """
    return jax.tree.map(np.asarray, jax.jit(fn)(*args))


def numpy_reference(name: str, x: np.ndarray) -> np.ndarray:
    """What each parameter-free pool means, written over all spatial axes at once."""
    axes = tuple(range(1, x.ndim - 1))
    mean, peak = x.mean(axis=axes), x.max(axis=axes)
    return {
        "gap": mean,
        "gmp": peak,
        "gsp": x.sum(axis=axes),
        "avgmax": (mean + peak) / 2,
        "catavgmax": np.concatenate([mean, peak], axis=-1),
    }[name]


def all_pools(x: jax.Array, aux: jax.Array) -> dict[str, jax.Array]:
    """Every pure pool on ``x [B, *S, C]``; ``aux [B, *S]`` gives weights and scores."""
    return {
        **{name: POOLS.get(name).function(x) for name in PARAMETER_FREE},
        "gem": pooling.gem(x, 3.0),
        "lse": pooling.lse(x, 2.0),
        "weighted": pooling.weighted(x, jnp.abs(aux)),
        "attention": pooling.attention(x, aux),
    }


# --------------------------------------------------------------------------------------
# Registry contents and modules
# --------------------------------------------------------------------------------------


def test_pools_hold_the_design_names_and_aliases():
    primary = {"gap", "gmp", "gsp", "avgmax", "catavgmax", "gem", "lse", "weighted", "attention"}
    assert primary <= set(POOLS.names())
    assert {"mean", "max", "sum"} <= set(POOLS.names(aliases=True))
    assert POOLS.get("mean") is POOLS.get("gap") is pooling.GlobalAvgPool
    assert POOLS.get("max") is pooling.GlobalMaxPool
    assert POOLS.get("sum") is pooling.GlobalSumPool
    for name in primary:
        assert issubclass(POOLS.get(name), pooling.Pool)


@pytest.mark.parametrize(
    "name", ["gap", "gmp", "gsp", "avgmax", "catavgmax", "gem", "lse", "weighted", "attention"]
)
def test_every_module_output_width_matches_its_output(name):
    x = jnp.asarray(RNG.uniform(0.1, 2.0, (2, 3, 4, 5)), jnp.float32)
    mask = jnp.asarray(RNG.random((2, 3, 4)) < 0.7)
    module = POOLS.get(name)()
    variables = jax.jit(module.init)(jax.random.PRNGKey(0), x)
    outs = run(lambda v, x, m: [module.apply(v, x), module.apply(v, x, m)], variables, x, mask)
    for out in outs:
        assert out.shape == (2, module.output_width(5))
        assert out.dtype == x.dtype and np.isfinite(out).all()
    expected = {"catavgmax": 10}.get(name, 5)
    assert module.output_width(5) == expected


def test_parameter_free_modules_equal_their_functions():
    x = jnp.asarray(RNG.normal(size=(2, 3, 4, 5)), jnp.float32)
    outs = run(lambda x: {n: (POOLS.get(n)().apply({}, x), pooling.pool(n, x))
                          for n in PARAMETER_FREE}, x)
    for module_out, function_out in outs.values():
        np.testing.assert_array_equal(module_out, function_out)


def test_modules_with_parameters_start_as_their_pure_functions():
    x = jnp.asarray(RNG.uniform(0.1, 2.0, (2, 6, 3)), jnp.float32)
    gem_module = pooling.GeMPool(p=4.0, per_channel=True)
    lse_module = pooling.LSEPool(r=5.0, learn_r=False)
    weighted_module = pooling.WeightedPool()
    gem_variables = jax.jit(gem_module.init)(jax.random.PRNGKey(0), x)
    weighted_variables = jax.jit(weighted_module.init)(jax.random.PRNGKey(0), x)
    assert gem_variables["params"]["p"].shape == (3,)
    assert jax.jit(lse_module.init)(jax.random.PRNGKey(0), x) == {}

    def compare(x):
        return {
            "gem": (gem_module.apply(gem_variables, x), pooling.gem(x, 4.0)),
            "lse": (lse_module.apply({}, x), pooling.lse(x, 5.0)),
            # A learned weight map starts uniform, i.e. as GAP.
            "weighted": (weighted_module.apply(weighted_variables, x), pooling.gap(x)),
            "weights": (weighted_module.apply(weighted_variables, x, return_weights=True)[1],
                        jnp.full((2, 6), 1 / 6)),
        }

    for name, (module_out, expected) in run(compare, x).items():
        np.testing.assert_allclose(module_out, expected, rtol=1e-6, err_msg=name)


def test_attention_module_weights_are_a_masked_distribution():
    x = jnp.asarray(RNG.normal(size=(2, 3, 4, 5)), jnp.float32)
    mask = jnp.asarray(RNG.random((2, 3, 4)) < 0.6).at[:, 0, 0].set(True)
    module = pooling.AttentionPool(hidden=4)
    variables = jax.jit(module.init)(jax.random.PRNGKey(1), x)
    pooled, weights = run(lambda x, m: module.apply(variables, x, m, return_weights=True), x, mask)
    assert weights.shape == (2, 3, 4)
    np.testing.assert_allclose(weights.sum(axis=(1, 2)), 1.0, rtol=1e-6)
    assert np.abs(np.where(mask, 0.0, weights)).max() == 0.0
    expected = np.einsum("bhw,bhwc->bc", np.asarray(weights), np.asarray(x))
    np.testing.assert_allclose(pooled, expected, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------
# Identities and limits
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("spatial", [(7,), (3, 4), (2, 3, 2)])
@pytest.mark.parametrize("name", PARAMETER_FREE)
def test_parameter_free_pools_over_any_number_of_spatial_axes(name, spatial):
    x = RNG.normal(size=(2, *spatial, 3)).astype(np.float32)
    out = run(lambda x: pooling.pool(name, x), x)
    np.testing.assert_allclose(out, numpy_reference(name, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spatial", [(7,), (3, 4), (2, 3, 2)])
def test_power_means_and_weighted_over_any_number_of_spatial_axes(spatial):
    x = RNG.uniform(0.1, 3.0, size=(2, *spatial, 3)).astype(np.float64)
    w = RNG.uniform(0.0, 1.0, size=(2, *spatial))
    axes = tuple(range(1, x.ndim - 1))
    gem_ref = np.mean(x**3, axis=axes) ** (1 / 3)
    lse_ref = np.log(np.mean(np.exp(2.0 * x), axis=axes)) / 2.0
    w_ref = np.einsum("bn,bnc->bc", w.reshape(2, -1), x.reshape(2, -1, 3)) / w.reshape(2, -1).sum(
        1, keepdims=True
    )
    probs = np.exp(w.reshape(2, -1)) / np.exp(w.reshape(2, -1)).sum(1, keepdims=True)
    att_ref = np.einsum("bn,bnc->bc", probs, x.reshape(2, -1, 3))
    outs = run(
        lambda x, w: [pooling.gem(x, 3.0), pooling.lse(x, 2.0), pooling.weighted(x, w),
                      pooling.attention(x, w)],
        x.astype(np.float32), w.astype(np.float32),
    )
    for out, ref in zip(outs, [gem_ref, lse_ref, w_ref, att_ref]):
        np.testing.assert_allclose(out, ref, rtol=1e-5)


def test_uniform_weights_and_gem_p1_equal_gap():
    x = jnp.asarray(RNG.uniform(0.0, 5.0, (3, 4, 5, 6)), jnp.float32)
    mask = jnp.asarray(RNG.random((3, 4, 5)) < 0.5).at[:, 0, 0].set(True)

    def compare(x, m):
        return [pooling.gap(x, m), pooling.weighted(x, jnp.full((4, 5), 2.5), m),
                pooling.gem(x, 1.0, m), pooling.attention(x, jnp.zeros((3, 4, 5)), m)]

    for m in (None, mask):
        gap, uniform, gem_p1, flat_attention = run(compare, x, m)
        np.testing.assert_allclose(uniform, gap, rtol=1e-6)
        np.testing.assert_allclose(gem_p1, gap, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(flat_attention, gap, rtol=1e-6)


def test_avgmax_catavgmax_and_gsp_definitions():
    x = jnp.asarray(RNG.normal(size=(3, 4, 5, 6)), jnp.float32)
    mask = jnp.asarray(RNG.random((3, 4, 5)) < 0.5).at[:, 0, 0].set(True)
    for m in (None, mask):
        out = run(lambda x, m: {n: pooling.pool(n, x, m) for n in PARAMETER_FREE}, x, m)
        gap, gmp = out["gap"], out["gmp"]
        np.testing.assert_allclose(out["avgmax"], (gap + gmp) / 2, rtol=1e-6, atol=1e-7)
        # The max half is exact; the mean half may differ in summation order.
        np.testing.assert_array_equal(out["catavgmax"][:, 6:], gmp)
        np.testing.assert_allclose(out["catavgmax"][:, :6], gap, rtol=1e-6, atol=1e-7)
        counts = 20.0 if m is None else np.asarray(m).sum(axis=(1, 2))[:, None]
        np.testing.assert_allclose(out["gsp"], gap * counts, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("p", [20.0, 100.0, 500.0, 5000.0])
def test_gem_tends_to_gmp_within_the_power_mean_bound(p):
    # max * N^(-1/p) <= power mean <= max holds exactly, so the gap to GMP is log(N)/p.
    x = jnp.asarray(RNG.uniform(0.0, 50.0, (2, 8, 8, 4)), jnp.float32)
    peak, out = run(lambda x, p: (pooling.gmp(x), pooling.gem(x, p)), x, p)
    assert np.isfinite(out).all()
    assert (out <= peak * (1 + 1e-5)).all()
    assert (out >= peak * 64 ** (-1 / p) * (1 - 1e-5)).all()


def test_gem_is_stable_at_p_500_with_zeros_and_negatives():
    x = jnp.asarray(RNG.normal(size=(3, 5, 4)), jnp.float32)
    x = x.at[0].set(0.0).at[1].set(-jnp.abs(x[1]) - 1.0)  # an all-zero and an all-negative row
    x = x.at[2, 0].set(1e4)  # 1e4 ** 500 overflows anything without the log-space form
    pooled, grads = run(
        lambda x, p: (pooling.gem(x, p),
                      jax.grad(lambda x, p: pooling.gem(x, p).sum(), argnums=(0, 1))(x, p)),
        x, jnp.float32(500.0),
    )
    assert np.isfinite(pooled).all() and all(np.isfinite(g).all() for g in grads)
    np.testing.assert_allclose(pooled[:2], 1e-6, rtol=1e-3)  # clamped to eps
    np.testing.assert_allclose(pooled[2], 1e4 * 5 ** (-1 / 500), rtol=1e-4)
    # Positions at or below eps carry no gradient; the dominant one carries nearly all.
    assert np.abs(grads[0][:2]).max() == 0.0
    np.testing.assert_allclose(grads[0][2, 0], 5 ** (-1 / 500), rtol=1e-3)


def test_lse_tends_to_gap_and_to_gmp():
    x = RNG.normal(size=(2, 6, 6, 3)).astype(np.float32)
    mean, peak = x.mean(axis=(1, 2)), x.max(axis=(1, 2))
    spread = peak - x.min(axis=(1, 2))
    small, large = (1e-4, 1e-2), (1e2, 1e4)
    outs = run(lambda x: [pooling.lse(x, r) for r in small + large], x)
    for r, out in zip(small, outs[:2]):
        # Hoeffding: 0 <= lse_r - mean <= r (max - min)^2 / 8.
        assert (out - mean >= -1e-5).all()
        assert (out - mean <= r * spread**2 / 8 + 1e-5).all()
    for r, out in zip(large, outs[2:]):
        # max - log(N)/r <= lse_r <= max.
        assert (out <= peak + 1e-5).all()
        assert (out >= peak - np.log(36) / r - 1e-5).all()


def test_lse_and_gem_accept_per_channel_parameters():
    x = jnp.asarray(RNG.uniform(0.1, 2.0, (2, 5, 3)), jnp.float32)
    p = jnp.asarray([1.0, 3.0, 8.0])
    for fn in (pooling.gem, pooling.lse):
        per_channel, *scalar = run(
            lambda x, p, fn=fn: [fn(x, p)] + [fn(x, p[c]) for c in range(3)], x, p
        )
        for c in range(3):
            np.testing.assert_allclose(per_channel[:, c], scalar[c][:, c], rtol=1e-6)
    with pytest.raises(ValueError, match=r"gem: p must be a scalar or have shape \[channels\]"):
        pooling.gem(x, jnp.ones(4))
    with pytest.raises(ValueError, match=r"lse: r must be a scalar or have shape \[channels\]"):
        pooling.lse(x, jnp.ones((3, 1)))


# --------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------


def test_gap_gradient_is_one_over_n_everywhere():
    x = jnp.asarray(RNG.normal(size=(2, 3, 5, 4)), jnp.float32)
    grad = run(jax.grad(lambda x: pooling.gap(x).sum()), x)
    np.testing.assert_allclose(grad, np.full(x.shape, 1 / 15), rtol=1e-6)


def test_gap_gradient_with_a_mask_is_one_over_real_count():
    x = jnp.asarray(RNG.normal(size=(3, 3, 5, 4)), jnp.float32)
    mask = np.zeros((3, 3, 5), bool)
    mask[0] = True
    mask[1, :2, :3] = True  # 6 real positions; row 2 has none
    grad = run(jax.grad(lambda x, m: pooling.gap(x, m).sum()), x, mask)
    np.testing.assert_allclose(grad[0], np.full((3, 5, 4), 1 / 15), rtol=1e-6)
    expected = np.where(mask[1, ..., None], 1 / 6, 0.0) * np.ones(4)
    np.testing.assert_allclose(grad[1], expected, rtol=1e-6)
    assert np.abs(grad[2]).max() == 0.0


def test_gmp_gradient_is_one_hot_at_the_first_arg_max():
    # Row-major order over (H, W): (0, 2) comes before (1, 0).
    x = np.zeros((1, 2, 3, 2), np.float32)
    x[0, 0, 2, 0] = x[0, 1, 0, 0] = 5.0  # a tie in channel 0
    x[0, 1, 1, 1] = 3.0  # a unique max in channel 1
    # A second row where every position ties sends its gradient to position (0, 0).
    x = np.concatenate([x, np.zeros_like(x)])
    grad = run(jax.grad(lambda x: pooling.gmp(x).sum()), x)
    expected = np.zeros_like(x)
    expected[0, 0, 2, 0] = expected[0, 1, 1, 1] = 1.0
    expected[1, 0, 0, :] = 1.0
    np.testing.assert_array_equal(grad, expected)


def test_gmp_gradient_with_a_mask_skips_padding_even_when_it_is_larger():
    # Row 1: the lowest finite value is still a real value, never tied with padding.
    lowest = np.finfo(np.float32).min
    x = np.array([[9.0, 2.0, 7.0, 7.0], [1.0, lowest, 5.0, 5.0]], np.float32)[..., None]
    mask = np.array([[False, True, True, True], [False, True, False, False]])
    pooled, grads = run(
        lambda x, m: (pooling.gmp(x, m),
                      jax.vmap(jax.grad(lambda x, m: pooling.gmp(x[None], m[None])[0, 0]))(x, m)),
        x, mask,
    )
    np.testing.assert_array_equal(pooled[:, 0], [7.0, lowest])
    np.testing.assert_array_equal(grads[..., 0], [[0.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]])


def test_forward_mode_follows_the_tie_rule():
    # jvp (and so jacfwd / hessian) of the max-based pools: the tangent at the first
    # maximal real position, and the mean of the tangents over real positions.
    x = jnp.asarray([[[1.0], [4.0], [4.0], [0.0]]], jnp.float32)
    t = jnp.asarray([[[1.0], [2.0], [3.0], [4.0]]], jnp.float32)
    mask = jnp.asarray([[True, False, True, True]])  # the first 4.0 is padding
    _, dpeak = jax.jvp(lambda x: pooling.gmp(x, mask), (x,), (t,))
    _, dcat = jax.jvp(lambda x: pooling.catavgmax(x, mask), (x,), (t,))
    np.testing.assert_allclose(dpeak, [[3.0]])
    np.testing.assert_allclose(dcat, [[(1.0 + 3.0 + 4.0) / 3, 3.0]], rtol=1e-6)
    hessian = jax.hessian(lambda x: pooling.avgmax(x).sum())(x)  # piecewise linear
    np.testing.assert_array_equal(hessian, 0.0)


def test_avgmax_gradient_mixes_uniform_and_one_hot():
    x = jnp.asarray([[[1.0], [4.0], [4.0], [0.0]]], jnp.float32)
    grad = run(jax.grad(lambda x: pooling.avgmax(x).sum()), x)
    np.testing.assert_allclose(grad[0, :, 0], [0.125, 0.625, 0.125, 0.125], rtol=1e-6)


# --------------------------------------------------------------------------------------
# Low-precision inputs accumulate in float32
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_low_precision_inputs_accumulate_in_float32(dtype):
    # 4096 copies of 0.1: a float16 running sum stalls at 256, where 0.1 is less than half
    # the spacing between representable numbers, so the true sum (~409.5) is far away.
    n = 4096
    values = np.full(n, 0.1, np.float16)
    assert np.cumsum(values, dtype=np.float16)[-1] == 256.0
    x = jnp.full((2, n, 1), 0.1, dtype)
    value = float(np.asarray(x[0, 0, 0], np.float64))
    outs = run(lambda x: {
        "gsp": pooling.gsp(x), "gap": pooling.gap(x), "avgmax": pooling.avgmax(x),
        "weighted": pooling.weighted(x, jnp.ones((2, n))), "gem": pooling.gem(x, 3.0),
        "lse": pooling.lse(x, 1.0), "attention": pooling.attention(x, jnp.zeros((2, n))),
    }, x)
    for name, out in outs.items():
        assert out.dtype == dtype, name
        expected = value * n if name == "gsp" else value
        np.testing.assert_allclose(np.asarray(out, np.float64), expected, rtol=1e-2, err_msg=name)


def test_integer_inputs_pool_to_float32():
    x = np.arange(2 * 3 * 2, dtype=np.int32).reshape(2, 3, 2)
    mean, peak = run(lambda x: (pooling.gap(x), pooling.gmp(x)), x)
    np.testing.assert_allclose(mean, [[2.0, 3.0], [8.0, 9.0]])
    assert mean.dtype == np.float32 and peak.dtype == np.int32


@pytest.mark.parametrize("shape", [(0, 3, 4), (2, 0, 4), (2, 0, 2, 3), (2, 3, 0)])
@pytest.mark.parametrize("masked", [False, True])
def test_empty_batches_sets_and_channels_pool_to_zeros(shape, masked):
    # Empty sets pool like fully masked ones: zeros, with finite gradients; an empty batch
    # or channel axis gives an empty result of the right shape.
    x = jnp.ones(shape, jnp.float32)
    mask = jnp.ones(shape[:-1], bool) if masked else None
    aux = jnp.ones(shape[:-1], jnp.float32)
    outs = run(lambda x, m, aux: all_pools(x, aux) if m is None else {
        **{name: POOLS.get(name).function(x, m) for name in PARAMETER_FREE},
        "gem": pooling.gem(x, 3.0, m), "lse": pooling.lse(x, 2.0, m),
        "weighted": pooling.weighted(x, aux, m), "attention": pooling.attention(x, aux, m),
    }, x, mask, aux)
    for name, out in outs.items():
        width = 2 * shape[-1] if name == "catavgmax" else shape[-1]
        assert out.shape == (shape[0], width), name
        np.testing.assert_array_equal(out, 0.0, err_msg=name)
    grads = run(lambda x: [jax.grad(lambda x, n=name: pooling.pool(n, x, mask).sum())(x)
                           for name in (*PARAMETER_FREE, "gem", "lse")], x)
    assert all(g.shape == shape and np.isfinite(g).all() for g in grads)


# --------------------------------------------------------------------------------------
# jit and vmap
# --------------------------------------------------------------------------------------


def test_every_pool_under_jit_and_vmap():
    x = jnp.asarray(RNG.uniform(0.1, 2.0, (3, 2, 4, 5, 3)), jnp.float32)  # [E, B, H, W, C]
    aux = jnp.asarray(RNG.uniform(0.1, 1.0, (3, 2, 4, 5)), jnp.float32)
    single = jax.jit(all_pools)
    one_by_one = [jax.tree.map(np.asarray, single(x[e], aux[e])) for e in range(3)]
    mapped = run(jax.vmap(all_pools), x, aux)
    # The jitted program agrees with op-by-op execution (checked on the cheap pools: eager
    # execution compiles every primitive separately).
    with jax.disable_jit():
        eager = {name: pooling.pool(name, x[0]) for name in PARAMETER_FREE}
    for name, out in eager.items():
        np.testing.assert_allclose(one_by_one[0][name], out, rtol=1e-6, err_msg=name)
    for name in one_by_one[0]:
        stacked = np.stack([one_by_one[e][name] for e in range(3)])
        np.testing.assert_allclose(mapped[name], stacked, rtol=1e-5, err_msg=name)


# --------------------------------------------------------------------------------------
# Forks and errors
# --------------------------------------------------------------------------------------


def _load_fork():
    """Imports tests/pool_fork_example.py once, as a fork's own module would be."""
    name = "gapjax_pool_fork_example"
    if name not in sys.modules:
        path = Path(__file__).with_name("pool_fork_example.py")
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_a_fork_registers_its_own_pool_and_selects_it_by_name():
    fork = _load_fork()
    assert "mine" in POOLS and POOLS.get("rms") is fork.RootMeanSquarePool
    x = jnp.asarray(RNG.normal(size=(2, 3, 4, 5)), jnp.float32)
    pool_module = POOLS.get("mine")()
    # Masks work because the fork builds on the pure functions.
    mask = np.zeros((2, 3, 4), bool)
    mask[0] = True
    out, grad = run(lambda x, m: (pool_module.apply({}, x),
                                  jax.grad(lambda x: pool_module.apply({}, x, m).sum())(x)),
                    x, mask)
    expected = np.sqrt(np.mean(np.square(np.asarray(x)), axis=(1, 2)))
    np.testing.assert_allclose(out, expected, rtol=1e-5)
    assert out.shape == (2, pool_module.output_width(5))
    assert np.isfinite(grad).all() and np.abs(grad[1]).max() == 0.0


def test_unknown_pool_name_is_a_one_line_error_listing_choices():
    for lookup in (POOLS.get, lambda name: pooling.pool(name, jnp.ones((1, 2, 3)))):
        with pytest.raises(UnknownNameError) as info:
            lookup("gapp")
        message = str(info.value)
        assert "\n" not in message
        assert "unknown pool 'gapp'; choose one of: " in message
        for name in ("attention", "avgmax", "catavgmax", "gap", "gem", "gmp", "gsp", "lse",
                     "max", "mean", "sum", "weighted"):
            assert name in message
        assert "did you mean 'gap'?" in message


def test_pool_by_name_calls_the_pure_function_or_the_module_at_init():
    x = jnp.ones((1, 2, 3))
    attention = pooling.make_pool("attention")
    np.testing.assert_array_equal(
        pooling.pool("attention", x),
        attention.apply(attention.init(jax.random.key(0), x), x))
    with pytest.raises(ValueError, match=r"unexpected keyword arguments \['p'\]"):
        pooling.pool("gap", x, p=3.0)
    by_name, direct = run(
        lambda x: ([pooling.pool("gem", x, p=2.0, eps=0.5), pooling.pool("lse", x, r=2.0)],
                   [pooling.gem(x, 2.0, eps=0.5), pooling.lse(x, 2.0)]), x)
    np.testing.assert_array_equal(by_name, direct)


def _pure_calls(x, mask=None):
    aux = jnp.ones(x.shape[:-1]) if x.ndim >= 2 else jnp.ones(1)
    return {
        **{name: (lambda n=name: pooling.pool(n, x, mask)) for name in PARAMETER_FREE},
        "gem": lambda: pooling.gem(x, 3.0, mask),
        "lse": lambda: pooling.lse(x, 3.0, mask),
        "weighted": lambda: pooling.weighted(x, aux, mask),
        "attention": lambda: pooling.attention(x, aux, mask),
    }


@pytest.mark.parametrize("shape", [(4,), (2, 4)])
def test_wrong_rank_is_a_clear_error(shape):
    for name, call in _pure_calls(jnp.ones(shape)).items():
        with pytest.raises(ValueError, match=r"rank >= 3; got shape") as info:
            call()
        assert str(shape) in str(info.value), name
    module = pooling.AttentionPool()
    with pytest.raises(ValueError, match=r"rank >= 3; got shape \(2, 4\)"):
        module.init(jax.random.PRNGKey(0), jnp.ones((2, 4)))


def test_mask_of_the_wrong_shape_is_a_clear_error():
    x = jnp.ones((2, 3, 4, 5))
    for wrong in (jnp.ones((2, 4, 3), bool), jnp.ones((2, 12), bool), jnp.ones((2, 3, 4, 5), bool)):
        for name, call in _pure_calls(x, wrong).items():
            with pytest.raises(ValueError, match=r"mask must have shape \[batch, \*spatial\]") as e:
                call()
            assert "(2, 3, 4)" in str(e.value) and str(tuple(wrong.shape)) in str(e.value), name
    module = pooling.AttentionPool()
    with pytest.raises(ValueError, match=r"mask must have shape"):
        module.init(jax.random.PRNGKey(0), x, jnp.ones((2, 4, 3), bool))
    with pytest.raises(ValueError, match=r"mask must have the shape of the scores"):
        pooling.attention_weights(jnp.ones((2, 3, 4)), jnp.ones((2, 12), bool))


def test_weights_and_scores_of_the_wrong_shape_are_clear_errors():
    x = jnp.ones((2, 3, 4, 5))
    with pytest.raises(ValueError, match=r"weights must have shape \[batch, \*spatial\]"):
        pooling.weighted(x, jnp.ones((2, 4, 3)))
    with pytest.raises(ValueError, match=r"attention scores must have shape"):
        pooling.attention(x, jnp.ones((2, 12)))


def _weights_and_contributions(x, mask):
    """Per registered pool: ``(pooled, declared weights or None, contributions or None)``."""
    out = {}
    for name in POOLS.names():
        module, pool_class = pooling.make_pool(name), POOLS.get(name)
        variables = module.init(jax.random.key(0), x, mask)
        weights = (module.apply(variables, x, mask, return_weights=True)[1]
                   if pool_class.weighting is not None else None)
        split = (module.apply(variables, x, mask, method="contributions")
                 if "contribution" in pool_class.exact_maps() else None)
        out[name] = (module.apply(variables, x, mask), weights, split)
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_declared_weights_and_contributions_reproduce_every_pool(seed):
    """Every registered pool that declares a weighting returns weights with
    ``pooled == sum_i w_i x_i`` (per channel for "channel"), and every pool with exact
    contributions (a weighting, or its own: MAP) splits the pooled vector exactly: shares
    summing to it, weights summing to one; padding gets nothing."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(3, 4, 5, 8)), jnp.float32)
    mask = jnp.asarray(rng.random((3, 4, 5)) < 0.6).at[:, 1, 2].set(True)
    results = run(_weights_and_contributions, x, mask)
    padding = ~np.asarray(mask)
    declared = [name for name in results if results[name][1] is not None]
    assert {"gap", "gmp", "gsp", "avgmax", "weighted", "attention", "token"} <= set(declared)
    for name in declared:
        pooled, weights, _ = results[name]
        if POOLS.get(name).weighting == "channel":
            assert weights.shape == x.shape
            rebuilt = (weights * x).sum(axis=(1, 2))
        else:
            assert weights.shape == x.shape[:-1]
            rebuilt = (weights[..., None] * x).sum(axis=(1, 2))
        np.testing.assert_array_equal(weights[padding], 0.0)
        np.testing.assert_allclose(pooled, rebuilt, rtol=1e-5, atol=1e-5, err_msg=name)
    split = [name for name in results if results[name][2] is not None]
    assert set(declared) | {"map"} == set(split)
    for name in split:
        pooled, _, (shares, weights) = results[name]
        assert shares.shape == (3, 4, 5, 8) and weights.shape[:3] == (3, 4, 5)
        np.testing.assert_allclose(shares.sum(axis=(1, 2)), pooled, rtol=1e-4, atol=1e-5,
                                   err_msg=name)
        np.testing.assert_allclose(weights.sum(axis=(1, 2)), 1.0, rtol=1e-5, err_msg=name)
        np.testing.assert_array_equal(shares[padding], 0.0)
        np.testing.assert_array_equal(weights[padding], 0.0)
    with pytest.raises(ValueError, match=r"GeMPool is not a weighted sum.*grad_cam"):
        jax.eval_shape(lambda x: pooling.make_pool("gem", learn_p=False).apply(
            {}, x, method="contributions"), x)


def test_class_token_pool_reads_the_first_real_position():
    """``token`` reads position 0 (a ViT's class token): the first real position of a set,
    zeros for an empty one, a one-hot gradient there; the same per graph."""
    x = jnp.asarray(RNG.normal(size=(3, 4, 2)), jnp.float32)
    mask = jnp.array([[True] * 4, [False, False, True, True], [False] * 4])

    def outputs(x, mask):
        module = POOLS.get("token")()
        gradient = jax.grad(lambda x: pooling.pool("token", x, mask).sum())(x)
        segments = module.apply({}, x.reshape(12, 2), jnp.repeat(jnp.arange(3), 4), 3,
                                mask.reshape(12), method="segment")
        return module.apply({}, x), pooling.pool("token", x, mask), gradient, segments

    plain, masked, gradient, segments = run(outputs, x, mask)
    assert POOLS.get("token").reads_class_token and not POOLS.get("gap").reads_class_token
    np.testing.assert_array_equal(plain, x[:, 0])
    np.testing.assert_array_equal(masked, np.stack([x[0, 0], x[1, 2], np.zeros(2)]))
    np.testing.assert_array_equal(segments, masked)
    expected = np.zeros((3, 4, 2), np.float32)
    expected[0, 0], expected[1, 2] = 1.0, 1.0
    np.testing.assert_array_equal(gradient, expected)
