"""Tests of the image classifiers in gapjax.models (cnn, resnet, seresnet, vgg) and the
summary tool: published parameter counts, shapes, a training step for every model, the
feature switch for CAM, deterministic init and bfloat16 compute.

Cost notes (the suite must stay fast on 2 CPU cores): parameter counts and full-depth
shapes come from ``jax.eval_shape`` (tracing only, no compilation); the training step
compiles each architecture once at 32x32 with tiny widths, ResNets with one block per
stage (compile time grows with depth, the code path does not: every block type, stem,
gate and shortcut is still compiled), and fast XLA compile options.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gapjax.models import get
from gapjax.models import summary as summary_module

IMAGE_MODELS = (
    "cnn", "resnet18", "resnet34", "resnet50", "resnet101",
    "seresnet18", "seresnet34", "seresnet50", "seresnet101",
    "vgg11", "vgg11_bn", "vgg16", "vgg16_bn",
)

#: Parameter counts with 1000 classes at 224x224. torchvision: resnet*, vgg*. timm: seresnet*
#: (SE bottleneck make_divisible(C / 16, 8); seresnet50 28,088,024 is published by both
#: timm and other zoos, which agree wherever C / 16 is already a multiple of 8).
PUBLISHED_PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "seresnet18": 11_779_624,
    "seresnet34": 21_960_416,
    "seresnet50": 28_088_024,
    "seresnet101": 49_326_872,
    "vgg11": 132_863_336,
    "vgg11_bn": 132_868_840,
    "vgg16": 138_357_544,
    "vgg16_bn": 138_365_992,
}

#: Tiny widths for the compiled tests; the architecture (stem, blocks, gates, head) is kept.
TINY = {
    "cnn": {"widths": (8, 16, 16)},
    "resnet": {"base_width": 4, "stage_sizes": (1, 1, 1, 1)},
    "vgg": {"base_width": 8, "fc_widths": (16, 16)},
}

#: Compile options for the training-step test: no LLVM optimisation and the classic
#: (non-emitter) CPU fusion code generation compile about 4x faster than the defaults.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


def _family(name: str) -> str:
    return "resnet" if "resnet" in name else ("vgg" if name.startswith("vgg") else "cnn")


def _count(tree) -> int:
    return sum(int(leaf.size) for leaf in jax.tree.leaves(tree))


def _numpy_variables(model, x, scale: float = 0.1):
    """Variables with the right shapes and NumPy random values, without compiling ``init``
    (the random number generator's compile would dominate these tests). BatchNorm
    statistics start at mean 0, variance 1."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        key = getattr(path[-1], "key", None)
        if key == "mean":
            return jnp.zeros(leaf.shape, jnp.float32)
        if key == "var":
            return jnp.ones(leaf.shape, jnp.float32)
        return jnp.asarray(scale * rng.standard_normal(leaf.shape, dtype=np.float32))

    return jax.tree_util.tree_map_with_path(fill, shapes)


def _images(*shape, seed: int = 0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


_STEPS: dict = {}


def _compiled_train_step(model, params, batch_stats, opt_state, images, labels):
    """One SGD-momentum step, compiled once per model configuration: Linen modules compare
    by their attributes, so two names that build equal tiny models share the program."""
    if model in _STEPS:
        return _STEPS[model]
    optimizer = optax.sgd(0.05, momentum=0.9)

    def step(params, batch_stats, opt_state, images, labels, key):
        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": batch_stats}, images, train=True,
                mutable=["batch_stats"], rngs={"dropout": key},
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, (updates["batch_stats"], logits)

        (loss, (new_stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, opt_state, loss, logits

    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    lowered = jax.jit(step).lower(params, batch_stats, opt_state, images, labels, key)
    _STEPS[model] = lowered.compile(FAST_COMPILE)
    return _STEPS[model]


def _fast_jit(fn, *args):
    """``jax.jit(fn)`` compiled for ``args`` with the fast compile options."""
    return jax.jit(fn).lower(*args).compile(FAST_COMPILE)


def _abstract(tree):
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), tree)


# --------------------------------------------------------------------------------------
# Published parameter counts (no compute: eval_shape)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_parameter_count_equals_published_model(name):
    model = get(name, num_classes=1000)
    images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    logits, variables = jax.eval_shape(
        lambda x: model.init_with_output(jax.random.key(0), x, mutable=True), images
    )
    assert _count(variables["params"]) == PUBLISHED_PARAMS[name]
    assert logits.shape == (1, 1000) and logits.dtype == jnp.float32
    features = jax.eval_shape(
        lambda v, x: model.apply(v, x, method="forward_features"), variables, images)
    assert features.shape[1:3] == (7, 7)


def test_se_divisor_one_gives_the_unrounded_count_of_other_zoos():
    # 64 / 16 = 4 SE units when not rounded up to 8: the 11,778,592 some zoos publish.
    model = get("seresnet18", num_classes=1000, se_divisor=1)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    assert _count(shapes["params"]) == 11_778_592


def test_local_gate_costs_exactly_what_se_costs():
    images = jnp.zeros((1, 32, 32, 3))
    counts = {
        attn: _count(jax.eval_shape(
            get("resnet18", num_classes=10, stem="cifar", attn=attn).init,
            jax.random.key(0), images,
        )["params"])
        for attn in ("se", "local", None)
    }
    assert counts["se"] == counts["local"] == counts[None] + 90_112


# --------------------------------------------------------------------------------------
# Every model: full-depth shapes and a compiled training step at 32x32, CIFAR stem
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_every_model_shapes_and_training_step(name):
    images = _images(2, 32, 32, 3)
    labels = jnp.array([1, 7])

    # Full depth and width: output and feature shapes from tracing alone.
    full = get(name, num_classes=10, stem="cifar")
    logits, variables = jax.eval_shape(
        lambda x: full.init_with_output(jax.random.key(0), x, mutable=True), images
    )
    features = jax.eval_shape(
        lambda v, x: full.apply(v, x, method="forward_features"), variables, images)
    expected_hw = {"cnn": (8, 8), "resnet": (4, 4), "vgg": (2, 2)}[_family(name)]
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32
    assert features.shape[:3] == (2, *expected_hw)

    # Tiny widths: compile and run one training step (grad + optax update).
    model = get(name, num_classes=10, stem="cifar", **TINY[_family(name)])
    variables = _numpy_variables(model, images)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    opt_state = optax.sgd(0.05, momentum=0.9).init(params)
    step = _compiled_train_step(
        model, _abstract(params), _abstract(batch_stats), _abstract(opt_state),
        _abstract(images), _abstract(labels),
    )
    new_params, new_stats, _, loss, logits = step(
        params, batch_stats, opt_state, images, labels, jax.random.key(1)
    )
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32
    assert np.isfinite(float(loss))
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), params, new_params)
    stuck = [jax.tree_util.keystr(path) for path, ok in jax.tree_util.tree_leaves_with_path(moved)
             if not ok]
    if name.endswith("_bn"):
        # torchvision's vgg*_bn keep a bias on each convolution although the BatchNorm
        # after it subtracts it out again: its gradient is zero up to rounding.
        stuck = [path for path in stuck if not (path.startswith("['conv") and "bias" in path)]
    assert not stuck, f"parameters without a gradient step: {stuck}"
    stats_moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), batch_stats, new_stats)
    assert all(jax.tree.leaves(stats_moved)), "train=True updates every BatchNorm statistic"


