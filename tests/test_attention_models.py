"""Attention inside the models: timm's ResNets with every attention name, timm's ResNet
variants under their names, and CAM / gradient diagnostics over the whole registry.

* timm parity: ``timm.create_model("resnet50", block_args=dict(attn_layer=name))`` (narrow
  and one block per stage, so the test is cheap: the per-block rules are the same at full
  size) with random weights, norm statistics and biases is saved as safetensors and read
  by ``pretrained.load("resnet50", file, attn=name)``: same parameter count, logits within
  a relative error of 1e-4 (max |diff| / max |timm|), and ``pretrained`` writes the file
  back tensor for tensor. timm 1.0.31 cannot build ``GatherExcite`` (it passes ``device``
  / ``dtype`` positionally to ``ConvMlp``), so ``ge`` is built with those calls repaired.
* timm's variants (``resnet50d``, ``ecaresnet50d``, ``resnet26t``, ``seresnext50_32x4d``,
  ``skresnet18``; SK bottlenecks as ``skresnet50``): at full size every torch key and shape
  of ``pretrained.describe`` equals timm's state dict and the parameter counts are equal
  (``jax.eval_shape``, no compilation); narrow copies give timm's logits at 40x40, where
  the average-pool shortcuts meet odd maps (ceil mode).
* The registry in the cnn: for every ``ATTENTIONS`` name, the pre-pool map, CAM's exact
  identity (class map mean + bias = logit), a Grad-CAM map and the gradient-flow
  diagnostics, all names in one compiled program.
* A fork: a module written outside the package registers ``"mine"`` and a training run
  uses it by name, with its options from ``config.model.attn_kwargs``.

Cost: one compilation per group (14 + 1 ResNets, 6 variants, 17 cnns), inputs 8-40 px.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from unittest import mock

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from helpers import tiny_digits
from helpers.torch_reference import import_timm, randomize_
from safetensors.torch import save_file

from gapjax import cam, gradflow, models, pretrained
from gapjax.attention import ATTENTIONS
from gapjax.train import defaults
from gapjax.train.loop import run

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
TOLERANCE = 1e-4
#: timm's lightweight attention names (``timm.layers.create_attn``), which its ResNet
#: blocks build as ``se`` after the last convolution + BN.
TIMM_NAMES = ("se", "ese", "eca", "ecam", "ceca", "ge", "gc", "gca", "cbam", "lcbam", "coord",
              "scoord", "ela", "strip")
#: Narrow copies: timm's ``channels`` / gapjax's ``base_width`` 16 (bottleneck outputs
#: 64..512), one block per stage.
NARROW_TIMM = {"layers": (1, 1, 1, 1), "channels": (16, 32, 64, 128), "num_classes": 10}
NARROW_GAPJAX = {"stage_sizes": (1, 1, 1, 1), "base_width": 16}
#: timm's plain stem is 64 wide whatever ``channels``; its deep stems ``2 stem_width``.
PLAIN_STEM = {"stem_width": 64}


@pytest.fixture(autouse=True, scope="module")
def single_threaded_torch():
    """The references are tiny: torch's thread pool only fights the other test workers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def config_module(name: str):
    """``configs/<name>.py`` as a module."""
    path = Path(__file__).resolve().parents[1] / "configs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"attention_test_config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timm_module():
    return import_timm()


def create_timm(name: str, **kwargs) -> torch.nn.Module:
    """``timm.create_model(name, **kwargs)``; ``ge`` in the blocks is built with timm
    1.0.31's two positional ``*dd`` calls in ``GatherExcite`` repaired."""
    timm = timm_module()
    torch.manual_seed(0)
    from timm.layers import gather_excite

    conv_mlp, create_conv2d = gather_excite.ConvMlp, gather_excite.create_conv2d
    with mock.patch.object(gather_excite, "ConvMlp",
                           lambda i, h, *_, **kw: conv_mlp(i, h, **kw)), \
            mock.patch.object(gather_excite, "create_conv2d",
                              lambda i, o, *_, **kw: create_conv2d(i, o, **kw)):
        return timm.create_model(name, pretrained=False, **kwargs)


