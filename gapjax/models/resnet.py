"""The ResNet family, NHWC: torchvision's ResNets and timm's variants (SE / ECA / any
attention in the blocks, deep and tiered stems, average-pool downsampling, ResNeXt's
grouped convolutions, SKNet's selective kernels).

Layout (torchvision ``resnet*``, timm ``ResNet``): stem, four stages of residual blocks with
widths ``base_width * (1, 2, 4, 8)``, then the head. Bottlenecks put the stride on the 3x3
convolution (v1.5); convolutions have no bias; BatchNorm uses momentum 0.9 and epsilon
1e-5.

* Attention (``attn``: any ``gapjax.attention.ATTENTIONS`` name; ``attn_kwargs`` its
  options) sits where timm's blocks put ``attn_layer``: after the last convolution + BN of
  the residual branch, before the addition, as the submodule ``se``. ``seresnet*`` are
  timm's SE-ResNets (``attn="se"``: reduction 16, bottleneck rounded to a multiple of 8).
* Stems (``stem``): ``"imagenet"`` conv 7x7/2 + BN + ReLU + max pool 3x3/2 (a 224x224
  image gives a 7x7 final map); ``"deep"`` three 3x3 convolutions (``stem_width``,
  ``stem_width``, ``2 stem_width``; the first with stride 2) + BN + ReLU each, then the max
  pool (timm's ResNet-C/D); ``"deep_tiered"`` the same with widths ``3 stem_width / 4``,
  ``stem_width``, ``2 stem_width`` (ResNet-T); ``"cifar"`` conv 3x3/1 + BN + ReLU, no pool
  (a 32x32 image gives a 4x4 final map).
* ``avg_down`` (ResNet-D): a projection shortcut average-pools 2x2 (ceil mode, padding not
  counted) and then applies a stride-1 1x1 convolution + BN.
* ``groups`` / ``width_per_group`` (ResNeXt, torchvision's names): the bottleneck's 3x3
  convolution has ``groups`` groups and ``floor(planes width_per_group / 64) groups``
  channels.
* ``block="sk_basic" | "sk_bottleneck"`` (timm's SKNet): the 3x3 convolution is a
  ``gapjax.attention.SelectiveKernel`` (options ``sk_kwargs``), the others timm's
  ``ConvNormAct`` (submodules ``conv``, ``bn``).

Parameter names mirror torchvision / timm (``conv1``, ``bn1``, ``layer1_0/conv1``, ...,
``layer1_0/downsample_conv``, ``layer1_0/se/fc1``, ``head/classifier`` for ``fc``); with
1000 classes the parameter counts equal the published models to the unit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax

from gapjax.attention import SelectiveKernel
from gapjax.attention.base import ConvNorm
from gapjax.layers import (
    Classifier,
    attention_options,
    block_attention,
    check_attention,
    check_choice,
    conv_kernel_init,
    frozen,
)
from gapjax.models.layouts import LAYOUTS, Layout
from gapjax.models.zoo import register_preset
from gapjax.wsol_methods import ADL

Array = jax.Array

STEMS = ("imagenet", "deep", "deep_tiered", "cifar")
BLOCKS = ("basic", "bottleneck", "sk_basic", "sk_bottleneck")
#: Output channels per unit of ``planes`` (``base_width * 2 ** stage``).
EXPANSION = {"basic": 1, "bottleneck": 4, "sk_basic": 1, "sk_bottleneck": 4}


def _conv(features: int, kernel: int, stride: int, dtype: Any, name: str,
          groups: int = 1) -> nn.Conv:
    """Bias-free convolution with symmetric padding ``kernel // 2`` (PyTorch's alignment:
    with stride 2 the window starts at the first pixel, unlike XLA's "SAME")."""
    pad = kernel // 2
    return nn.Conv(
        features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
        feature_group_count=groups, use_bias=False, dtype=dtype, kernel_init=conv_kernel_init,
        name=name,
    )


