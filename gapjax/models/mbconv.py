"""Mobile inverted-bottleneck blocks shared by EfficientNet and MobileNetV3, and the pieces
the modern timm families have in common (timm's padding, drop path, the SE options).

The two families are built by one set of rules (timm's ``_efficientnet_builder``), here
written as pure functions over an architecture table:

* a table is a list of stages, each a tuple of ``StageSpec`` rows (block kind, repeats,
  kernel, stride of the first block, expansion, output channels, SE ratio, activation);
* ``scale_stage_depth``: a depth multiplier scales a stage's total repeats with ``ceil``
  and hands them back to its rows from the last row first (EfficientNet-B1..B3);
* ``round_channels``: a width multiplier rounds channels to a multiple of 8, never losing
  more than 10% (``make_divisible(c * m, 8, round_limit=0.9)``);
* ``block_configs`` resolves a table to one ``BlockConfig`` per block: channels, the
  expanded width ``make_divisible(in * expansion)``, the SE width (EfficientNet:
  ``round(in * ratio)``, from the block input; MobileNetV3: ``make_divisible(mid *
  ratio, 8)``, from the expanded width), skips (stride 1 and equal widths) and the drop
  path rate ``rate * index / blocks`` (0 for the first block).

Blocks (parameter names are timm's): ``DepthwiseSeparable`` (``conv_dw, bn1, se,
conv_pw, bn2``), ``InvertedResidual`` (``conv_pw, bn1, conv_dw, bn2, se, conv_pwl,
bn3``) and ``ConvBnAct`` (``conv, bn1``). Convolutions use timm's symmetric padding
``((stride - 1) + (kernel - 1)) // 2``, so a stride-2 window starts at the first pixel
as in PyTorch. BatchNorm: momentum 0.9 (torch 0.1), epsilon 1e-5, float32 statistics.

The ``se`` of a block is ``gapjax.attention``'s ``"se"`` (timm's ``SEModule``: ``fc1``,
``fc2``, any ``POOLS`` squeeze) built by ``se_options``: the family's width rule
(``BlockConfig.se_channels``), activation and gate, with a model's ``attn_kwargs`` on
top. ``MBCONV_LAYOUT`` is the timm weight layout of these blocks (``se.fc1`` <->
``se.conv_reduce``, ...), which EfficientNet and MobileNetV3 extend.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax

from gapjax.attention import make_attention
from gapjax.layers import check_choice, make_divisible
from gapjax.models.layouts import Layout
from gapjax.pooling.map import gelu

Array = jax.Array

#: Activations of the modern families, by name (``gelu`` is the exact erf GELU).
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "hard_swish": jax.nn.hard_swish,
    "gelu": gelu,
}
BLOCK_KINDS = ("ds", "ir", "cn")


# --------------------------------------------------------------------------------------
# Pure functions: padding, channel and depth rules, drop path rates
# --------------------------------------------------------------------------------------


def timm_padding(kernel: int, stride: int = 1, dilation: int = 1) -> int:
    """Symmetric padding of timm's ``create_conv2d`` (``padding=''``):
    ``((stride - 1) + dilation * (kernel - 1)) // 2`` on every side."""
    return ((stride - 1) + dilation * (kernel - 1)) // 2


def round_channels(channels: float, multiplier: float = 1.0, divisor: int = 8) -> int:
    """A width multiplier applied to ``channels``, rounded to a multiple of ``divisor`` that
    is at least 90% of the scaled value (timm's ``round_channels``)."""
    return make_divisible(channels * multiplier, divisor, round_limit=0.9)


def linear_drop_path_rates(rate: float, depths: Sequence[int]) -> list[list[float]]:
    """Drop path rates rising linearly from 0 (first block) to ``rate`` (last block), split
    into stages of ``depths`` blocks (timm's RegNet and ConvNeXt)."""
    total = sum(depths)
    rates = [rate * index / (total - 1) if total > 1 else 0.0 for index in range(total)]
    stages, start = [], 0
    for depth in depths:
        stages.append(rates[start:start + depth])
        start += depth
    return stages