def randomized(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """``randomize_`` (BatchNorm affine and statistics, Conv2d / Linear biases) plus the
    parameters it leaves at their init: every other norm's affine parameters, Conv1d
    biases, and any all-zero weight (the zero-initialised last BN scales, GC's additive
    ``fc2``), so that no layer is trivial."""
    randomize_(module, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, torch.nn.LayerNorm | torch.nn.GroupNorm):
                sub.weight.copy_(0.5 + torch.rand(sub.weight.shape, generator=generator))
                sub.bias.copy_(0.1 * torch.randn(sub.bias.shape, generator=generator))
            elif isinstance(sub, torch.nn.Conv1d) and sub.bias is not None:
                sub.bias.copy_(0.1 * torch.randn(sub.bias.shape, generator=generator))
            weight = getattr(sub, "weight", None)
            if isinstance(weight, torch.nn.Parameter) and weight.ndim > 1 \
                    and not bool(weight.any()):
                weight.copy_(torch.randn(weight.shape, generator=generator)
                             / math.sqrt(weight[0].numel()))
    return module.eval()


def parameter_count(tree) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def torch_logits(module: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()


def relative_error(ours, reference) -> float:
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def load_from_timm(reference: torch.nn.Module, name: str, path, **kwargs):
    """Writes ``reference``'s state dict as safetensors and reads it with
    ``pretrained.load(name, path, **kwargs)``; checks the round trip back to torch keys."""
    state = {key: value.contiguous() for key, value in reference.state_dict().items()}
    save_file(state, str(path))
    model, variables = pretrained.load(name, path, num_classes=NARROW_TIMM["num_classes"],
                                       **kwargs)
    assert parameter_count(variables["params"]) == sum(p.numel() for p in reference.parameters())
    written = pretrained.state_dict_from_variables(name, variables)
    assert written.keys() == state.keys()
    for key, value in state.items():
        if not key.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(written[key], value.numpy(), err_msg=key)
    return model, variables


def compiled_logits(pairs, images: np.ndarray) -> list[np.ndarray]:
    """Logits of every ``(model, variables)`` pair, all in one compiled program."""
    models_only = [model for model, _ in pairs]

    def logits(variables, images):
        return [model.apply(v, images, train=False) for model, v in zip(models_only, variables)]

    variables = [v for _, v in pairs]
    program = jax.jit(logits).lower(variables, images).compile(FAST_COMPILE)
    return [np.asarray(out) for out in program(variables, images)]


# --------------------------------------------------------------------------------------
# timm's ResNet with every attention name in its blocks
# --------------------------------------------------------------------------------------

#: (timm model, attention, gapjax name): every name in Bottlenecks, one in BasicBlocks.
ATTENTION_CASES = [("resnet50", name, "resnet50") for name in TIMM_NAMES] + [
    ("resnet18", "cbam", "resnet18")]


def test_timm_resnets_with_each_attention_load_and_match(tmp_path):
    images = np.random.default_rng(0).standard_normal((2, 40, 40, 3), np.float32)
    pairs, expected = [], []
    for index, (timm_name, attn, name) in enumerate(ATTENTION_CASES):
        reference = randomized(create_timm(timm_name, block_args={"attn_layer": attn},
                                           **NARROW_TIMM), seed=index)
        pairs.append(load_from_timm(reference, name, tmp_path / f"{attn}_{name}.safetensors",
                                    attn=attn, **NARROW_GAPJAX, **PLAIN_STEM))
        expected.append(torch_logits(reference, images))
    for (timm_name, attn, _), ours, theirs in zip(ATTENTION_CASES, compiled_logits(pairs, images),
                                                 expected):
        error = relative_error(ours, theirs)
        assert error <= TOLERANCE, f"{timm_name} with attn_layer={attn!r}: {error:.2e}"
    assert {attn for _, attn, _ in ATTENTION_CASES} == set(TIMM_NAMES)


def test_attention_options_reach_every_block_and_name_timm_keys():
    """``attn_kwargs`` are the module's options in every block (here ECA with a GeM
    squeeze: GeM's ``p`` per block); the torch keys of a ResNet's attention are timm's
    (``layer<i>.<j>.se.<module path>``) with Conv1d kernels ``[out, in, k]``."""
    model = models.get("resnet50", num_classes=10, attn="eca",
                       attn_kwargs={"squeeze": "gem", "kernel_size": 5})
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    blocks = [key for key in shapes["params"] if key.startswith("layer")]
    assert len(blocks) == 16
    assert all(shapes["params"][key]["se"]["squeeze"]["p"].shape == () for key in blocks)
    rows = {key: (shape, transform)
            for key, shape, _, transform in pretrained.describe("ecaresnet50d")}
    assert rows["layer4.2.se.conv.weight"] == ((1, 1, 7), "conv1d")  # C = 2048: k = 7
    coord = {key: shape for key, shape, _, _ in pretrained.describe("resnet18", attn="coord")}
    assert coord["layer1.0.se.conv1.weight"] == (8, 64, 1, 1)
    assert coord["layer1.0.se.bn1.running_var"] == (8,)


# --------------------------------------------------------------------------------------
# timm's ResNet variants under their names
# --------------------------------------------------------------------------------------

#: gapjax name -> (timm name, gapjax options, narrow timm options, narrow gapjax options).
VARIANTS = {
    "resnet50d": ("resnet50d", {}, {"stem_width": 8}, {}),
    "ecaresnet50d": ("ecaresnet50d", {}, {"stem_width": 8}, {}),
    "resnet26t": ("resnet26t", {}, {"stem_width": 8}, {}),
    "seresnext50_32x4d": ("seresnext50_32x4d", {}, {}, PLAIN_STEM),
    "skresnet18": ("skresnet18", {}, {}, PLAIN_STEM),
    "resnet50": ("skresnet50", {"block": "sk_bottleneck", "sk_kwargs": {"split_input": True}},
                 {}, PLAIN_STEM),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_timm_variant_keys_shapes_and_counts(name):
    timm_name, options, _, _ = VARIANTS[name]
    reference = create_timm(timm_name)
    state = {key: tuple(value.shape) for key, value in reference.state_dict().items()}
    rows = {key: tuple(shape) for key, shape, _, _ in pretrained.describe(name, **options)}
    assert rows == state
    model = models.get(name, num_classes=1000, **options)
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    assert parameter_count(abstract["params"]) == sum(p.numel() for p in reference.parameters())


def test_timm_variants_give_timm_logits(tmp_path):
    images = np.random.default_rng(1).standard_normal((2, 40, 40, 3), np.float32)
    pairs, expected = [], []
    for index, (name, (timm_name, options, narrow_timm, narrow_gapjax)) in enumerate(
            VARIANTS.items()):
        reference = randomized(create_timm(timm_name, **NARROW_TIMM, **narrow_timm), index)
        pairs.append(load_from_timm(reference, name, tmp_path / f"{timm_name}.safetensors",
                                    **options, **NARROW_GAPJAX, **narrow_gapjax))
        expected.append(torch_logits(reference, images))
    for (timm_name, *_), ours, theirs in zip(VARIANTS.values(), compiled_logits(pairs, images),
                                            expected):
        assert relative_error(ours, theirs) <= TOLERANCE, timm_name


def test_variant_options_fail_in_one_line():
    images = jnp.zeros((1, 32, 32, 3))
    for kwargs, message in [
        ({"block": "basic", "groups": 32}, r"block='basic' takes groups=1"),
        ({"block": "basic", "sk_kwargs": {"split_input": False}}, r"sk_kwargs apply to the SK"),
        ({"block": "sk_basic", "zero_init_residual": True}, r"zero_init_residual=True is not"),
        ({"block": "sk_basic", "sk_kwargs": {"kernel_size": (3, 4)}}, r"kernel_size=\(3, 4\)"),
    ]:
        model = models.get("resnet18", num_classes=3, **kwargs)
        with pytest.raises(ValueError, match=message):
            jax.eval_shape(model.init, jax.random.key(0), images)


# --------------------------------------------------------------------------------------
# Every registry member in the cnn: maps and gradient diagnostics
# --------------------------------------------------------------------------------------


def _random_variables(abstract, seed: int):
    rng = np.random.default_rng(seed)
    flat = flax.traverse_util.flatten_dict(dict(abstract))
    values = {key: (0.5 + rng.random(leaf.shape) if key[-1] == "var"
                    else 0.3 * rng.standard_normal(leaf.shape)).astype(np.float32)
              for key, leaf in flat.items()}
    return jax.tree.map(jnp.asarray, flax.traverse_util.unflatten_dict(values))


def test_every_attention_keeps_maps_exact_and_diagnostics_running():
    """One 16-channel stage with each ``ATTENTIONS`` member: ``forward_features`` is the
    pre-pool map, CAM's class map averages to ``logit - bias`` (the head is still GAP +
    Dense), Grad-CAM gives finite maps in [0, 1], and the gradient-flow diagnostics (the
    traceable form of ``training_diagnostics``) are finite."""
    names = ATTENTIONS.names()
    images = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 1), np.float32))
    labels = jnp.array([0, 1])
    built = {name: models.get("cnn", num_classes=2, widths=(16,), strides=(1,), depth=1,
                              attn=name) for name in names}
    variables = {name: _random_variables(jax.eval_shape(model.init, jax.random.key(0), images),
                                         seed=index)
                 for index, (name, model) in enumerate(built.items())}

    def everything(variables, images):
        out = {}
        for name, model in built.items():
            v = variables[name]
            exact = cam.compute_maps(model, v, images, method="cam", resize=None,
                                     normalize=False, relu=False)
            gradient = cam.compute_maps(model, v, images, method="grad_cam", resize=None)
            out[name] = {
                "features": model.apply(v, images, method="forward_features"),
                "logits": exact.logits, "cam": exact.maps, "targets": exact.targets,
                "grad_cam": gradient.maps,
                "diagnostics": gradflow.gradient_diagnostics(model, v, images, labels,
                                                             "classification"),
            }
        return out

    results = jax.jit(everything).lower(variables, images).compile(FAST_COMPILE)(
        variables, images)
    for name, result in results.items():
        assert result["features"].shape == (2, 8, 8, 16), name
        bias = variables[name]["params"]["head"]["classifier"]["bias"][result["targets"]]
        chosen = result["logits"][jnp.arange(2), result["targets"]]
        np.testing.assert_allclose(result["cam"].mean(axis=(1, 2)) + bias, chosen, rtol=1e-5,
                                   atol=1e-5, err_msg=name)
        maps = np.asarray(result["grad_cam"])
        assert maps.shape == (2, 8, 8) and np.isfinite(maps).all(), name
        assert maps.min() >= 0.0 and maps.max() <= 1.0 + 1e-6, name
        assert all(np.isfinite(float(value)) for value in result["diagnostics"].values()), name
    # The training loop's hook itself, once (it compiles per model).
    hook = gradflow.training_diagnostics(built["eca"], variables["eca"],
                                         {"image": images, "label": labels}, "classification")
    assert hook.keys() == results["eca"]["diagnostics"].keys()


