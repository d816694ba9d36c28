"""gapjax.attention: the SE family module by module against timm, the papers' definitions of
srm and fca, and the properties every module shares.

* timm parity: timm's module from ``timm.layers.create_attn`` (or its class, for options
  ``create_attn`` cannot pass) with random weights and BatchNorm statistics; its state
  dict becomes gapjax variables through leaf renames alone (``weight`` -> ``kernel`` /
  ``scale``, ``running_mean`` -> ``mean``, kernels transposed), which must fill the gapjax
  tree exactly; outputs agree to a relative error (max |diff| / max |timm|) <= 1e-5 in
  float32, in eval mode and, for the modules with BatchNorm, in train mode.
* ``srm`` and ``fca`` against NumPy transcriptions of their papers' definitions, their
  parameter counts against the papers' ResNet-50 totals; FcaNet's (0, 0) frequency is
  SE on GAP scaled by the DCT's ``sqrt(h w)``; ``local`` is SE at each pixel.
* Every registered module: ``squeeze`` swapped for a fork's pool changes only the squeeze;
  bfloat16 compute returns bfloat16 close to float32; gates stay in the gate function's
  range; one compilation for two calls; the documented parameter formulas at C = 64, 256.

Cost: channels 16-64, maps 7x7 to 16x16, batch 2; one jitted call per parity case.
"""

from __future__ import annotations

import dataclasses
import math
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util
from helpers.torch_reference import import_timm

from gapjax.attention import (
    ATTENTIONS,
    GATE_RANGES,
    Attention,
    dct_filters,
    make_attention,
    make_divisible,
)
from gapjax.attention.functional import (
    FCA_FREQUENCIES,
    fca_frequencies,
    multispectral_pool,
    pooled_dct_filters,
)
from gapjax.pooling import POOLS, Pool, gap
from gapjax.registry import UnknownNameError

TIMM_NAMES = ("se", "ese", "eca", "ecam", "ceca", "ge", "gc", "gca", "cbam", "lcbam", "coord",
              "scoord", "ela", "strip")
OWN_NAMES = ("srm", "fca", "local")
TOLERANCE = 1e-5


@POOLS.register("test_attention_mean_square")
class MeanSquarePool(Pool):
    """A fork's pool: ``mean_i x_i^2`` (GAP of the squares), so swapping it in for GAP on
    ``x`` must equal GAP on ``x * x``."""

    def __call__(self, x, mask=None):
        return gap(jnp.square(x), mask)


# --------------------------------------------------------------------------------------
# timm side: construction, random weights, state dict -> gapjax variables
# --------------------------------------------------------------------------------------


def timm_layers():
    import_timm()
    import timm.layers as timm_layers_module

    return timm_layers_module