class StageSpec(NamedTuple):
    """One row of an EfficientNet / MobileNetV3 architecture table.

    ``kind``: ``"ds"`` (depthwise separable), ``"ir"`` (inverted residual) or ``"cn"``
    (conv - BN - activation); ``repeats`` blocks, the first with ``stride``; ``expansion``
    of an ``ir`` block's hidden width; ``channels`` out (before the width multiplier);
    ``se_ratio`` (0 = no SE); ``act`` overrides the model's activation.
    """

    kind: str
    repeats: int
    kernel: int
    stride: int
    expansion: float
    channels: int
    se_ratio: float = 0.0
    act: str | None = None


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """One resolved block: widths, SE width (0 = none), activation, skip, drop path."""

    kind: str
    in_channels: int
    out_channels: int
    mid_channels: int
    kernel: int
    stride: int
    se_channels: int
    act: str
    skip: bool
    drop_path: float


def scale_stage_depth(rows: Sequence[StageSpec], multiplier: float) -> list[StageSpec]:
    """The stage's blocks (one row per block) after depth scaling: the total repeats become
    ``ceil(total * multiplier)``, handed back to the rows in proportion, the last row
    first, each at least 1 (so the first row is the last to grow)."""
    repeats = [row.repeats for row in rows]
    remaining = sum(repeats)
    remaining_scaled = math.ceil(remaining * multiplier)
    scaled = []
    for count in reversed(repeats):
        share = max(1, round(count / remaining * remaining_scaled))
        scaled.append(share)
        remaining -= count
        remaining_scaled -= share
    return [row for row, count in zip(rows, reversed(scaled)) for _ in range(count)]


def block_configs(
    stages: Sequence[Sequence[StageSpec]],
    *,
    stem_channels: int,
    default_act: str,
    width_multiplier: float = 1.0,
    depth_multiplier: float = 1.0,
    se_from_expanded: bool = False,
    drop_path: float = 0.0,
) -> list[list[BlockConfig]]:
    """Resolves an architecture table to its blocks, stage by stage.

    ``se_from_expanded=False`` (EfficientNet): SE width ``round(in * se_ratio)`` computed
    as timm does, from the expanded width and ``se_ratio / expansion``;
    ``True`` (MobileNetV3): ``make_divisible(mid * se_ratio, 8)``. Drop path of block
    ``i`` of ``n``: ``drop_path * i / n``.
    """
    scaled = [scale_stage_depth(rows, depth_multiplier) for rows in stages]
    total = sum(len(rows) for rows in scaled)
    in_channels, index, resolved = stem_channels, 0, []
    for rows in scaled:
        stage = []
        for position, row in enumerate(rows):
            check_choice("block kind", row.kind, BLOCK_KINDS)
            out_channels = round_channels(row.channels, width_multiplier)
            stride = row.stride if position == 0 else 1
            mid = make_divisible(in_channels * row.expansion, 8, round_limit=0.9) \
                if row.kind == "ir" else in_channels
            se_channels = 0
            if row.se_ratio and row.kind != "cn":
                if se_from_expanded:
                    se_channels = make_divisible(mid * row.se_ratio, 8, round_limit=0.9)
                else:
                    expansion = row.expansion if row.kind == "ir" else 1.0
                    se_channels = round(mid * (row.se_ratio / expansion))
            skip = row.kind != "cn" and stride == 1 and in_channels == out_channels
            stage.append(BlockConfig(
                row.kind, in_channels, out_channels, mid, row.kernel, stride, se_channels,
                row.act or default_act, skip, drop_path * index / total))
            in_channels, index = out_channels, index + 1
        resolved.append(stage)
    return resolved


# --------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------