def test_models_take_attention_options_from_a_config():
    """``config.model.attn`` / ``attn_kwargs`` (a ConfigDict, lists included) build the
    module in every block of cnn, ResNet and VGG; the older ``se_*`` options still read."""
    config = ml_collections.ConfigDict({"dtype": "float32", "model": {
        "name": "cnn", "widths": (8, 16), "attn": "cbam",
        "attn_kwargs": {"squeeze": ["gap", "lse"], "rd_ratio": 0.25}}})
    model = models.from_config(config, num_classes=3)
    assert hash(model) == hash(models.from_config(config, num_classes=3))
    images = jnp.zeros((1, 8, 8, 1))
    shapes = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
    assert set(shapes["stage2_se"]["channel"]) == {"fc1", "fc2", "squeeze_1"}  # LSE's r
    assert shapes["stage2_se"]["channel"]["fc1"]["kernel"].shape == (1, 1, 16, 4)
    legacy = models.get("cnn", num_classes=3, widths=(8, 16), attn="se", se_reduction=4,
                        se_divisor=1, se_pool="gem")
    shapes = jax.eval_shape(legacy.init, jax.random.key(0), images)["params"]
    assert shapes["stage2_se"]["fc1"]["kernel"].shape == (1, 1, 16, 4)
    assert "p" in shapes["stage2_se"]["squeeze"]
    vgg = models.get("vgg11_bn", num_classes=3, head="gap", base_width=8, attn="srm")
    rows = {key: leaves for key, _, leaves, _ in pretrained.describe(
        "vgg11_bn", head="gap", base_width=8, attn="srm", num_classes=3)}
    # features: conv 0, bn 1, relu 2, srm 3, pool 4, conv 5 ...
    assert rows["features.3.cfc"] == ("params/block1_se/cfc",)
    assert rows["features.5.weight"] == ("params/conv2_1/kernel",)
    assert "block5_se" in jax.eval_shape(vgg.init, jax.random.key(0),
                                         jnp.zeros((1, 32, 32, 3)))["params"]


