"""Tests of gapjax.layers: the attention a block adds (gapjax.attention's SE and local gate
through the models' helpers, the older SE option names), heads, adaptive pooling,
validation."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gapjax.attention import ACTIVATIONS, LocalExcite, SqueezeExcite
from gapjax.layers import (
    FCHead,
    GAPHead,
    adaptive_avg_pool,
    attention_options,
    block_attention,
    make_attention,
    make_divisible,
)
from gapjax.pooling import gap


def _init(module, *args, scale: float = 0.5, **kwargs):
    """Variables of ``module`` with the right shapes and NumPy random values.

    Shapes come from ``jax.eval_shape`` (no compilation); compiling a real ``init`` costs
    most of a CPU second per module, mostly for the random number generator, and these
    tests need weights, not the default initialisers (tested in test_models).
    """
    shapes = jax.eval_shape(module.init, jax.random.key(0), *args, **kwargs)
    rng = np.random.default_rng(0)
    return jax.tree.map(
        lambda s: jnp.asarray(scale * rng.standard_normal(s.shape, dtype=np.float32)), shapes
    )


def _normal(*shape, seed: int = 0, scale: float = 1.0):
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape, np.float32))


def _apply(module, variables, *args, **kwargs):
    static = tuple(key for key in ("train", "mutable", "output") if key in kwargs)
    return jax.jit(module.apply, static_argnames=static)(variables, *args, **kwargs)


def _gated(module, variables, x):
    """``(output, sown gates)`` of an attention module."""
    out, state = _apply(module, variables, x, mutable=("intermediates",))
    return out, state["intermediates"]["gates"][0]


def _count(tree) -> int:
    return sum(int(leaf.size) for leaf in jax.tree.leaves(tree))


def test_make_divisible_matches_reference_rounding():
    assert make_divisible(4.0, 8, round_limit=0.0) == 8  # never below the divisor
    assert make_divisible(12.0, 8, round_limit=0.0) == 16  # halves round up
    assert make_divisible(11.9, 8, round_limit=0.0) == 8
    assert make_divisible(20.0, 8, round_limit=0.9) == 24  # 16 would lose > 10%
    assert [make_divisible(c / 16, 8, round_limit=0.0) for c in (64, 128, 256, 512, 2048)] \
        == [8, 8, 16, 32, 128]


@pytest.mark.parametrize("gate, low, high", [
    ("sigmoid", 0.0, 1.0), ("hard_sigmoid", 0.0, 1.0), ("tanh", -1.0, 1.0),
])
def test_se_gates_in_range(gate, low, high):
    x = _normal(3, 5, 5, 32, scale=20.0)
    module = make_attention("se", 32, gate_layer=gate)
    variables = _init(module, x)
    # Large weights push the excitation logits far into both tails of the gate.
    variables = jax.tree.map(lambda w: 10.0 * w, variables)
    out, gates = _gated(module, variables, x)
    assert gates.shape == (3, 1, 1, 32)
    assert float(gates.min()) >= low and float(gates.max()) <= high
    assert float(gates.min()) < low + 0.05 and float(gates.max()) > high - 0.05
    np.testing.assert_allclose(out, x * gates, rtol=1e-6)


def test_hard_sigmoid_is_half_at_zero_and_clipped():
    np.testing.assert_array_equal(ACTIVATIONS["hard_sigmoid"](jnp.array([-4.0, 0.0, 4.0])),
                                  [0, 0.5, 1])


def test_se_with_zero_excitation_logits_scales_by_exactly_half():
    x = _normal(2, 4, 4, 16)
    module = make_attention("se", 16)
    params = _init(module, x)["params"]
    params = {**params, "fc2": jax.tree.map(jnp.zeros_like, params["fc2"])}
    out = _apply(module, {"params": params}, x)
    np.testing.assert_array_equal(np.asarray(out), 0.5 * np.asarray(x))


def test_se_bottleneck_width_and_parameter_count():
    x = jnp.ones((1, 3, 3, 64))
    params = jax.eval_shape(make_attention("se").init, jax.random.key(0), x)["params"]
    assert params["fc1"]["kernel"].shape == (1, 1, 64, 8)  # make_divisible(64 / 16, 8)
    assert _count(params) == 64 * 8 + 8 + 8 * 64 + 64
    local = jax.eval_shape(make_attention("local").init, jax.random.key(0), x)["params"]
    assert jax.tree.map(jnp.shape, local) == jax.tree.map(jnp.shape, params)


def test_only_global_context_separates_se_from_local_gate():
    """Two images share pixel (0, 0) and differ everywhere else. A local gate must treat
    that pixel identically in both; SE must not, because its gate sees the whole image."""
    channels = 16
    shared_pixel = jnp.linspace(-1.0, 1.0, channels)
    quiet = jnp.zeros((1, 6, 6, channels)).at[0, 0, 0].set(shared_pixel)
    busy = jnp.tile(jnp.linspace(2.0, -2.0, channels), (1, 6, 6, 1)).at[0, 0, 0].set(shared_pixel)
    images = jnp.concatenate([quiet, busy])

    se = make_attention("se", channels, rd_ratio=0.5)
    params = _init(se, images)["params"]
    local = make_attention("local", channels, rd_ratio=0.5)
    se_out = _apply(se, {"params": params}, images)
    local_out = _apply(local, {"params": params}, images)  # the very same weights

    np.testing.assert_allclose(local_out[0, 0, 0], local_out[1, 0, 0], rtol=1e-6)
    assert float(jnp.abs(se_out[0, 0, 0] - se_out[1, 0, 0]).max()) > 1e-3
    # On a constant image the pooled vector equals every pixel, so the two gates agree.
    constant = jnp.tile(shared_pixel, (1, 4, 4, 1))
    np.testing.assert_allclose(
        _apply(se, {"params": params}, constant), _apply(local, {"params": params}, constant),
        rtol=1e-5, atol=1e-6,
    )


def test_se_squeeze_pool_is_selectable():
    x = jnp.zeros((1, 4, 4, 8)).at[0, 1, 2].set(5.0)  # one bright pixel: mean != max
    outputs = {}
    for pool in ("gap", "gmp", "avgmax", "catavgmax"):
        module = make_attention("se", squeeze=pool, rd_ratio=0.5)
        variables = _init(module, x)
        outputs[pool] = _gated(module, variables, x)[1]
        assert outputs[pool].shape == (1, 1, 1, 8)
    assert not np.allclose(outputs["gap"], outputs["gmp"])
    with pytest.raises(ValueError, match=r"gate_layer='step'.*sigmoid"):
        jax.eval_shape(make_attention("se", gate_layer="step").init, jax.random.key(0), x)


def test_block_attention_and_the_older_se_options():
    """``se_reduction=r, se_divisor, se_pool, se_gate`` are ``rd_ratio=1/r, rd_divisor,
    squeeze, gate_layer``; giving one both ways, a bad reduction or an unknown ``attn``
    is one line."""
    assert attention_options({"squeeze": "gem"}, se_reduction=4, se_divisor=1, se_pool=None,
                             se_gate="tanh") == {"squeeze": "gem", "rd_ratio": 0.25,
                                                 "rd_divisor": 1, "gate_layer": "tanh"}
    assert attention_options(None) == {}
    with pytest.raises(ValueError, match=r"se_pool='gmp' and attn_kwargs.squeeze='gem' set "
                                         r"the same option; keep attn_kwargs.squeeze"):
        attention_options({"squeeze": "gem"}, se_pool="gmp")
    with pytest.raises(ValueError, match=r"se_reduction=0 is not valid"):
        attention_options(None, se_reduction=0)
    module = block_attention("eca", {"squeeze": "gmp"}, 64, name="se")
    assert module.squeeze == "gmp" and module.channels == 64 and module.name == "se"
    assert block_attention(None, {}, 64) is None and block_attention("", {}, 64) is None
    assert isinstance(make_attention("se"), SqueezeExcite)
    assert isinstance(make_attention("local"), LocalExcite)
    assert isinstance(make_attention("se"), nn.Module)
    with pytest.raises(ValueError, match=r"attn='sse' is not valid; choose one of: .*'cbam'"
                                         r".*'se'.*, None"):
        block_attention("sse", {}, 64)


def test_adaptive_avg_pool_bins():
    x = _normal(2, 5, 14, 3)
    assert adaptive_avg_pool(x, (5, 14)) is x
    pooled = adaptive_avg_pool(x, (3, 7))
    # Reference bins: [floor(i * n / k), ceil((i + 1) * n / k)).
    xs = np.asarray(x)
    for i in range(3):
        for j in range(7):
            r0, r1 = (i * 5) // 3, math.ceil((i + 1) * 5 / 3)
            c0, c1 = (j * 14) // 7, math.ceil((j + 1) * 14 / 7)
            np.testing.assert_allclose(
                pooled[:, i, j], xs[:, r0:r1, c0:c1].mean(axis=(1, 2)), rtol=1e-5, atol=1e-6
            )
    tiny = jnp.arange(6.0).reshape(1, 1, 1, 6)
    np.testing.assert_array_equal(adaptive_avg_pool(tiny, (7, 7)), jnp.tile(tiny, (1, 7, 7, 1)))


def test_gap_head_is_pool_then_classifier_in_float32():
    features = _normal(2, 3, 3, 8).astype(jnp.bfloat16)
    head = GAPHead(num_classes=5, dtype=jnp.bfloat16)
    variables = _init(head, features)
    logits = _apply(head, variables, features)
    assert logits.dtype == jnp.float32 and logits.shape == (2, 5)
    kernel = variables["params"]["classifier"]["kernel"]
    bias = variables["params"]["classifier"]["bias"]
    # The pool keeps the compute dtype; the classifier then runs in float32.
    pooled = gap(features).astype(jnp.float32)
    np.testing.assert_allclose(logits, pooled @ kernel + bias, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pool", ["attention", "weighted", "gap", "gmp", "avgmax", "gsp"])
def test_gap_head_contributions_sum_to_the_logits(pool):
    features = _normal(2, 4, 3, 8)
    head = GAPHead(num_classes=3, pool=pool)
    variables = _init(head, features)
    logits = _apply(head, variables, features)
    contributions = _apply(head, variables, features, output="contributions")
    assert contributions.shape == (2, 4, 3, 3)
    bias = variables["params"]["classifier"]["bias"]
    np.testing.assert_allclose(contributions.sum(axis=(1, 2)) + bias, logits, rtol=1e-5,
                               atol=1e-6)


def test_gap_head_norm_and_pre_logits_options():
    """A LayerNorm after the pool keeps exact maps (statistics frozen per image); a
    pre-logits layer (Dense + activation) leaves none. Parameter names are the layouts'."""
    features = _normal(2, 4, 3, 8)
    normed = GAPHead(num_classes=3, pool="attention", norm=True)
    gap_normed = GAPHead(num_classes=3, norm=True)
    pre_logits = GAPHead(num_classes=3, pre_logits=16, pre_logits_act="relu")
    v_norm, v_gap, v_pre = (_init(head, features) for head in (normed, gap_normed, pre_logits))
    assert set(v_norm["params"]) == {"pool", "fc_norm", "classifier"}
    assert set(v_pre["params"]) == {"pre_logits", "classifier"}
    assert v_pre["params"]["pre_logits"]["kernel"].shape == (8, 16)

    @jax.jit
    def outputs(v_norm, v_gap, v_pre):
        return (normed.apply(v_norm, features),
                normed.apply(v_norm, features, output="contributions"),
                gap_normed.apply(v_gap, features),
                gap_normed.apply(v_gap, features, output="class_maps"),
                pre_logits.apply(v_pre, features))

    logits, contributions, gap_logits, class_maps, pre_logits_out = outputs(v_norm, v_gap, v_pre)
    for maps, reduce, head_logits, variables in ((contributions, np.sum, logits, v_norm),
                                                 (class_maps, np.mean, gap_logits, v_gap)):
        np.testing.assert_allclose(reduce(maps, axis=(1, 2)) + variables["params"][
            "classifier"]["bias"], head_logits, rtol=1e-5, atol=1e-5)
    hidden = jax.nn.relu(gap(features) @ v_pre["params"]["pre_logits"]["kernel"]
                         + v_pre["params"]["pre_logits"]["bias"])
    classifier = v_pre["params"]["classifier"]
    np.testing.assert_allclose(pre_logits_out, hidden @ classifier["kernel"] + classifier["bias"],
                               rtol=1e-5, atol=1e-5)
    assert normed.map_kinds == ("contribution",) and pre_logits.map_kinds == ()
    with pytest.raises(ValueError, match=r"pool 'gap' with a pre-logits layer gives no exact"):
        jax.eval_shape(lambda v: pre_logits.apply(v, features, output="contributions"), v_pre)
    with pytest.raises(ValueError, match="pre_logits_act='swish' is not valid"):
        jax.eval_shape(GAPHead(num_classes=3, pre_logits=4, pre_logits_act="swish").init,
                       jax.random.key(0), features)