def avg_pool_ceil(x: Array, stride: int) -> Array:
    """PyTorch's ``AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False)`` on ``[B,
    H, W, C]``: an odd edge gets a last window of its valid pixels only."""

    def right_pad(size: int) -> int:
        windows = -(-max(size - 2, 0) // stride) + 1  # ceil mode
        return max(0, (windows - 1) * stride + 2 - size)

    pads = tuple((0, right_pad(size)) for size in x.shape[1:3])
    return nn.avg_pool(x, (2, 2), strides=(stride, stride), padding=pads,
                       count_include_pad=False)


class ResidualBlock(nn.Module):
    """One residual block, ``[B, H, W, Cin] -> [B, H/stride, W/stride, EXPANSION * planes]``.

    ``basic``: conv3x3(stride) - BN - ReLU - conv3x3 - BN [- se]. ``bottleneck``:
    conv1x1 - BN - ReLU - conv3x3(stride, groups) - BN - ReLU - conv1x1 - BN [- se]. The
    SK blocks replace the strided 3x3 by a ``SelectiveKernel`` (``conv1`` in ``sk_basic``,
    ``conv2`` in ``sk_bottleneck``) and hold each other convolution + BN as ``conv<i>/{conv,
    bn}``. Then add the shortcut (identity, or a 1x1 projection + BN when the shape changes;
    ``avg_down``: 2x2 average pool first) and ReLU.
    """

    planes: int
    stride: int
    block: str
    attn: str | None = None
    attn_options: Any = None
    sk_options: Any = None
    groups: int = 1
    width_per_group: int = 64
    avg_down: bool = False
    zero_init_residual: bool = False
    dtype: Any = None
    axis_name: str | None = None

    @property
    def out_channels(self) -> int:
        return self.planes * EXPANSION[self.block]

    def _norm(self, train: bool, name: str, zero: bool = False) -> nn.BatchNorm:
        return nn.BatchNorm(
            use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype,
            axis_name=self.axis_name, name=name,
            scale_init=nn.initializers.zeros if zero else nn.initializers.ones)

    def _conv_norm(self, features: int, kernel: int, act: bool, name: str) -> ConvNorm:
        return ConvNorm(features, kernel, act_layer="relu" if act else None, dtype=self.dtype,
                        axis_name=self.axis_name, name=name)

    def _selective(self, features: int, name: str, groups: int = 1) -> SelectiveKernel:
        return SelectiveKernel(features, strides=self.stride, groups=groups, dtype=self.dtype,
                               axis_name=self.axis_name, name=name, **dict(self.sk_options or {}))

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        zero = self.zero_init_residual
        if self.block in ("basic", "sk_basic") and (self.groups != 1
                                                    or self.width_per_group != 64):
            raise ValueError(f"block={self.block!r} takes groups=1 and width_per_group=64; "
                             f"got groups={self.groups}, width_per_group={self.width_per_group}")
        width = int(self.planes * self.width_per_group / 64) * self.groups
        if self.block == "bottleneck":
            y = nn.relu(self._norm(train, "bn1")(_conv(width, 1, 1, self.dtype, "conv1")(x)))
            y = _conv(width, 3, self.stride, self.dtype, "conv2", self.groups)(y)
            y = nn.relu(self._norm(train, "bn2")(y))
            y = self._norm(train, "bn3", zero)(
                _conv(self.out_channels, 1, 1, self.dtype, "conv3")(y))
        elif self.block == "basic":
            y = _conv(self.planes, 3, self.stride, self.dtype, "conv1")(x)
            y = nn.relu(self._norm(train, "bn1")(y))
            y = self._norm(train, "bn2", zero)(_conv(self.planes, 3, 1, self.dtype, "conv2")(y))
        elif self.block == "sk_basic":
            y = self._selective(self.planes, "conv1")(x, train)
            y = self._conv_norm(self.planes, 3, False, "conv2")(y, train)
        else:
            y = self._conv_norm(width, 1, True, "conv1")(x, train)
            y = self._selective(width, "conv2", self.groups)(y, train)
            y = self._conv_norm(self.out_channels, 1, False, "conv3")(y, train)
        attention = block_attention(self.attn, self.attn_options or {}, self.out_channels,
                                    dtype=self.dtype, axis_name=self.axis_name, name="se")
        if attention is not None:
            y = attention(y, train)
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.out_channels:
            if self.avg_down:
                pooled = avg_pool_ceil(x, self.stride) if self.stride > 1 else x
                shortcut = _conv(self.out_channels, 1, 1, self.dtype, "downsample_avg_conv")(
                    pooled)
                shortcut = self._norm(train, "downsample_avg_bn")(shortcut)
            else:
                shortcut = _conv(self.out_channels, 1, self.stride, self.dtype,
                                 "downsample_conv")(x)
                shortcut = self._norm(train, "downsample_bn")(shortcut)
        return nn.relu(y + shortcut.astype(y.dtype))


class ResNet(Classifier):
    """ResNet-family classifier: ``[B, H, W, C] -> float32 logits [B, K]``.

    Attributes (beyond ``Classifier``'s):
      stage_sizes: blocks per stage, e.g. ``(3, 4, 6, 3)`` for ResNet-50.
      block: ``"basic"`` (ResNet-18/34), ``"bottleneck"`` (ResNet-50/101), ``"sk_basic"``
        / ``"sk_bottleneck"`` (SKNet).
      base_width: ``planes`` of the first stage (64 in the published models; smaller
        values make cheap test and CPU models).
      stem: ``"imagenet"``, ``"deep"``, ``"deep_tiered"`` or ``"cifar"`` (module docs).
      stem_width: the stem's width: the plain stems' convolution (None: ``base_width``);
        the deep stems' first convolutions, ending at ``2 stem_width`` (None:
        ``base_width // 2``; timm's ``stem_width=32``).
      avg_down: average-pool downsampling in the projection shortcuts (ResNet-D).
      groups / width_per_group: ResNeXt's cardinality and per-group width (bottlenecks).
      attn: attention in every block (``se``): an ``ATTENTIONS`` name or None;
        ``attn_kwargs`` its options (timm's names).
      se_reduction / se_divisor / se_pool / se_gate: the older spelling of
        ``attn_kwargs`` ``rd_ratio = 1 / se_reduction``, ``rd_divisor``, ``squeeze``,
        ``gate_layer`` (None: not set).
      sk_kwargs: ``SelectiveKernel`` options of the SK blocks (timm's ``sk_kwargs``).
      zero_init_residual: start each block's last BN scale at 0 (the block starts as the
        identity); off in torchvision's defaults.
      fc_widths: hidden widths of ``head="fc"``; the default ``()`` is one Dense on the
        flattened final map, the exact counterpart of GAP + Dense (it has ``h * w`` times
        the head parameters: 49x at 224x224).
      stage_strides: stride of each stage's first block; None = ``(1, 2, 2, 2)``. WSOL's
        ResNet-50 uses ``(1, 2, 2, 1)`` (14x14 at 224) or, with its larger final feature
        map, ``(1, 2, 1, 1)`` (28x28).
      adl_blocks: blocks (``"layer3_0"``, ...) followed by an ADL layer
        (``gapjax.wsol_methods.ADL``, with ``adl_drop_rate`` and ``adl_threshold``).
    """

    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    block: str = "basic"
    base_width: int = 64
    stem_width: int | None = None
    avg_down: bool = False
    groups: int = 1
    width_per_group: int = 64
    attn: str | None = None
    attn_kwargs: Any = None
    se_reduction: float | None = None
    se_divisor: int | None = None
    se_pool: str | None = None
    se_gate: str | None = None
    sk_kwargs: Any = None
    zero_init_residual: bool = False
    stage_strides: Sequence[int] | None = None
    adl_blocks: Sequence[str] = ()
    adl_drop_rate: float = 0.75
    adl_threshold: float = 0.9

    def stem_layers(self, x: Array, train: bool) -> Array:
        """The stem (``stem``), early tap on its first convolution."""
        dtype = self.compute_dtype
        if self.stem in ("deep", "deep_tiered"):
            width = self.stem_width or self.base_width // 2
            widths = (width, width) if self.stem == "deep" else (3 * (width // 4), width)
            x = self.early_tap(_conv(widths[0], 3, 2, dtype, "stem_conv1")(x))
            x = nn.relu(self.norm_layer(train, "stem_bn1")(x))
            x = nn.relu(self.norm_layer(train, "stem_bn2")(
                _conv(widths[1], 3, 1, dtype, "stem_conv2")(x)))
            x = _conv(2 * width, 3, 1, dtype, "stem_conv3")(x)
        else:
            imagenet = self.stem == "imagenet"
            x = _conv(self.stem_width or self.base_width, 7 if imagenet else 3,
                      2 if imagenet else 1, dtype, "conv1")(x)
            x = self.early_tap(x)
        x = nn.relu(self.norm_layer(train, "bn1")(x))
        if self.stem != "cifar":
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        return x

    def backbone(self, x: Array, train: bool) -> Array:
        check_choice("stem", self.stem, STEMS)
        check_choice("block", self.block, BLOCKS)
        check_attention(self.attn)
        options = attention_options(self.attn_kwargs, se_reduction=self.se_reduction,
                                    se_divisor=self.se_divisor, se_pool=self.se_pool,
                                    se_gate=self.se_gate)
        if self.block.startswith("sk_") and self.zero_init_residual:
            raise ValueError(f"zero_init_residual=True is not available for block="
                             f"{self.block!r} (timm's SK-ResNets start with it off)")
        if self.sk_kwargs and not self.block.startswith("sk_"):
            raise ValueError(f"sk_kwargs apply to the SK blocks (block='sk_basic' or "
                             f"'sk_bottleneck'); got block={self.block!r}")
        x = self.stem_layers(x, train)
        strides = self.stage_strides or [1] + [2] * (len(self.stage_sizes) - 1)
        for stage, num_blocks in enumerate(self.stage_sizes):
            for index in range(num_blocks):
                name = f"layer{stage + 1}_{index}"
                x = ResidualBlock(
                    planes=self.base_width * 2**stage,
                    stride=strides[stage] if index == 0 else 1,
                    block=self.block, attn=self.attn, attn_options=frozen(options),
                    sk_options=self.sk_kwargs, groups=self.groups,
                    width_per_group=self.width_per_group, avg_down=self.avg_down,
                    zero_init_residual=self.zero_init_residual, dtype=self.compute_dtype,
                    axis_name=self.axis_name, name=name,
                )(x, train)
                if name in self.adl_blocks:
                    x = ADL(self.adl_drop_rate, self.adl_threshold, name=f"{name}_adl")(x, train)
        return x


_DEPTHS: dict[int, tuple[tuple[int, ...], str]] = {
    18: ((2, 2, 2, 2), "basic"),
    34: ((3, 4, 6, 3), "basic"),
    50: ((3, 4, 6, 3), "bottleneck"),
    101: ((3, 4, 23, 3), "bottleneck"),
}


def _register(name: str, depth: int, attn: str | None) -> None:
    stage_sizes, block = _DEPTHS[depth]
    kind = "SE-ResNet" if attn else "ResNet"
    register_preset(
        name, ResNet, {"stage_sizes": stage_sizes, "block": block, "attn": attn},
        f"{kind}-{depth} ({block} blocks, stages {stage_sizes}); keyword arguments are "
        "ResNet attributes, e.g. num_classes, stem, head, pool, attn, attn_kwargs, dtype.",
    )


for _depth in _DEPTHS:
    _register(f"resnet{_depth}", _depth, None)
    _register(f"seresnet{_depth}", _depth, "se")

#: timm's ResNet variants under timm's names: preset attributes and a description.
TIMM_VARIANTS: dict[str, tuple[dict[str, Any], str]] = {
    "resnet50d": (dict(stage_sizes=(3, 4, 6, 3), block="bottleneck", stem="deep",
                       avg_down=True), "ResNet-50-D: deep stem, average-pool downsampling"),
    "ecaresnet50d": (dict(stage_sizes=(3, 4, 6, 3), block="bottleneck", stem="deep",
                          avg_down=True, attn="eca"), "ResNet-50-D with ECA in every block"),
    "resnet26t": (dict(stage_sizes=(2, 2, 2, 2), block="bottleneck", stem="deep_tiered",
                       avg_down=True), "ResNet-26-T: tiered deep stem (24, 32, 64), "
                  "average-pool downsampling"),
    "seresnext50_32x4d": (dict(stage_sizes=(3, 4, 6, 3), block="bottleneck", groups=32,
                               width_per_group=4, attn="se"),
                          "SE-ResNeXt-50 32x4d: grouped 3x3 convolutions, SE in every block"),
    "skresnet18": (dict(stage_sizes=(2, 2, 2, 2), block="sk_basic",
                        sk_kwargs={"rd_ratio": 1 / 8, "rd_divisor": 16, "split_input": True}),
                   "SK-ResNet-18: selective kernel (3x3 and dilated 3x3) basic blocks"),
}

for _name, (_preset, _description) in TIMM_VARIANTS.items():
    register_preset(_name, ResNet, _preset, f"timm's {_name}: {_description}; keyword "
                    "arguments are ResNet attributes (num_classes, head, pool, attn, ...).")


# Weights: torchvision's ResNets and timm's variants share the names. Attention modules keep
# timm's names under ``se`` (so no rule: conv kernels, Conv1d kernels and Linear kernels take
# the engine's defaults by rank); deep stems are timm's ``conv1`` Sequential, average-pool
# shortcuts hold the pool at ``downsample.0``, SK paths are a ModuleList.
RESNET_LAYOUT = LAYOUTS.add("resnet", Layout(
    source="torchvision", torch_models="torchvision.models.<name>()",
    renames=((r"layer(\d+)_(\d+)", r"layer\1.\2"), (r"downsample_conv", "downsample.0"),
             (r"downsample_bn", "downsample.1"), (r"downsample_avg_conv", "downsample.1"),
             (r"downsample_avg_bn", "downsample.2"), (r"^stem_conv1$", "conv1.0"),
             (r"^stem_bn1$", "conv1.1"), (r"^stem_conv2$", "conv1.3"),
             (r"^stem_bn2$", "conv1.4"), (r"^stem_conv3$", "conv1.6"),
             (r"paths_(\d+)", r"paths/\1"), (r"^head/classifier$", "fc"))))
_TIMM_LAYOUT = RESNET_LAYOUT.extend(source="timm", torch_models="timm.create_model('<name>')")
for _prefix in ("seresnet", "seresnext", "ecaresnet", "skresnet", "resnet50d", "resnet26t"):
    LAYOUTS.add(_prefix, _TIMM_LAYOUT)

__all__ = ["BLOCKS", "EXPANSION", "STEMS", "TIMM_VARIANTS", "ResNet", "ResidualBlock",
           "avg_pool_ceil"]