@pytest.mark.parametrize("config_file", ["digits", "cluttered_cam", "cifar10_resnet18"])
def test_config_files_take_attention_from_the_command_line(config_file):
    """The image configs hold ``model.attn`` as a string, so ``--config.model.attn=eca``
    overrides it (ml_collections overrides only existing keys of a known type), and
    ``--config.model.attn_kwargs.<key>=<value>`` is an open override; ``""`` is none."""
    config = config_module(config_file).get_config()
    assert config.model.attn == "" and isinstance(config.model.attn, str)
    assert models.from_config(config, 10).attn == ""
    remaining, overrides = defaults.split_open_overrides(
        ["--config.model.attn=eca", "--config.model.attn_kwargs.squeeze=gmp"])
    assert remaining == ["--config.model.attn=eca"]
    config.model.attn = "eca"
    defaults.apply_open_overrides(config, overrides)
    model = models.from_config(config, 10)
    assert model.attn == "eca" and dict(model.attn_kwargs) == {"squeeze": "gmp"}


# --------------------------------------------------------------------------------------
# A fork's attention in a training run
# --------------------------------------------------------------------------------------

FORK_MODULE = '''"""A fork's attention: SE without a bottleneck, squeezing with any pool."""
import flax.linen as nn

from gapjax.attention import ATTENTIONS, Attention


@ATTENTIONS.register("mine")
class FullGate(Attention):
    gate_layer: str = "sigmoid"
    squeeze: str = "gap"

    @nn.compact
    def __call__(self, x, train=False):
        x = self.prepare(x)
        pooled = self.squeeze_with(self.squeeze, x, "squeeze")[:, None, None, :]
        logits = self.conv(x.shape[-1], bias=True, name="fc")(pooled)
        return x * self.gate(logits).astype(x.dtype)
'''


