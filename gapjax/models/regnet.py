"""RegNetY-1.6GF and -3.2GF in timm's layout (``timm.create_model('regnety_016')``,
``'regnety_032'``).

Layout (Radosavovic et al. 2020; timm's ``RegNet``): the stem (``stem_conv`` 3x3/2 -
``stem_bn`` - ReLU, 32 channels), four stages ``s1..s4`` of bottleneck blocks ``b1..``,
then the GAP head (any ``POOLS`` pool + Dense ``classifier``, timm's ``head.fc``). A
block is ``conv1`` (1x1) - ``conv2`` (3x3 grouped, stride on the first block of a stage)
- ``se`` - ``conv3`` (1x1, no activation), plus the shortcut (``downsample``: 1x1
strided conv - BN when the shape changes), then ReLU. Each ``convN`` is a conv + BN
(timm's ``ConvNormAct``). The ``se`` is ``gapjax.attention``'s ``"se"`` (timm's
``SEModule``, ``fc1`` / ``fc2``) of width ``round(block input * se_ratio)`` (0.25 in
RegNetY) with ReLU and a sigmoid; ``attn_kwargs`` overrides its options.

Widths and depths come from the RegNet design rule (``regnet_stages``): block ``j`` of
``depth`` wants width ``w0 + wa * j``; widths are snapped to ``w0 * wm^k`` and to
multiples of 8, equal widths form a stage, then each stage width is rounded to a multiple
of its group width. regnety_016: ``w0=48, wa=20.71, wm=2.65``, depth 27, groups of 24
-> widths (48, 120, 336, 888), depths (2, 6, 17, 2); regnety_032: ``w0=80, wa=42.63,
wm=2.66``, depth 21 -> (72, 216, 576, 1512), (2, 5, 13, 1). With 1000 classes the
parameter counts equal timm's to the unit: 11,202,430 and 19,436,338.

Maps: pool + linear classifier, so with ``pool="gap"`` CAM and contribution maps are
exact (``map_kinds == ("cam", "contribution")``).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from gapjax.attention import make_attention
from gapjax.layers import Classifier, check_choice
from gapjax.models import LAYOUTS, Layout, register_preset
from gapjax.models.mbconv import (
    activation,
    batch_norm,
    conv2d,
    drop_path,
    linear_drop_path_rates,
    se_options,
)

Array = jax.Array


def regnet_stages(w0: int, wa: float, wm: float, depth: int, group_size: int,
                  bottle_ratio: float = 1.0, quant: int = 8
                  ) -> tuple[list[int], list[int], list[int]]:
    """``(widths, depths, group sizes)`` per stage of the RegNet design space.

    Block ``j``'s continuous width ``w0 + wa * j`` is snapped to the nearest power step
    ``w0 * wm^k`` and to a multiple of ``quant``; blocks of equal width form a stage.
    Each stage's bottleneck width (``width * bottle_ratio``) is then rounded to a multiple
    of its group size (which is at most the bottleneck width). Float32 arithmetic, as the
    reference implementation, so the rounding agrees with it exactly.
    """
    if not (wa >= 0 and w0 > 0 and wm > 1 and w0 % quant == 0):
        raise ValueError(f"RegNet needs wa >= 0, w0 > 0, wm > 1 and w0 divisible by {quant}; "
                         f"got w0={w0!r}, wa={wa!r}, wm={wm!r}")
    f32 = np.float32
    continuous = np.arange(depth, dtype=f32) * f32(wa) + f32(w0)
    exponents = np.round(np.log(continuous / f32(w0)) / f32(math.log(wm)))
    widths = (np.round(f32(w0) * np.power(f32(wm), exponents) / f32(quant)) * f32(quant))
    stage_widths, stage_depths = np.unique(widths.astype(np.int64), return_counts=True)
    out_widths, groups = [], []
    for width in stage_widths.tolist():
        bottleneck = int(width * bottle_ratio)
        group = min(group_size, bottleneck)
        bottleneck = int(round(bottleneck / group) * group)
        out_widths.append(int(bottleneck / bottle_ratio))
        groups.append(group)
    return out_widths, [int(d) for d in stage_depths], groups


class ConvNormAct(nn.Module):
    """``conv`` (k x k, stride, groups, no bias) - ``bn`` - optional activation
    (timm's ``ConvNormAct``)."""

    features: int
    kernel: int = 1
    stride: int = 1
    groups: int = 1
    act: str | None = "relu"
    zero_init: bool = False
    dtype: Any = None
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        x = conv2d(self.features, self.kernel, self.stride, groups=self.groups,
                   dtype=self.dtype, name="conv")(x)
        scale_init = nn.initializers.zeros if self.zero_init else nn.initializers.ones
        x = batch_norm(train, dtype=self.dtype, axis_name=self.axis_name, name="bn",
                       scale_init=scale_init)(x)
        return activation(self.act)(x)


class RegNetBottleneck(nn.Module):
    """``[B, H, W, in] -> [B, H/stride, W/stride, width]``: conv1 - conv2 (grouped) - se -
    conv3, plus the shortcut, then ReLU."""

    width: int
    stride: int
    group_size: int
    se_channels: int
    bottle_ratio: float = 1.0
    drop_path: float = 0.0
    zero_init_residual: bool = True
    attn_kwargs: Any = None
    dtype: Any = None
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        bottleneck = round(self.width * self.bottle_ratio)
        options = {"dtype": self.dtype, "axis_name": self.axis_name}
        y = ConvNormAct(bottleneck, 1, name="conv1", **options)(x, train)
        y = ConvNormAct(bottleneck, 3, self.stride, groups=bottleneck // self.group_size,
                        name="conv2", **options)(y, train)
        if self.se_channels:
            se = se_options(self.se_channels, "relu", "sigmoid", self.attn_kwargs)
            y = make_attention("se", bottleneck, name="se", **options, **se)(y)
        y = ConvNormAct(self.width, 1, act=None, zero_init=self.zero_init_residual,
                        name="conv3", **options)(y, train)
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.width:
            shortcut = ConvNormAct(self.width, 1, self.stride, act=None, name="downsample",
                                   **options)(x, train)
        return activation("relu")(drop_path(y, self.drop_path, train) + shortcut)


class RegNet(Classifier):
    """RegNet (Y with ``se_ratio > 0``, X with 0): ``[B, H, W, 3] -> float32 logits [B, K]``.

    Attributes (beyond ``Classifier``'s):
      w0, wa, wm, depth, group_size, bottle_ratio: the design-space parameters
        (``regnet_stages``).
      se_ratio: SE width as a fraction of the block input (0.25 in RegNetY).
      stem_width: channels of the stem (32).
      drop_path: stochastic depth, rising linearly from 0 (first block) to this rate
        (last block); off in evaluation.
      attn_kwargs: options of the blocks' ``"se"`` (``gapjax.attention``) over the
        family's ``rd_channels``, ``act_layer="relu"``, ``gate_layer="sigmoid"``, e.g.
        ``{"squeeze": "gem"}`` (see ``mbconv.se_options``).
      zero_init_residual: start each block's last BN scale at 0 (timm's default).
      stem: only ``"imagenet"``.
    """

    w0: int = 48
    wa: float = 20.71
    wm: float = 2.65
    depth: int = 27
    group_size: int = 24
    bottle_ratio: float = 1.0
    se_ratio: float = 0.25
    stem_width: int = 32
    drop_path: float = 0.0
    attn_kwargs: Any = None
    zero_init_residual: bool = True

    def stages(self) -> tuple[list[int], list[int], list[int]]:
        """``(widths, depths, group sizes)`` of the four stages."""
        return regnet_stages(self.w0, self.wa, self.wm, self.depth, self.group_size,
                             self.bottle_ratio)

    def backbone(self, x: Array, train: bool) -> Array:
        check_choice("stem", self.stem, ("imagenet",))
        dtype = self.compute_dtype
        # The stem is timm's ConvNormAct ``stem`` written out, so its convolution's
        # output can be tapped (``stem_conv`` / ``stem_bn`` <-> ``stem.conv`` / ``stem.bn``).
        x = self.early_tap(conv2d(self.stem_width, 3, 2, dtype=dtype, name="stem_conv")(x))
        x = batch_norm(train, dtype=dtype, axis_name=self.axis_name, name="stem_bn")(x)
        x = activation("relu")(x)
        widths, depths, groups = self.stages()
        rates = linear_drop_path_rates(self.drop_path, depths)
        for stage, (width, depth, group) in enumerate(zip(widths, depths, groups)):
            for index in range(depth):
                x = RegNetBottleneck(
                    width, 2 if index == 0 else 1, group,
                    round(x.shape[-1] * self.se_ratio), self.bottle_ratio,
                    rates[stage][index], self.zero_init_residual, self.attn_kwargs, dtype,
                    self.axis_name, name=f"s{stage + 1}_b{index + 1}")(x, train)
        return x


def _register(name: str, w0: int, wa: float, wm: float, depth: int, group_size: int) -> None:
    register_preset(
        name, RegNet, {"w0": w0, "wa": wa, "wm": wm, "depth": depth, "group_size": group_size},
        f"RegNetY ({name}: w0={w0}, wa={wa}, wm={wm}, depth {depth}, group width "
        f"{group_size}), timm's {name}; keyword arguments are RegNet attributes "
        "(num_classes, pool, head, dtype, drop_path, dropout, ...).",
    )


_register("regnety_016", 48, 20.71, 2.65, 27, 24)
_register("regnety_032", 80, 42.63, 2.66, 21, 24)


# Weights: timm's names, stem_conv <-> stem.conv, s2_b3/conv2/conv <-> s2.b3.conv2.conv
# (the SE's fc1 / fc2 are timm's names already); head/classifier <-> head.fc.
LAYOUTS.add("regnety_", Layout(
    source="timm", torch_models="timm.create_model('regnety_{016,032}')",
    renames=((r"^stem_(conv|bn)$", r"stem/\1"), (r"^s(\d+)_b(\d+)", r"s\1.b\2"),
             (r"^head/classifier$", "head/fc"))))


__all__ = ["ConvNormAct", "RegNet", "RegNetBottleneck", "regnet_stages"]