# --------------------------------------------------------------------------------------
# The model contract, heads and pools
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cnn", "resnet18", "seresnet18", "vgg11_bn"])
def test_contract_features_head_and_maps_give_the_logits(name):
    model = get(name, num_classes=4, stem="cifar", head="gap", **TINY[_family(name)])
    images = _images(3, 16, 16, 1 if name == "cnn" else 3)
    variables = _numpy_variables(model, images)

    @jax.jit
    def contract(v, x):
        features = model.apply(v, x, method="forward_features")
        return (model.apply(v, x), features, model.apply(v, features, method="forward_head"),
                model.apply(v, features, method="head_class_maps"),
                model.apply(v, features, method="head_contributions"))

    logits, features, head_logits, maps, contributions = contract(variables, images)
    assert model.map_kinds == ("cam", "contribution")
    np.testing.assert_array_equal(head_logits, logits)  # one forward pass, two calls
    bias = variables["params"]["head"]["classifier"]["bias"]
    np.testing.assert_allclose(maps.mean(axis=(1, 2)) + bias, logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(contributions.sum(axis=(1, 2)) + bias, logits, rtol=1e-5,
                               atol=1e-5)
    expected = jnp.einsum("bhwc,ck->bhwk", features,
                          variables["params"]["head"]["classifier"]["kernel"])
    np.testing.assert_allclose(maps, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pool, kinds", [("gmp", ("contribution",)), ("gem", ()),
                                         ("attention", ("contribution",))])