def test_fc_head_grid_fixes_the_parameter_count_and_flatten_head_checks_size():
    head = FCHead(num_classes=4, widths=(6,), grid=(2, 2))
    small = _init(head, jnp.ones((1, 1, 1, 3)))["params"]
    large = _init(head, jnp.ones((1, 9, 9, 3)))["params"]
    assert _count(small) == _count(large) == (2 * 2 * 3) * 6 + 6 + 6 * 4 + 4
    assert small["classifier"]["kernel"].shape == (6, 4)

    flatten = FCHead(num_classes=4, widths=())
    variables = _init(flatten, jnp.ones((1, 2, 2, 3)))
    assert variables["params"]["classifier"]["kernel"].shape == (12, 4)
    with pytest.raises(ValueError, match="initialised for 12"):
        _apply(flatten, variables, jnp.ones((1, 3, 3, 3)))


def test_fc_head_dropout_needs_train_flag_only():
    head = FCHead(num_classes=2, widths=(8,), dropout=0.5)
    x = jnp.ones((4, 2, 2, 3))
    variables = _init(head, x)
    np.testing.assert_array_equal(_apply(head, variables, x), _apply(head, variables, x))
    a = _apply(head, variables, x, train=True, rngs={"dropout": jax.random.key(1)})
    b = _apply(head, variables, x, train=True, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(a, b)