def build_timm(name: str, channels: int | None, **kwargs) -> torch.nn.Module:
    """``create_attn(name, channels, **kwargs)``. timm 1.0.31's ``GatherExcite`` passes
    ``device`` / ``dtype`` positionally (``*dd``) to ``ConvMlp`` and ``create_conv2d``,
    which fails, so for ``ge`` those two are wrapped to drop the stray positionals."""
    tl = timm_layers()
    if name != "ge":
        return tl.create_attn(name, channels, **kwargs)
    from timm.layers import gather_excite

    conv_mlp, create_conv2d = gather_excite.ConvMlp, gather_excite.create_conv2d
    with mock.patch.object(gather_excite, "ConvMlp",
                           lambda i, h, *_, **kw: conv_mlp(i, h, **kw)), \
            mock.patch.object(gather_excite, "create_conv2d",
                              lambda i, o, *_, **kw: create_conv2d(i, o, **kw)):
        return tl.create_attn(name, channels, **kwargs)


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every weight random (fan-in scaled), norms' affine parameters and BatchNorm running
    statistics away from 1 / 0, so no layer is an identity and no init (GC's zero
    ``mlp_add.fc2``) hides a layer; returns the module in eval mode."""
    generator = torch.Generator().manual_seed(seed)

    def normal(shape, scale):
        return scale * torch.randn(shape, generator=generator)

    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, torch.nn.Conv1d | torch.nn.Conv2d | torch.nn.Linear):
                fan_in = sub.weight[0].numel()
                sub.weight.copy_(normal(sub.weight.shape, 1.5 / math.sqrt(fan_in)))
                if sub.bias is not None:
                    sub.bias.copy_(normal(sub.bias.shape, 0.2))
            elif isinstance(sub, torch.nn.modules.batchnorm._BatchNorm | torch.nn.LayerNorm
                            | torch.nn.GroupNorm):
                sub.weight.copy_(0.5 + torch.rand(sub.weight.shape, generator=generator))
                sub.bias.copy_(normal(sub.bias.shape, 0.2))
                if getattr(sub, "running_mean", None) is not None:
                    sub.running_mean.copy_(normal(sub.running_mean.shape, 0.2))
                    sub.running_var.copy_(0.5 + torch.rand(sub.running_var.shape,
                                                           generator=generator))
    return module.eval()


def timm_variables(module: torch.nn.Module) -> dict:
    """The gapjax variables of a timm module: module paths unchanged, leaves renamed, conv
    kernels OI(HW) -> (HW)IO, Linear kernels transposed."""
    flat, used = {}, 0
    for path, sub in module.named_modules():
        keys = tuple(path.split(".")) if path else ()
        tensors = {name: t.detach().numpy() for name, t in sub.named_parameters(recurse=False)}
        if isinstance(sub, torch.nn.Conv1d | torch.nn.Conv2d | torch.nn.Linear):
            kernel = tensors.pop("weight")
            perm = {2: (1, 0), 3: (2, 1, 0), 4: (2, 3, 1, 0)}[kernel.ndim]
            flat[("params", *keys, "kernel")] = kernel.transpose(perm)
        elif isinstance(sub, torch.nn.modules.batchnorm._BatchNorm | torch.nn.LayerNorm
                        | torch.nn.GroupNorm):
            flat[("params", *keys, "scale")] = tensors.pop("weight")
            if getattr(sub, "running_mean", None) is not None:
                flat[("batch_stats", *keys, "mean")] = sub.running_mean.numpy()
                flat[("batch_stats", *keys, "var")] = sub.running_var.numpy()
                used += 2 * sub.running_mean.numel()
        if "bias" in tensors:
            flat[("params", *keys, "bias")] = tensors.pop("bias")
        assert not tensors, f"unmapped timm tensors at {path}: {sorted(tensors)}"
    buffers = sum(b.numel() for name, b in module.named_buffers()
                  if not name.endswith("num_batches_tracked"))
    assert used == buffers, "every timm buffer (but counters) maps to a gapjax leaf"
    return traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()})


def torch_forward(module: torch.nn.Module, x: np.ndarray, train: bool = False) -> np.ndarray:
    module.train(train)
    with torch.no_grad():
        out = module(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
    return out.numpy().transpose(0, 2, 3, 1)


def relative_error(ours, reference) -> float:
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def shapes(tree) -> dict:
    return {"/".join(k): tuple(v.shape) for k, v in traverse_util.flatten_dict(tree).items()}


def count(tree) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))


# --------------------------------------------------------------------------------------
# Parity with timm, module by module
# --------------------------------------------------------------------------------------

def _fix_ge_gather(module: torch.nn.Module, global_window: bool) -> None:
    """timm 1.0.31 builds GE-theta's BatchNorms with ``eps='device', momentum='dtype'``
    (the same ``*dd``) and pads its global convolution; replace the norms by plain
    BatchNorms and, for the global gather, drop the padding (the paper's 1x1 output)."""
    for name, sub in list(module.gather.named_children()):
        if isinstance(sub, torch.nn.BatchNorm2d):
            setattr(module.gather, name, torch.nn.BatchNorm2d(sub.num_features))
    if global_window:
        module.gather.conv1.padding = (0, 0)


# (id, gapjax name, gapjax options, timm builder, input [B, H, W, C], train mode too)
PARITY_CASES = [
    ("se", "se", {}, lambda: build_timm("se", 64), (2, 8, 8, 64), False),
    ("se-bn-silu", "se", {"norm_layer": "batchnorm", "act_layer": "silu"},
     lambda: build_timm("se", 32, norm_layer=torch.nn.BatchNorm2d, act_layer="silu"),
     (2, 8, 8, 32), True),
    ("se-avgmax", "se", {"squeeze": "avgmax"}, lambda: build_timm("se", 32, add_maxpool=True),
     (2, 8, 8, 32), False),
    ("ese", "ese", {}, lambda: build_timm("ese", 64), (2, 8, 8, 64), False),
    ("ese-avgmax", "ese", {"squeeze": "avgmax"},
     lambda: build_timm("ese", 16, add_maxpool=True), (2, 8, 8, 16), False),
    ("eca", "eca", {}, lambda: build_timm("eca", 64), (2, 8, 8, 64), False),
    ("eca-k5", "eca", {"kernel_size": 5},
     lambda: timm_layers().EcaModule(None, kernel_size=5), (2, 8, 8, 32), False),
    ("ecam", "ecam", {}, lambda: build_timm("ecam", 64), (2, 8, 8, 64), False),
    ("ecam-16", "ecam", {}, lambda: build_timm("ecam", 16), (2, 8, 8, 16), False),
    ("ceca", "ceca", {}, lambda: build_timm("ceca", 64), (2, 8, 8, 64), False),
    ("ceca-k5", "ceca", {"kernel_size": 5},
     lambda: timm_layers().CecaModule(None, kernel_size=5), (2, 8, 8, 32), False),
    ("ge", "ge", {}, lambda: build_timm("ge", 64), (2, 8, 8, 64), False),
    ("ge-extent2", "ge", {"extent": 2}, lambda: build_timm("ge", 32, extent=2),
     (2, 15, 16, 32), False),
    ("ge-extent4-params", "ge", {"extent": 4, "extra_params": True},
     lambda: build_timm("ge", 32, extent=4, extra_params=True), (2, 16, 13, 32), True),
    ("ge-global-params", "ge", {"extra_params": True, "feat_size": (8, 8)},
     lambda: build_timm("ge", 32, extra_params=True, feat_size=(8, 8)), (2, 8, 8, 32), True),
    ("gc", "gc", {}, lambda: build_timm("gc", 64), (2, 8, 8, 64), False),
    ("gc-mean-both", "gc", {"use_attn": False, "fuse_add": True},
     lambda: build_timm("gc", 32, use_attn=False, fuse_add=True), (2, 8, 8, 32), False),
    ("gca", "gca", {}, lambda: build_timm("gca", 64), (2, 8, 8, 64), False),
    ("cbam", "cbam", {}, lambda: build_timm("cbam", 64), (2, 8, 8, 64), True),
    ("cbam-bias-k3", "cbam", {"mlp_bias": True, "spatial_kernel_size": 3},
     lambda: build_timm("cbam", 32, mlp_bias=True, spatial_kernel_size=3), (2, 8, 8, 32),
     False),
    ("lcbam", "lcbam", {}, lambda: build_timm("lcbam", 64), (2, 8, 8, 64), True),
    ("coord", "coord", {}, lambda: build_timm("coord", 64), (2, 8, 12, 64), True),
    ("coord-nonorm-skip", "coord", {"norm_layer": None, "has_skip": True, "bias": True},
     lambda: build_timm("coord", 32, norm_layer=None, has_skip=True, bias=True),
     (2, 10, 7, 32), False),
    ("scoord", "scoord", {}, lambda: build_timm("scoord", 64), (2, 8, 12, 64), False),
    ("ela", "ela", {}, lambda: build_timm("ela", 64), (2, 12, 8, 64), True),
    ("ela-k5-bias", "ela", {"kernel_size": 5, "bias": True},
     lambda: build_timm("ela", 32, kernel_size=5, bias=True), (2, 8, 9, 32), False),
    ("strip", "strip", {}, lambda: build_timm("strip", 64), (2, 8, 12, 64), False),
    ("strip-noconv-skip", "strip", {"use_conv": False, "has_skip": True},
     lambda: build_timm("strip", 32, use_conv=False, has_skip=True), (2, 9, 8, 32), False),
]


def test_parity_cases_cover_every_timm_name():
    assert {case[1] for case in PARITY_CASES} == set(TIMM_NAMES)
    assert set(ATTENTIONS.names()) == set(TIMM_NAMES) | set(OWN_NAMES)


@pytest.mark.parametrize("case", PARITY_CASES, ids=[case[0] for case in PARITY_CASES])
def test_equals_timm_module(case):
    case_id, name, options, builder, shape, train_too = case
    torch.manual_seed(0)
    reference = builder()
    if case_id.startswith("ge-") and "params" in case_id:
        _fix_ge_gather(reference, global_window="global" in case_id)
    reference = randomize(reference, seed=len(case_id))
    variables = timm_variables(reference)
    x = np.random.default_rng(len(case_id)).normal(size=shape).astype(np.float32)

    module = make_attention(name, shape[-1], **options)
    abstract = jax.eval_shape(module.init, jax.random.key(0), jnp.asarray(x))
    assert shapes(variables) == shapes(abstract), "timm's names and shapes, leaf renames only"
    assert count(variables.get("params", {})) == sum(p.numel() for p in reference.parameters())

    @jax.jit
    def run(variables, x):
        eval_out = module.apply(variables, x)
        if not train_too:
            return eval_out, eval_out
        train_out, _ = module.apply(variables, x, train=True, mutable=["batch_stats"])
        return eval_out, train_out

    eval_out, train_out = run(variables, jnp.asarray(x))
    assert relative_error(eval_out, torch_forward(reference, x)) <= TOLERANCE
    if train_too:
        assert relative_error(train_out, torch_forward(reference, x, train=True)) <= TOLERANCE


def test_local_is_se_bottleneck_at_each_pixel():
    """``local`` is the published control: SE's parameters, and at every pixel SE's
    bottleneck applied to that pixel alone (the NumPy definition, and SE on a 1x1 map)."""
    x = jax.random.normal(jax.random.key(0), (2, 6, 5, 32))
    local = make_attention("local", 32)
    variables = randomized(jax.eval_shape(local.init, jax.random.key(1), x), seed=1)
    se_shapes = shapes(jax.eval_shape(make_attention("se", 32).init, jax.random.key(0), x))
    assert shapes(variables) == se_shapes
    params = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), variables["params"])
    hidden = np.maximum(np.asarray(x, np.float64) @ params["fc1"]["kernel"][0, 0]
                        + params["fc1"]["bias"], 0.0)
    logits = hidden @ params["fc2"]["kernel"][0, 0] + params["fc2"]["bias"]
    expected = np.asarray(x) / (1.0 + np.exp(-logits))

    @jax.jit
    def run(variables, x):
        pixels = x.reshape(-1, 1, 1, 32)
        per_pixel = make_attention("se", 32).apply(variables, pixels).reshape(x.shape)
        return local.apply(variables, x), per_pixel

    ours, per_pixel = run(variables, x)
    assert relative_error(ours, expected) <= TOLERANCE
    assert relative_error(ours, per_pixel) <= TOLERANCE