def test_map_kinds_follow_the_pool_declaration(pool, kinds):
    model = get("cnn", num_classes=3, widths=(4, 8), strides=(1, 2), pool=pool)
    assert model.map_kinds == kinds
    assert get("vgg11", num_classes=3).map_kinds == ()  # the FC head: Grad-CAM only
    images = _images(2, 8, 8, 1)
    variables = _numpy_variables(model, images)
    features = model.apply(variables, images, method="forward_features")
    if kinds:
        maps = model.apply(variables, features, method="head_contributions")
        bias = variables["params"]["head"]["classifier"]["bias"]
        np.testing.assert_allclose(maps.sum(axis=(1, 2)) + bias, model.apply(variables, images),
                                   rtol=1e-5, atol=1e-5)
    else:
        with pytest.raises(ValueError, match="grad_cam"):
            model.apply(variables, features, method="head_contributions")


def test_pool_kwargs_reach_the_head_pool():
    model = get("cnn", num_classes=3, widths=(4, 8), strides=(1, 2), pool="gem",
                pool_kwargs={"p": 5.0, "per_channel": True})
    images = jnp.zeros((1, 8, 8, 1))
    pool_params = _fast_jit(model.init, jax.random.key(0), images)(
        jax.random.key(0), images)["params"]["head"]["pool"]
    assert pool_params["p"].shape == (8,)
    np.testing.assert_array_equal(pool_params["p"], 5.0)
    with pytest.raises(ValueError, match=r"pool 'gem' has no option 'q'.*learn_p, min_p, p"):
        jax.eval_shape(get("cnn", num_classes=3, pool="gem", pool_kwargs={"q": 1}).init,
                       jax.random.key(0), images)


def test_num_classes_and_pool_exponents_are_checked_where_given():
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match=rf"num_classes={bad!r} is not valid.*>= 1"):
            get("cnn", num_classes=bad)
    for pool, option in (("gem", "p"), ("lse", "r")):
        model = get("cnn", num_classes=3, widths=(4,), pool=pool, pool_kwargs={option: 0.0})
        with pytest.raises(ValueError, match=rf"{option}=0.0 is not valid.*> 0"):
            jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4, 4, 1)))


@pytest.mark.parametrize("pool, width", [("gem", 16), ("catavgmax", 32), ("attention", 16)])
def test_gap_head_takes_any_pool(pool, width):
    model = get("cnn", num_classes=5, widths=(8, 16), strides=(1, 2), pool=pool)
    images = jnp.zeros((2, 8, 8, 1))
    _, variables = jax.eval_shape(
        lambda x: model.init_with_output(jax.random.key(0), x, mutable=True), images
    )
    assert variables["params"]["head"]["classifier"]["kernel"].shape == (width, 5)


def test_vgg_fc_head_keeps_the_published_head_at_any_input_size():
    def head_params(size, **kwargs):
        model = get("vgg16", num_classes=1000, **kwargs)
        shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
        return _count(shapes["params"]["head"])

    published_head = 25_088 * 4096 + 4096 + 4096 * 4096 + 4096 + 4096 * 1000 + 1000
    assert head_params(224) == head_params(64) == published_head
    assert head_params(32, stem="cifar") == 2 * 2 * 512 * 4096 + 4096 + 4096 * 4096 + 4096 \
        + 4096 * 1000 + 1000
    assert head_params(224, head="gap") == 512 * 1000 + 1000


# --------------------------------------------------------------------------------------
# Init, dtypes, errors
# --------------------------------------------------------------------------------------


def test_init_is_deterministic():
    model = get("cnn", num_classes=3, widths=(4, 8), strides=(1, 2), attn="se")
    images = jnp.zeros((1, 8, 8, 1))
    init = _fast_jit(model.init, jax.random.key(0), images)
    first, again, other = (init(jax.random.key(seed), images) for seed in (0, 0, 1))
    same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), first, again)
    assert all(jax.tree.leaves(same))
    # Another seed changes every random kernel (biases and BN start at constants).
    pairs = zip(jax.tree_util.tree_leaves_with_path(first["params"]),
                jax.tree.leaves(other["params"]))
    kernels = [bool(jnp.any(a != b)) for (path, a), b in pairs
               if "kernel" in jax.tree_util.keystr(path)]
    assert kernels and all(kernels)
    assert all(jnp.all(stat == 0) for stat in jax.tree.leaves(first["batch_stats"]["stage1_bn1"]
                                                            ["mean"]))