def conv2d(features: int, kernel: int, stride: int = 1, *, groups: int = 1,
           bias: bool = False, padding: int | None = None, dtype: Any = None,
           kernel_init: Callable[..., Array] | None = None, name: str | None = None
           ) -> nn.Conv:
    """A convolution with timm's symmetric padding (or ``padding`` on every side).

    Default init: He normal with fan-out for dense convolutions; for grouped and
    depthwise ones fan-in, which equals timm's ``fan_out / groups`` when the input and
    output widths are equal (as they are in these families' grouped convolutions).
    """
    pad = timm_padding(kernel, stride) if padding is None else padding
    if kernel_init is None:
        kernel_init = nn.initializers.variance_scaling(
            2.0, "fan_out" if groups == 1 else "fan_in", "normal")
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=((pad, pad), (pad, pad)), feature_group_count=groups,
                   use_bias=bias, dtype=dtype, kernel_init=kernel_init, name=name)


def batch_norm(train: bool, *, dtype: Any, axis_name: str | None, name: str,
               scale_init: Callable[..., Array] = nn.initializers.ones) -> nn.BatchNorm:
    """BatchNorm as torch's defaults: momentum 0.9 (torch 0.1), epsilon 1e-5."""
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                        dtype=dtype, axis_name=axis_name, scale_init=scale_init, name=name)


def activation(name: str | None) -> Callable[[Array], Array]:
    """``ACTIVATIONS[name]``; None is the identity."""
    if name is None:
        return lambda x: x
    return ACTIVATIONS[check_choice("activation", name, tuple(ACTIVATIONS))]


def drop_path(y: Array, rate: float, train: bool) -> Array:
    """Stochastic depth on a residual branch ``[B, ...]``: in training each example's
    branch is dropped with probability ``rate`` and kept ones are scaled by
    ``1 / (1 - rate)`` (timm's ``DropPath``); the identity in evaluation. Call inside a
    compact method (it needs the ``dropout`` rng only when ``train`` and ``rate > 0``)."""
    if rate <= 0:
        return y
    return nn.Dropout(rate, broadcast_dims=tuple(range(1, y.ndim)), deterministic=not train)(y)