# --------------------------------------------------------------------------------------
# srm and fca: the papers' definitions and parameter counts
# --------------------------------------------------------------------------------------

#: ResNet-50's bottleneck output widths and block counts (where SRM / FcaNet sit).
RESNET50_BLOCKS = {256: 3, 512: 4, 1024: 6, 2048: 3}
RESNET50_PARAMETERS = 25_557_032


def _resnet50_extra(name: str) -> int:
    total = 0
    for width, blocks in RESNET50_BLOCKS.items():
        module = make_attention(name, width)
        abstract = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 7, 7, width)))
        total += blocks * count(abstract["params"])
    return total


def test_srm_parameters_match_the_paper():
    """4C learned parameters per module (CFC 2C + BatchNorm affine 2C) and 2C statistics:
    SRM-ResNet-50 has 25.62M parameters in the paper (Table 1), ResNet-50 25.56M."""
    abstract = jax.eval_shape(make_attention("srm", 64).init, jax.random.key(0),
                              jnp.zeros((1, 7, 7, 64)))
    assert count(abstract["params"]) == 4 * 64
    assert count(abstract["batch_stats"]) == 2 * 64
    extra = _resnet50_extra("srm")
    assert extra == 4 * sum(w * n for w, n in RESNET50_BLOCKS.items()) == 60_416
    assert round((RESNET50_PARAMETERS + extra) / 1e6, 2) == 25.62