def test_bfloat16_compute_gives_float32_logits_close_to_float32():
    images = _images(4, 16, 16, 1)
    options = {"num_classes": 10, "widths": (8, 16), "strides": (1, 2), "attn": "se"}
    reference = get("cnn", **options)
    low = get("cnn", dtype="bfloat16", **options)  # the config spelling
    assert low.compute_dtype == get("cnn", dtype=jnp.bfloat16, **options).compute_dtype
    variables = _numpy_variables(reference, images, scale=0.3)
    expected = _fast_jit(reference.apply, variables, images)(variables, images)

    def low_apply(variables, images):
        return low.apply(variables, images), low.apply(variables, images,
                                                       method="forward_features")

    actual, features = _fast_jit(low_apply, variables, images)(variables, images)
    assert actual.dtype == jnp.float32
    assert features.dtype == jnp.bfloat16
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables["params"]))
    scale = float(jnp.abs(expected).max())
    np.testing.assert_allclose(actual, expected, atol=0.05 * scale + 1e-3)
    assert not np.array_equal(actual, expected)  # bfloat16 really was used


@pytest.mark.parametrize("kwargs, message", [
    ({"head": "avg"}, r"head='avg' is not valid; choose one of: 'gap', 'fc'"),
    ({"stem": "tiny"}, r"stem='tiny' is not valid; choose one of: 'imagenet', 'deep', "
                       r"'deep_tiered', 'cifar'"),
    ({"attn": "sse"}, r"attn='sse' is not valid; choose one of: .*'cbam'.*'se'.*, None"),
    ({"pool": "medoid"}, r"unknown pool 'medoid'; choose one of: .*gap"),
    ({"se_gate": "step"}, r"gate_layer='step' is not valid"),
    ({"attn_kwargs": {"reduction": 8}}, r"attention 'se' has no option 'reduction'"),
])
def test_bad_options_raise_one_clear_error(kwargs, message):
    model = get("seresnet18", num_classes=10, **kwargs)
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"no option 'width'.*valid options: .*widths"):
        get("cnn", num_classes=10, width=3)
    with pytest.raises(ValueError, match=r"strides=\(1, 2\) must have one entry per stage"):
        jax.eval_shape(get("cnn", num_classes=10, strides=(1, 2)).init, jax.random.key(0),
                       jnp.zeros((1, 8, 8, 1)))
    with pytest.raises(ValueError, match=r"\[batch, height, width, channels\]"):
        jax.eval_shape(get("cnn", num_classes=10).init, jax.random.key(0), jnp.zeros((8, 8)))


# --------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------


def test_summary_splits_parameters_and_counts_flops():
    model = get("cnn", num_classes=10, widths=(8, 16), strides=(1, 2))
    result = summary_module.summary(model, (16, 16, 1))
    assert result["params_head"] == 16 * 10 + 10
    assert result["params_total"] == result["params_backbone"] + result["params_head"]
    assert result["feature_shape"] == (1, 8, 8, 16)
    # The two 3x3 convolutions of the second stage alone: 2 FLOPs per multiply-add.
    assert result["flops"] > 2 * 8 * 8 * 9 * (8 * 16 + 16 * 16)


def test_summary_head_ratio_for_published_models():
    rows = summary_module.head_table("resnet18", flops=False)
    assert {row["head"]: row["params_head"] for row in rows} == {
        "gap": 512 * 1000 + 1000, "fc": 7 * 7 * 512 * 1000 + 1000,  # flatten 7x7: ~49x
    }
    assert rows[0]["params_backbone"] == rows[1]["params_backbone"] == 11_689_512 - 513_000
    vgg = summary_module.head_table("vgg16", flops=False)
    assert summary_module.head_ratio(vgg) == pytest.approx(123_642_856 / 513_000)


def test_summary_cli_prints_the_fc_gap_table(capsys):
    code = summary_module.main(
        ["cnn", "--input", "16", "--channels", "1", "--num_classes", "10", "--no-flops"]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "FC/GAP head parameters: " in out
    gap_line = next(line for line in out.splitlines() if line.startswith("gap "))
    assert "1,290" in gap_line  # 128 * 10 + 10
    assert summary_module.main(["cnn", "--pool", "medoid", "--no-flops"]) == 2
    assert "unknown pool 'medoid'" in capsys.readouterr().err
