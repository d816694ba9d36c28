"""EfficientNet, MobileNetV3, RegNetY and ConvNeXt against timm.

* Parameter counts equal timm's for all 11 names (timm built on the meta device, gapjax
  through ``jax.eval_shape``: nothing is allocated or compiled).
* The architecture rules (channel rounding, depth scaling, SE widths, skips, drop path
  rates; RegNet's width / depth / group design rule) equal timm's block by block for more
  configurations than are registered (EfficientNet-B0..B7, every RegNetX/Y of timm).
* Eval-mode logits equal timm's for every name: random timm weights (every weight, BN
  statistic, bias, LayerNorm and layer scale redrawn) saved as .safetensors and read by
  ``gapjax.pretrained.load``, at 64x64 (a 2x2 final map), relative error <= 1e-4; one
  compiled forward per model. For one model of each family ``pretrained.save`` writes a
  file timm loads with ``strict=True``, every tensor bit for bit.
* Map kinds: where a head claims exact maps, CAM averages (+ bias) and contributions sum
  (+ bias) to the logits; elsewhere the head methods raise a ValueError naming grad_cam and
  ``gapjax.cam`` resolves ``"auto"`` to Grad-CAM (the CAM CLI test draws a MobileNetV3's
  Grad-CAM from a weight file written by ``pretrained.save``).
* ``attn_kwargs`` reaches every SE block (``gapjax.attention``'s ``"se"``) over the
  family's options; a misspelt option is one line naming the valid ones.
* Drop path is per example in training and off in evaluation; bfloat16 compute keeps
  float32 parameters, statistics and logits.
"""

from __future__ import annotations

import functools
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers.torch_reference import import_timm
from PIL import Image

from gapjax import cam, imagenet, pretrained
from gapjax.cli import cam as cam_cli
from gapjax.models import efficientnet as effnet
from gapjax.models import get, mbconv, mobilenetv3, regnet
from gapjax.models import summary as summary_module

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
NAMES = (
    "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3",
    "mobilenetv3_large_100", "mobilenetv3_small_100", "regnety_016", "regnety_032",
    "convnext_atto", "convnext_tiny", "convnext_small",
)
#: Channels of the pre-pool map (forward_features) of each model.
FEATURE_WIDTHS = {
    "efficientnet_b0": 1280, "efficientnet_b1": 1280, "efficientnet_b2": 1408,
    "efficientnet_b3": 1536, "mobilenetv3_large_100": 960, "mobilenetv3_small_100": 576,
    "regnety_016": 888, "regnety_032": 1512, "convnext_atto": 320, "convnext_tiny": 768,
    "convnext_small": 768,
}
#: One model per family: the save -> timm strict-load round trip.
ROUND_TRIP = ("efficientnet_b0", "mobilenetv3_small_100", "regnety_016", "convnext_atto")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The torch references run single-threaded: their forward passes are tiny, and two
    threads on a busy 2-core machine spend most of their time waiting on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def timm():
    return import_timm()


def meta_timm_model(name: str, **kwargs) -> torch.nn.Module:
    """timm's model on the meta device: its structure and shapes, no memory, no init."""
    with torch.device("meta"):
        return timm().create_model(name, pretrained=False, **kwargs)


def random_timm_model(name: str, seed: int) -> torch.nn.Module:
    """timm's ``name`` in eval mode with every tensor redrawn: kernels uniform with variance
    ``1 / fan_in``, BN / LayerNorm scales and layer scales (``gamma``) in [0.5, 1.5],
    biases and running means in [-0.1, 0.1], running variances in [0.5, 2], counters
    random. (NumPy's uniform draws: much cheaper than timm's own initialisation of 50M
    parameters.)"""
    model = meta_timm_model(name).to_empty(device="cpu")
    rng = np.random.default_rng(seed)

    def uniform(shape, low, high):
        return low + (high - low) * rng.random(shape, np.float32)

    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            leaf, shape = key.rsplit(".", 1)[-1], tuple(tensor.shape)
            if leaf == "num_batches_tracked":
                value = np.array(rng.integers(1, 1000), np.int64)
            elif len(shape) >= 2:
                bound = math.sqrt(3.0 / math.prod(shape[1:]))
                value = uniform(shape, -bound, bound)
            elif leaf == "running_var":
                value = uniform(shape, 0.5, 2.0)
            elif leaf in ("weight", "gamma"):
                value = uniform(shape, 0.5, 1.5)
            else:
                value = uniform(shape, -0.1, 0.1)
            tensor.copy_(torch.from_numpy(np.asarray(value)))
    return model.eval()