def test_srm_equals_the_style_pooling_definition():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 6, 7, 16)).astype(np.float32) * rng.uniform(0.2, 2.0, size=16)
    cfc = rng.normal(size=(16, 2)).astype(np.float32)
    gamma, beta = rng.uniform(0.5, 1.5, 16), rng.normal(size=16) * 0.2
    mean_stat, var_stat = rng.normal(size=16) * 0.2, rng.uniform(0.5, 2.0, 16)
    variables = {"params": {"cfc": cfc, "bn": {"scale": gamma, "bias": beta}},
                 "batch_stats": {"bn": {"mean": mean_stat, "var": var_stat}}}
    variables = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), variables)

    values = x.reshape(2, -1, 16).astype(np.float64)
    styles = np.stack([values.mean(1), values.std(1, ddof=1)], axis=-1)  # [B, C, 2]
    z = (styles * cfc).sum(-1)
    z = (z - mean_stat) / np.sqrt(var_stat + 1e-5) * gamma + beta
    expected = x / (1.0 + np.exp(-z))[:, None, None, :]
    ours = jax.jit(make_attention("srm", 16).apply)(variables, x)
    assert relative_error(ours, expected) <= TOLERANCE


def test_srm_gradient_is_finite_on_a_constant_channel():
    """A channel a ReLU switched off has deviation 0, where sqrt's slope is infinite."""
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8)).at[..., 3].set(0.0)
    module = make_attention("srm", 8)
    variables = randomized(jax.eval_shape(module.init, jax.random.key(1), x), seed=1)
    grads = jax.jit(jax.grad(lambda v, x: module.apply(v, x).sum(), argnums=(0, 1)))(
        variables, x)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree_util.tree_leaves(grads))