def se_options(reduced: int, act: str, gate: str,
               attn_kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Options of a block's ``"se"`` (``gapjax.attention.make_attention``): the family's
    bottleneck width ``rd_channels=reduced``, ``act_layer=act`` and ``gate_layer=gate``,
    with ``attn_kwargs`` (a model's option) on top. An ``rd_ratio`` or ``rd_divisor`` in
    ``attn_kwargs`` without ``rd_channels`` replaces the family's width by timm's rule on
    the SE's input, ``make_divisible(C * rd_ratio, rd_divisor)``."""
    user = dict(attn_kwargs or {})
    options: dict[str, Any] = {"act_layer": act, "gate_layer": gate}
    if "rd_channels" in user or not ({"rd_ratio", "rd_divisor"} & set(user)):
        options["rd_channels"] = reduced
    return {**options, **user}


# --------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------


class _Block(nn.Module):
    """Fields shared by the blocks: the resolved ``config``, the SE's activation
    (``se_act``, None = the block's) and gate, ``attn_kwargs`` over them (``se_options``),
    the compute dtype and the BatchNorm axis."""

    config: BlockConfig
    se_act: str | None = None
    se_gate: str = "sigmoid"
    attn_kwargs: Any = None
    dtype: Any = None
    axis_name: str | None = None

    def norm(self, x: Array, train: bool, name: str, act: bool = True) -> Array:
        y = batch_norm(train, dtype=self.dtype, axis_name=self.axis_name, name=name)(x)
        return activation(self.config.act)(y) if act else y

    def squeeze_excite(self, x: Array) -> Array:
        if not self.config.se_channels:
            return x
        options = se_options(self.config.se_channels, self.se_act or self.config.act,
                             self.se_gate, self.attn_kwargs)
        return make_attention("se", self.config.mid_channels, dtype=self.dtype,
                              axis_name=self.axis_name, name="se", **options)(x)

    def residual(self, y: Array, x: Array, train: bool) -> Array:
        return drop_path(y, self.config.drop_path, train) + x if self.config.skip else y


class DepthwiseSeparable(_Block):
    """``conv_dw`` (k x k, stride) - ``bn1`` - act - [``se``] - ``conv_pw`` (1x1) - ``bn2``
    [+ input]: ``[B, H, W, in] -> [B, H/s, W/s, out]``."""

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        cfg = self.config
        y = conv2d(cfg.in_channels, cfg.kernel, cfg.stride, groups=cfg.in_channels,
                   dtype=self.dtype, name="conv_dw")(x)
        y = self.squeeze_excite(self.norm(y, train, "bn1"))
        y = conv2d(cfg.out_channels, 1, dtype=self.dtype, name="conv_pw")(y)
        return self.residual(self.norm(y, train, "bn2", act=False), x, train)


class InvertedResidual(_Block):
    """``conv_pw`` (1x1 expand) - ``bn1`` - act - ``conv_dw`` (k x k, stride) - ``bn2`` -
    act - [``se``] - ``conv_pwl`` (1x1 project) - ``bn3`` [+ input]: the MBConv block."""

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        cfg = self.config
        y = conv2d(cfg.mid_channels, 1, dtype=self.dtype, name="conv_pw")(x)
        y = self.norm(y, train, "bn1")
        y = conv2d(cfg.mid_channels, cfg.kernel, cfg.stride, groups=cfg.mid_channels,
                   dtype=self.dtype, name="conv_dw")(y)
        y = self.squeeze_excite(self.norm(y, train, "bn2"))
        y = conv2d(cfg.out_channels, 1, dtype=self.dtype, name="conv_pwl")(y)
        return self.residual(self.norm(y, train, "bn3", act=False), x, train)


class ConvBnAct(_Block):
    """``conv`` (k x k, stride) - ``bn1`` - act: MobileNetV3's last trunk block."""

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        cfg = self.config
        y = conv2d(cfg.out_channels, cfg.kernel, cfg.stride, dtype=self.dtype, name="conv")(x)
        return self.residual(self.norm(y, train, "bn1"), x, train)


BLOCKS: dict[str, type[_Block]] = {
    "ds": DepthwiseSeparable, "ir": InvertedResidual, "cn": ConvBnAct,
}


def apply_blocks(x: Array, stages: Sequence[Sequence[BlockConfig]], train: bool, *,
                 se_act: str | None, se_gate: str, attn_kwargs: Any, dtype: Any,
                 axis_name: str | None) -> Array:
    """Runs resolved blocks inside the calling module's compact method, naming block
    ``i`` of stage ``s`` ``blocks_{s}_{i}`` (timm's ``blocks.s.i``)."""
    for stage_index, stage in enumerate(stages):
        for block_index, cfg in enumerate(stage):
            x = BLOCKS[cfg.kind](cfg, se_act, se_gate, attn_kwargs, dtype, axis_name,
                                 name=f"blocks_{stage_index}_{block_index}")(x, train)
    return x


#: timm's names of the MBConv trunk: ``blocks_3_1/conv_dw`` <-> ``blocks.3.1.conv_dw``;
#: the SE's ``fc1`` / ``fc2`` <-> ``se.conv_reduce`` / ``se.conv_expand`` (1x1
#: convolutions in both); ``head/classifier`` <-> ``classifier``. EfficientNet and
#: MobileNetV3 register it (``Layout.extend``) under their names.
MBCONV_LAYOUT = Layout(source="timm", renames=(
    (r"^blocks_(\d+)_(\d+)", r"blocks.\1.\2"),
    (r"/se/fc1$", "/se/conv_reduce"),
    (r"/se/fc2$", "/se/conv_expand"),
    (r"^head/classifier$", "classifier"),
))


__all__ = [
    "ACTIVATIONS",
    "BLOCKS",
    "MBCONV_LAYOUT",
    "BlockConfig",
    "ConvBnAct",
    "DepthwiseSeparable",
    "InvertedResidual",
    "StageSpec",
    "activation",
    "apply_blocks",
    "batch_norm",
    "block_configs",
    "conv2d",
    "drop_path",
    "linear_drop_path_rates",
    "round_channels",
    "scale_stage_depth",
    "se_options",
    "timm_padding",
]