def count(tree) -> int:
    return int(sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))


def numpy_variables(model, inputs, *, method=None, seed: int = 0):
    """Random variables of the right shapes without compiling ``init``: kernels and
    biases ``N(0, 0.1)``-ish, norm scales in [0.5, 1.5], BN variances in [0.5, 2]."""
    init = functools.partial(model.init, method=method) if method else model.init
    shapes = jax.eval_shape(init, jax.random.key(0), inputs)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        key = getattr(path[-1], "key", None)
        if key == "var":
            return jnp.asarray(0.5 + 1.5 * rng.random(leaf.shape, np.float32))
        if key in ("scale", "gamma"):
            return jnp.asarray(0.5 + rng.random(leaf.shape, np.float32))
        fan_in = math.prod(leaf.shape[:-1]) if len(leaf.shape) >= 2 else 10
        return jnp.asarray(rng.standard_normal(leaf.shape, np.float32) / math.sqrt(fan_in))

    return jax.tree_util.tree_map_with_path(fill, shapes)


def compiled(fn, *args):
    return jax.jit(fn).lower(*args).compile(FAST_COMPILE)


def torch_logits(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()


# --------------------------------------------------------------------------------------
# Structure: parameter counts and the architecture rules (no compilation)
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=NAMES)
def name(request):
    """One model name; module-scoped so that pytest runs each name's tests together and
    ``pretrained.load`` finds the model's abstract variables that ``describe`` traced."""
    return request.param


def test_layout_and_parameter_count_equal_timm(name):
    reference = meta_timm_model(name)
    # describe traces the model with jax.eval_shape (no compilation) at 224x224.
    rows = pretrained.describe(name)
    assert {key: tuple(shape) for key, shape, _, _ in rows} == {
        key: tuple(tensor.shape) for key, tensor in reference.state_dict().items()}
    params = sum(math.prod(shape) for _, shape, leaves, _ in rows
                 if leaves and leaves[0].startswith("params/"))
    assert params == sum(p.numel() for p in reference.parameters())


def _timm_efficientnet_blocks(model: torch.nn.Module) -> list[tuple]:
    rows = []
    for stage in model.blocks:
        for block in stage:
            se = getattr(block, "se", None)
            se_channels = se.conv_reduce.out_channels if hasattr(se, "conv_reduce") else 0
            kind = {"DepthwiseSeparableConv": "ds", "InvertedResidual": "ir",
                    "ConvBnAct": "cn"}[type(block).__name__]
            conv = block.conv if kind == "cn" else block.conv_dw
            mid = block.conv_dw.in_channels if kind != "cn" else conv.in_channels
            out = (block.conv_pwl if kind == "ir" else block.conv_pw if kind == "ds"
                   else block.conv).out_channels
            drop = getattr(block.drop_path, "drop_prob", 0.0)
            rows.append((kind, conv.in_channels if kind == "cn" else None, mid, out,
                         conv.kernel_size[0], conv.stride[0], se_channels, block.has_skip,
                         round(drop, 6)))
    return rows


def _gapjax_blocks(stages) -> list[tuple]:
    return [(cfg.kind, cfg.in_channels if cfg.kind == "cn" else None, cfg.mid_channels,
             cfg.out_channels, cfg.kernel, cfg.stride, cfg.se_channels, cfg.skip,
             round(cfg.drop_path, 6)) for stage in stages for cfg in stage]


@pytest.mark.parametrize("width, depth, timm_name", [
    (1.0, 1.0, "efficientnet_b0"), (1.0, 1.1, "efficientnet_b1"),
    (1.1, 1.2, "efficientnet_b2"), (1.2, 1.4, "efficientnet_b3"),
    (1.4, 1.8, "efficientnet_b4"), (2.0, 3.1, "efficientnet_b7"),
])
def test_efficientnet_block_rules_equal_timm(width, depth, timm_name):
    reference = meta_timm_model(timm_name, drop_path_rate=0.2)
    stages = mbconv.block_configs(
        effnet.EFFICIENTNET_STAGES, stem_channels=mbconv.round_channels(32, width),
        default_act="silu", width_multiplier=width, depth_multiplier=depth, drop_path=0.2)
    assert _gapjax_blocks(stages) == _timm_efficientnet_blocks(reference)
    assert [len(stage) for stage in stages] == [len(stage) for stage in reference.blocks]