def test_fca_parameters_match_the_paper():
    """SE's excitation without biases, 2 C^2 / 16: FcaNet-50 has 28.07M parameters in the
    paper (Table 2), the same as its SENet-50 without biases."""
    extra = _resnet50_extra("fca")
    assert extra == sum(n * 2 * w * w // 16 for w, n in RESNET50_BLOCKS.items()) == 2_514_944
    assert round((RESNET50_PARAMETERS + extra) / 1e6, 2) == 28.07


def test_dct_bases_are_orthonormal_and_the_lowest_is_gap():
    every = [(u, v) for u in range(7) for v in range(7)]
    bank = dct_filters(7, 7, every, 49).reshape(49, 49)  # [position, frequency]
    np.testing.assert_allclose(bank.T @ bank, np.eye(49), atol=1e-6)
    np.testing.assert_allclose(dct_filters(7, 7, [(0, 0)], 3), np.full((7, 7, 3), 1 / 7),
                               rtol=1e-6)
    assert len(set(FCA_FREQUENCIES["top"])) == 32
    assert fca_frequencies("top16")[:3] == ((0, 0), (0, 1), (6, 0))


def test_fca_equals_the_multispectral_definition():
    """Channel group i pooled with the 2-D DCT basis of the i-th top frequency (written
    out here term by term, as in the paper), then the bias-free excitation."""
    channels, frequencies = 32, FCA_FREQUENCIES["top"][:16]
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 7, 7, channels)).astype(np.float32)
    module = make_attention("fca", channels, freq_sel_method="top16", reduction=4)
    variables = randomized(jax.eval_shape(module.init, jax.random.key(2), x), seed=2)
    w1 = np.asarray(variables["params"]["fc1"]["kernel"], np.float64)
    w2 = np.asarray(variables["params"]["fc2"]["kernel"], np.float64)

    def basis(pos, freq):
        return math.cos(math.pi * freq * (pos + 0.5) / 7) / math.sqrt(7) * (
            math.sqrt(2) if freq else 1.0)

    pooled = np.zeros((2, channels))
    for c in range(channels):
        u, v = frequencies[c // 2]
        for h in range(7):
            for w in range(7):
                pooled[:, c] += x[:, h, w, c] * basis(h, u) * basis(w, v)
    gates = 1.0 / (1.0 + np.exp(-(np.maximum(pooled @ w1, 0.0) @ w2)))
    ours = jax.jit(module.apply)(variables, x)
    assert relative_error(ours, x * gates[:, None, None, :]) <= TOLERANCE


@pytest.mark.parametrize("size", [(14, 14), (10, 9), (7, 7)])
def test_fca_folds_adaptive_pooling_into_its_filters(size):
    """On a map of another size FcaNet first average-pools it to the DCT grid with
    PyTorch's adaptive bins; the folded filter bank gives the same pooled vector."""
    x = np.random.default_rng(0).normal(size=(2, *size, 32)).astype(np.float32)
    frequencies = FCA_FREQUENCIES["low"][:8]
    grid = torch.nn.functional.adaptive_avg_pool2d(
        torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), (7, 7)).numpy().transpose(0, 2, 3, 1)
    expected = np.einsum("bhwc,hwc->bc", grid, dct_filters(7, 7, frequencies, 32))
    folded = pooled_dct_filters(*size, 7, 7, frequencies, 32)
    assert relative_error(multispectral_pool(x, folded), expected) <= TOLERANCE