def test_a_fork_attention_trains_by_name(tmp_path):
    """``config.imports`` names the fork's file; ``gapjax.train.run`` imports it before
    anything is built, builds the cnn with ``attn="mine"`` in every stage, its options
    from ``attn_kwargs``, and trains it (the gate's ``fc`` moves)."""
    path = tmp_path / "fork_attention.py"
    path.write_text(FORK_MODULE)
    config = tiny_digits.get_config("3")
    config.log_every = config.eval_every = config.checkpoint_every = 3
    config.imports = (str(path),)
    config.model.attn = "mine"
    config.model.attn_kwargs = ml_collections.ConfigDict({"squeeze": "gmp"})
    assert "mine" not in ATTENTIONS
    try:
        result = run(config, tmp_path / "run")
        trained = result.variables["params"]
        assert set(trained["stage2_se"]) == {"fc"}
        assert result.model.attn == "mine" and result.model.attn_kwargs["squeeze"] == "gmp"
        assert trained["stage2_se"]["fc"]["kernel"].shape == (1, 1, 16, 16)
        assert float(jnp.abs(trained["stage2_se"]["fc"]["bias"]).max()) > 0  # trained
        assert np.isfinite(result.metrics["eval/accuracy"])
    finally:
        ATTENTIONS._entries.pop("mine", None)
        sys.modules.pop("fork_attention", None)
        if str(tmp_path) in sys.path:
            sys.path.remove(str(tmp_path))