@pytest.mark.parametrize("variant", ["large", "small"])
def test_mobilenetv3_block_rules_equal_timm(variant):
    reference = meta_timm_model(f"mobilenetv3_{variant}_100", drop_path_rate=0.2)
    stages = mbconv.block_configs(
        mobilenetv3.VARIANTS[variant][0], stem_channels=16, default_act="hard_swish",
        se_from_expanded=True, drop_path=0.2)
    assert _gapjax_blocks(stages) == _timm_efficientnet_blocks(reference)
    acts = [type(block.bn1.act).__name__ for stage in reference.blocks for block in stage]
    names = {"ReLU": "relu", "Hardswish": "hard_swish"}
    assert [cfg.act for stage in stages for cfg in stage] == [names[a] for a in acts]


def test_regnet_design_rule_equals_timm_for_every_regnet():
    timm_regnet = __import__("timm.models.regnet", fromlist=["model_cfgs"])
    checked = 0
    for name, cfg in timm_regnet.model_cfgs.items():
        if cfg.group_min_ratio:
            continue  # another rounding of the group widths (no RegNetX / Y uses it)
        stage_args, _ = timm_regnet.RegNet._get_stage_args(None, cfg, drop_path_rate=0.3)
        widths, depths, groups = regnet.regnet_stages(cfg.w0, cfg.wa, cfg.wm, cfg.depth,
                                                      cfg.group_size, cfg.bottle_ratio)
        assert widths == [a["out_chs"] for a in stage_args], name
        assert depths == [a["depth"] for a in stage_args], name
        assert groups == [a["group_size"] for a in stage_args], name
        rates = mbconv.linear_drop_path_rates(0.3, depths)
        timm_rates = [rate for a in stage_args for rate in a["drop_path_rates"]]
        np.testing.assert_allclose([rate for stage in rates for rate in stage], timm_rates,
                                   atol=1e-6)
        checked += 1
    assert checked >= 20


def test_convnext_drop_path_rates_equal_timm():
    reference = meta_timm_model("convnext_tiny", drop_path_rate=0.4)
    timm_rates = [getattr(block.drop_path, "drop_prob", 0.0)
                  for stage in reference.stages for block in stage.blocks]
    ours = [rate for stage in mbconv.linear_drop_path_rates(0.4, (3, 3, 9, 3)) for rate in stage]
    np.testing.assert_allclose(ours, timm_rates, atol=1e-6)


# --------------------------------------------------------------------------------------
# timm parity: every name, random weights, one compiled forward each
# --------------------------------------------------------------------------------------


def test_logits_equal_timm_after_loading_its_weights(name, tmp_path):
    from safetensors.torch import load_file, save_file

    reference = random_timm_model(name, seed=len(name))
    state = {key: value.contiguous() for key, value in reference.state_dict().items()}
    save_file(state, str(tmp_path / "timm.safetensors"))
    model, variables = pretrained.load(name, tmp_path / "timm.safetensors")

    images = np.random.default_rng(1).standard_normal((2, 64, 64, 3), np.float32)
    expected = torch_logits(reference, images)

    def forward(v, x):  # the model contract: the pre-pool map, then the head
        features = model.apply(v, x, method="forward_features")
        return features, model.apply(v, features, method="forward_head")

    features, actual = compiled(forward, variables, images)(variables, images)
    assert features.shape == (2, 2, 2, FEATURE_WIDTHS[name])
    actual = np.asarray(actual)
    relative = np.abs(actual - expected).max() / np.abs(expected).max()
    print(f"{name}: relative logit error {relative:.2e}")
    assert relative <= 1e-4, f"{name}: relative logit error {relative:.2e}"
    np.testing.assert_array_equal(actual.argmax(-1), expected.argmax(-1))

    if name in ROUND_TRIP:  # save -> timm strict load -> every tensor unchanged
        written = pretrained.save(name, variables, tmp_path / "gapjax.safetensors")
        saved = load_file(str(written))
        reference.load_state_dict(saved, strict=True)
        for key, value in state.items():
            if not key.endswith("num_batches_tracked"):
                torch.testing.assert_close(reference.state_dict()[key], value, rtol=0, atol=0)


# --------------------------------------------------------------------------------------
# Map kinds: exact where claimed, a clear fallback elsewhere
# --------------------------------------------------------------------------------------