def test_fca_lowest_frequency_is_se_on_gap_times_sqrt_hw():
    """With the single frequency (0, 0), FcaNet is SE (no biases, plain C / 16) on GAP
    with its first kernel scaled by sqrt(7 * 7) = 7; a 14x14 map is pooled to 7x7 first,
    which leaves its mean unchanged."""
    x = jax.random.normal(jax.random.key(0), (2, 14, 14, 64))
    fca = make_attention("fca", 64, freq_sel_method="top1")
    se = make_attention("se", 64, bias=False, rd_divisor=1)
    variables = randomized(jax.eval_shape(fca.init, jax.random.key(1), x), seed=1)
    kernel1, kernel2 = variables["params"]["fc1"]["kernel"], variables["params"]["fc2"]["kernel"]
    se_variables = {"params": {"fc1": {"kernel": 7.0 * kernel1[None, None]},
                               "fc2": {"kernel": kernel2[None, None]}}}

    @jax.jit
    def run(variables, se_variables, x):
        return fca.apply(variables, x), se.apply(se_variables, x)

    ours, se_out = run(variables, se_variables, x)
    assert relative_error(ours, se_out) <= TOLERANCE


# --------------------------------------------------------------------------------------
# Properties of every registered module
# --------------------------------------------------------------------------------------

def randomized(variables, seed: int):
    """Random values for the leaves of ``variables`` (arrays or ``jax.eval_shape``'s
    abstract ones; variances positive), so that zero inits (SRM's cfc, GC's mlp_add) do
    not make a module trivial."""
    flat = traverse_util.flatten_dict(dict(variables))
    rng = np.random.default_rng(seed)
    out = {}
    for key, leaf in flat.items():
        if key[-1] == "var":
            out[key] = rng.uniform(0.5, 2.0, leaf.shape)
        elif key[-1] == "scale":
            out[key] = rng.uniform(0.5, 1.5, leaf.shape)
        else:
            fan_in = max(1, math.prod(leaf.shape[:-1]))
            out[key] = rng.normal(size=leaf.shape) / math.sqrt(fan_in)
    return traverse_util.unflatten_dict({k: jnp.asarray(v, jnp.float32) for k, v in out.items()})


def squeeze_modules() -> list[str]:
    return [name for name in ATTENTIONS.names()
            if "squeeze" in {f.name for f in dataclasses.fields(ATTENTIONS.get(name))}]


def gates_of(state) -> dict:
    """The sown gates by path (``sow`` keeps a tuple of the values; each is sown once)."""
    return {"/".join(k): value for k, (value,) in traverse_util.flatten_dict(
        dict(state.get("intermediates", {}))).items()}


@pytest.mark.parametrize("name", squeeze_modules())
def test_a_fork_pool_changes_only_the_squeeze(name):
    """``squeeze`` set to a fork's pool F keeps the variables and the rest of the module:
    with ``F(x) = GAP(x * x)``, the gates computed from ``x`` equal those of the GAP module
    on ``x * x`` (CBAM: its channel gate; gca, additive: ``out - x``)."""
    assert name not in ("fca", "local")
    x = jax.random.normal(jax.random.key(0), (2, 8, 7, 32))
    fork = make_attention(name, 32, squeeze="test_attention_mean_square")
    reference = make_attention(name, 32, squeeze="gap")
    variables = randomized(jax.eval_shape(reference.init, jax.random.key(1), x), seed=3)
    assert shapes(jax.eval_shape(fork.init, jax.random.key(1), x)) == shapes(variables)

    @jax.jit
    def run(variables, x):
        out, state = fork.apply(variables, x, mutable=["intermediates"])
        squared, reference_state = reference.apply(variables, x * x, mutable=["intermediates"])
        return out, squared, gates_of(state), gates_of(reference_state)

    out, squared, gates, reference_gates = run(variables, x)
    if not type(fork).multiplicative:
        assert relative_error(out - x, squared - x * x) <= TOLERANCE
        return
    if name in ("cbam", "lcbam"):
        gates = {k: v for k, v in gates.items() if k.startswith("channel/")}
        reference_gates = {k: v for k, v in reference_gates.items() if k.startswith("channel/")}
    assert gates and gates.keys() == reference_gates.keys()
    for key in gates:
        assert relative_error(gates[key], reference_gates[key]) <= TOLERANCE, key


@pytest.mark.parametrize("name", ATTENTIONS.names())
def test_bfloat16_gate_range_and_one_compilation(name):
    """float32: every sown gate lies in its gate function's range. bfloat16 compute on a
    bfloat16 map returns bfloat16 within bfloat16 rounding of float32. Two calls with new
    values compile once."""
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 32))
    f32 = make_attention(name, 32)
    bf16 = make_attention(name, 32, dtype=jnp.bfloat16)
    variables = randomized(jax.eval_shape(f32.init, jax.random.key(1), x), seed=4)
    traces = []

    @jax.jit
    def run(variables, x):
        traces.append(None)
        out, state = f32.apply(variables, x, mutable=["intermediates"])
        return out, gates_of(state), bf16.apply(variables, x.astype(jnp.bfloat16))

    out, gates, low = run(variables, x)
    run(variables, x + 1.0)
    assert len(traces) == 1
    assert low.dtype == jnp.bfloat16 and out.dtype == jnp.float32
    assert relative_error(low.astype(jnp.float32), out) <= 0.05
    low_range, high_range = GATE_RANGES[f32.gate_layer]
    if type(f32).multiplicative:
        assert gates
    for value in gates.values():
        assert float(value.min()) >= low_range and float(value.max()) <= high_range


@pytest.mark.parametrize("name, gate", [("se", "tanh"), ("coord", "hard_sigmoid"),
                                        ("cbam", "tanh")])
def test_other_gates_stay_in_range(name, gate):
    x = 4.0 * jax.random.normal(jax.random.key(0), (2, 8, 8, 16))
    module = make_attention(name, 16, gate_layer=gate)
    variables = randomized(jax.eval_shape(module.init, jax.random.key(1), x), seed=5)
    _, state = jax.jit(lambda v, x: module.apply(v, x, mutable=["intermediates"]))(variables, x)
    low, high = GATE_RANGES[gate]
    for value in gates_of(state).values():
        assert float(value.min()) >= low and float(value.max()) <= high


def _se_width(c: int, ratio: float = 1 / 16, divisor: int = 8) -> int:
    return make_divisible(c * ratio, divisor, round_limit=0.0)