EXACT = ("cam", "contribution")
MAP_CASES = [(name, "gap", () if name.startswith("mobilenetv3") else EXACT) for name in NAMES]
MAP_CASES += [
    ("convnext_atto", "gmp", ("contribution",)),
    ("convnext_atto", "gem", ()),
    ("efficientnet_b0", "gem", ()),
    ("regnety_016", "attention", ("contribution",)),
]


@pytest.mark.parametrize("model_name, pool, kinds", MAP_CASES)
def test_map_kinds_are_honest(model_name, pool, kinds):
    name = model_name
    model = get(name, num_classes=5, pool=pool)
    assert model.map_kinds == kinds
    assert get(name, num_classes=5, head="fc").map_kinds == ()
    features = np.random.default_rng(2).standard_normal(
        (2, 3, 3, FEATURE_WIDTHS[name]), np.float32)
    variables = numpy_variables(model, features, method="forward_head")
    bias = variables["params"]["head"]["classifier"]["bias"]

    def maps(v, f):
        out = {"logits": model.apply(v, f, method="forward_head")}
        if "cam" in kinds:
            out["cam"] = model.apply(v, f, method="head_class_maps")
        if "contribution" in kinds:
            out["contribution"] = model.apply(v, f, method="head_contributions")
        return out

    out = compiled(maps, variables, features)(variables, features)
    logits = np.asarray(out["logits"])
    scale = np.abs(logits).max()
    if "cam" in kinds:
        np.testing.assert_allclose(out["cam"].mean(axis=(1, 2)) + bias, logits,
                                   atol=1e-5 * scale)
    if "contribution" in kinds:
        np.testing.assert_allclose(out["contribution"].sum(axis=(1, 2)) + bias, logits,
                                   atol=1e-5 * scale)
    linear_head = name.startswith(("efficientnet", "regnety"))
    for kind, method in (("cam", "head_class_maps"), ("contribution", "head_contributions")):
        if kind == "cam" and linear_head:
            continue  # a linear head always has W_k . x_i; it is exact CAM only for gap
        if kind not in kinds:
            with pytest.raises(ValueError, match="grad_cam"):
                model.apply(variables, features, method=method)
    expected_auto = "cam" if "cam" in kinds else (
        "contribution" if kinds and pool != "gmp" else "grad_cam")
    assert cam.resolve_method(model, "auto") == expected_auto


def test_summary_counts_the_head_after_the_pool():
    rows = {row["head"]: row for row in summary_module.head_table(
        "mobilenetv3_small_100", flops=False)}
    # GAP head: pre_logits (576 -> 1024, bias) + classifier; FC head: the 7x7x576 map.
    assert rows["gap"]["params_head"] == 576 * 1024 + 1024 + 1024 * 1000 + 1000
    assert rows["fc"]["params_head"] == 7 * 7 * 576 * 1000 + 1000
    assert rows["gap"]["params_backbone"] == rows["fc"]["params_backbone"]
    assert rows["gap"]["params_total"] == 2_542_856


# --------------------------------------------------------------------------------------
# attn_kwargs: the options of every SE block (shapes only, no compilation)
# --------------------------------------------------------------------------------------


def test_attn_kwargs_reach_every_se_block_over_the_family_defaults():
    images = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)

    def se_shapes(name, attn_kwargs, **kwargs):
        model = get(name, num_classes=4, attn_kwargs=attn_kwargs, **kwargs)
        flat = pretrained.flatten_shapes(jax.eval_shape(model.init, jax.random.key(0), images))
        return {path: shape for path, shape in flat.items() if "/se/" in path}

    # The family defaults (widths, activations, gates) are what the parity tests check;
    # here every SE block takes GeM's learnable exponent and a 4-wide bottleneck. (The
    # RegNetY is cut to depth 4, two stages of two blocks, to trace faster.)
    for name, blocks, options in (("efficientnet_b0", 16, {}),
                                  ("mobilenetv3_small_100", 9, {}),
                                  ("regnety_016", 4, {"depth": 4})):
        shapes = se_shapes(name, {"squeeze": "gem", "rd_channels": 4}, **options)
        by_leaf = {}
        for path, shape in shapes.items():
            by_leaf.setdefault(path.split("/se/")[1], []).append(shape)
        assert len(by_leaf["squeeze/p"]) == len(by_leaf["fc1/kernel"]) == blocks, name
        assert {shape[3] for shape in by_leaf["fc1/kernel"]} == {4}, name
        assert {shape[2] for shape in by_leaf["fc2/kernel"]} == {4}, name
        assert {shape for shape in by_leaf["fc1/bias"]} == {(4,)}, name
    with pytest.raises(ValueError, match=r"no option 'sqeeze'.*valid options: .*squeeze"):
        se_shapes("regnety_016", {"sqeeze": "gem"})