#: Parameters per block as documented in docs/attention.md (k: ECA's adaptive kernel).
PARAMETER_FORMULAS = {
    "se": lambda c: 2 * c * _se_width(c) + _se_width(c) + c,
    "local": lambda c: 2 * c * _se_width(c) + _se_width(c) + c,
    "ese": lambda c: c * c + c,
    "eca": lambda c: _eca_k(c),
    "ecam": lambda c: 2 * _ecam_width(c) + _eca_k(c) * _ecam_width(c) + 1,
    "ceca": lambda c: _eca_k(c),
    "ge": lambda c: 2 * c * _se_width(c, divisor=1) + _se_width(c, divisor=1) + c,
    "gc": lambda c: 2 * c * (c // 8) + 3 * (c // 8) + 2 * c + 1,
    "gca": lambda c: 2 * c * (c // 8) + 3 * (c // 8) + 2 * c + 1,
    "cbam": lambda c: 2 * c * (c // 16) + 2 * 49 + 2,
    "lcbam": lambda c: 2 * c * (c // 16) + 49 + 2,
    "coord": lambda c: 3 * c * _se_width(c, 2 / 48) + 2 * _se_width(c, 2 / 48),
    "scoord": lambda c: 3 * c * _se_width(c, 1 / 6) + _se_width(c, 1 / 6) + 2 * c,
    "ela": lambda c: 18 * c,
    "strip": lambda c: 6 * c,
    "srm": lambda c: 4 * c,
    "fca": lambda c: c * c // 8,
}


def _eca_k(c: int) -> int:
    t = int(abs(math.log2(c) + 1) / 2)
    return max(t if t % 2 else t + 1, 3)


def _ecam_width(c: int) -> int:
    return make_divisible(c / 8, 8)


@pytest.mark.parametrize("name", ATTENTIONS.names())
def test_parameter_formulas(name):
    assert set(PARAMETER_FORMULAS) == set(ATTENTIONS.names())
    for channels in (64, 256):
        module = make_attention(name, channels)
        abstract = jax.eval_shape(module.init, jax.random.key(0),
                                  jnp.zeros((1, 14, 14, channels)))
        assert count(abstract["params"]) == PARAMETER_FORMULAS[name](channels), channels


# --------------------------------------------------------------------------------------
# Construction, errors, forks
# --------------------------------------------------------------------------------------

def test_make_attention_options_and_errors():
    assert make_attention(None, 64) is None and make_attention("", 64) is None
    assert isinstance(make_attention("se", 64), Attention)
    assert make_attention("cbam", 64, squeeze=["gap", "gmp"]).squeeze == ("gap", "gmp")
    with pytest.raises(ValueError, match=r"attention 'se' has no option 'reduction'.*"
                                         r"valid options: .*rd_ratio.*squeeze"):
        make_attention("se", 64, reduction=16)
    with pytest.raises(UnknownNameError, match=r"unknown attention 'sse'.*did you mean 'se'"):
        make_attention("sse", 64)
    with pytest.raises(ValueError, match=r"channels=0 is not valid"):
        make_attention("se", 0)
    x = jnp.zeros((1, 8, 8, 32))
    errors = [
        (make_attention("se", 16), r"built for channels=16; got an input with 32"),
        (make_attention("eca", squeeze="catavgmax"), r"squeeze='catavgmax' pools 32 .* to 64"),
        (make_attention("se", squeeze="nope"), r"unknown pool 'nope'"),
        (make_attention("se", gate_layer="step"), r"gate_layer='step' is not valid"),
        (make_attention("coord", norm_layer="layernorm"), r"norm_layer='layernorm'"),
        (make_attention("ge", extent=3), r"extent=3 is not valid"),
        (make_attention("ge", extent=2, squeeze="gmp"), r"squeeze='gmp' applies to the"),
        (make_attention("gc", fuse_scale=False), r"fuse_scale=True or fuse_add=True"),
        (make_attention("fca", freq_sel_method="top64"), r"freq_sel_method='top64'"),
        (make_attention("eca", kernel_size=4), r"kernel_size=4 is not valid"),
    ]
    for module, message in errors:
        with pytest.raises((ValueError, KeyError), match=message):
            jax.eval_shape(module.init, jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"multiple of 16; got 24"):
        jax.eval_shape(make_attention("fca").init, jax.random.key(0), jnp.zeros((1, 7, 7, 24)))
    with pytest.raises(ValueError, match=r"feature map \[batch, height, width, channels\]"):
        jax.eval_shape(make_attention("se").init, jax.random.key(0), jnp.zeros((1, 8, 32)))


def test_a_fork_registers_its_own_attention():
    @ATTENTIONS.register("test_attention_mine")
    class HalfGate(Attention):
        """x * gate, the gate a learned per-channel constant."""

        gate_layer: str = "sigmoid"

        @nn.compact
        def __call__(self, x, train=False):
            x = self.prepare(x)
            logits = self.param("logits", nn.initializers.zeros, (x.shape[-1],))
            return x * self.gate(logits).astype(x.dtype)

    try:
        module = make_attention("test_attention_mine", 8)
        x = jnp.ones((1, 2, 2, 8))
        np.testing.assert_allclose(module.apply(module.init(jax.random.key(0), x), x), 0.5 * x)
        with pytest.raises(ValueError, match=r"has no option 'squeeze'.*gate_layer"):
            make_attention("test_attention_mine", 8, squeeze="gap")
    finally:
        ATTENTIONS._entries.pop("test_attention_mine")