# --------------------------------------------------------------------------------------
# Drop path and bfloat16
# --------------------------------------------------------------------------------------


class _DropPathBranch(nn.Module):
    rate: float

    @nn.compact
    def __call__(self, x, train):
        return mbconv.drop_path(x, self.rate, train)


def test_drop_path_drops_whole_examples_in_training_and_nothing_in_eval():
    branch = jnp.ones((16, 3, 3, 4))
    module = _DropPathBranch(0.5)
    np.testing.assert_array_equal(module.apply({}, branch, False), branch)
    kept = module.apply({}, branch, True, rngs={"dropout": jax.random.key(0)})
    per_example = np.asarray(kept).reshape(16, -1)
    # Each example is dropped whole (0) or kept and scaled by 1 / (1 - rate) (timm's DropPath).
    assert all(set(np.unique(row)) <= {0.0, 2.0} and len(np.unique(row)) == 1
               for row in per_example)
    assert 0 < int((per_example[:, 0] == 0).sum()) < 16


def test_drop_path_in_a_model_and_bfloat16_compute_with_float32_variables():
    images = jnp.asarray(np.tile(np.random.default_rng(3).standard_normal(
        (1, 32, 32, 3), np.float32), (4, 1, 1, 1)))  # four copies of one image
    # MobileNetV3-Small: the cheapest compile, drop path on 7 of its 11 blocks.
    reference = get("mobilenetv3_small_100", num_classes=6)
    low = get("mobilenetv3_small_100", num_classes=6, drop_path=0.5, dtype="bfloat16")
    variables = numpy_variables(reference, images)
    low_shapes = jax.eval_shape(low.init, jax.random.key(0), images)
    assert jax.tree.structure(low_shapes) == jax.tree.structure(variables)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(low_shapes))

    def run(v, x, key):
        train, updates = low.apply(v, x, train=True, mutable=["batch_stats"],
                                   rngs={"dropout": key})
        features = low.apply(v, x, method="forward_features")
        return (reference.apply(v, x), features, low.apply(v, features, method="forward_head"),
                train, updates["batch_stats"])

    key = jax.random.key(4)
    expected, features, logits, train, stats = compiled(run, variables, images, key)(
        variables, images, key)
    assert features.dtype == jnp.bfloat16 and logits.dtype == train.dtype == jnp.float32
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(stats))
    scale = float(jnp.abs(expected).max())
    np.testing.assert_allclose(logits, expected, atol=0.1 * scale)  # eval: no drop path
    assert not np.array_equal(logits, expected)  # bfloat16 really was used
    # Training: the four identical images take different paths (one draw per example).
    assert len({tuple(np.round(np.asarray(row), 3)) for row in train}) > 1


# --------------------------------------------------------------------------------------
# The CAM command line on a file written by pretrained.save
# --------------------------------------------------------------------------------------


def test_cam_cli_draws_grad_cam_for_a_saved_mobilenetv3(tmp_path, capsys):
    from safetensors.torch import load_file
    from sklearn.datasets import load_sample_image

    name = "mobilenetv3_small_100"
    photo = tmp_path / "china.jpg"
    Image.fromarray(load_sample_image("china.jpg")).save(photo, quality=92)
    model = get(name, num_classes=1000)
    variables = numpy_variables(model, jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
    weights = pretrained.save(name, variables, tmp_path / f"{name}.safetensors")
    assert cam.resolve_method(model, "auto") == "grad_cam"

    results = cam_cli.main(["--image", str(photo), "--model", name, "--weights", str(weights),
                        "--batch_size", "1", "--out", str(tmp_path / "maps"), "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(results))
    overlay = Image.open(printed[0]["overlay"])
    assert overlay.format == "PNG" and overlay.width > 600

    # timm reads the same file (strict) and ranks the classes of the same input alike.
    reference = meta_timm_model(name).to_empty(device="cpu")
    reference.load_state_dict(load_file(str(weights)), strict=True)
    inputs = imagenet.eval_transform(imagenet.load_image(photo))[None]
    probabilities = torch.softmax(torch.from_numpy(torch_logits(reference.eval(), inputs)), -1)
    top = printed[0]["top"][0]
    assert top["index"] == int(probabilities.argmax())
    np.testing.assert_allclose(top["probability"], float(probabilities.max()), rtol=1e-3)
