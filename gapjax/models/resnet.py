"""ResNet and SE-ResNet, NHWC, in the torchvision v1.5 layout.

Layout (torchvision ``resnet*``): stem, four stages of residual blocks with widths
``base_width * (1, 2, 4, 8)``, then the head. Bottlenecks put the stride on the 3x3
convolution (v1.5); the projection shortcut is a strided 1x1 convolution + BN;
convolutions have no bias; BatchNorm uses momentum 0.9 and epsilon 1e-5.

SE-ResNets (``attn="se"``) follow timm's ``seresnet*``: the SE block sits after the last
BN of the residual branch, before the addition, with reduction 16 and its bottleneck
width rounded to a multiple of 8. ``attn="local"`` puts a ``LocalGate`` (same parameter
count, no global context) in the same place.

Stems: ``"imagenet"`` is conv 7x7/2 (pad 3) + BN + ReLU + max pool 3x3/2 (pad 1), so a
224x224 image gives a 7x7 final map; ``"cifar"`` is conv 3x3/1 + BN + ReLU with no pool,
so a 32x32 image gives a 4x4 final map.

Parameter names mirror torchvision (``conv1``, ``bn1``, ``layer1_0/conv1``, ...,
``layer1_0/downsample_conv``, ``head/classifier`` for ``fc``), and with 1000 classes the
parameter counts equal the published models to the unit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax

from gapjax.layers import (
    ATTENTIONS,
    Classifier,
    check_choice,
    conv_kernel_init,
    make_attention,
)
from gapjax.models.layouts import CONV1X1_DENSE, LAYOUTS, Layout
from gapjax.models.zoo import register_preset
from gapjax.wsol_methods import ADL

Array = jax.Array

STEMS = ("imagenet", "cifar")
BLOCKS = ("basic", "bottleneck")


def _conv(features: int, kernel: int, stride: int, dtype: Any, name: str) -> nn.Conv:
    """Bias-free convolution with symmetric padding ``kernel // 2`` (PyTorch's alignment:
    with stride 2 the window starts at the first pixel, unlike XLA's "SAME")."""
    pad = kernel // 2
    return nn.Conv(
        features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
        use_bias=False, dtype=dtype, kernel_init=conv_kernel_init, name=name,
    )


class ResidualBlock(nn.Module):
    """One residual block, ``[B, H, W, Cin] -> [B, H/stride, W/stride, out_channels]``.

    ``block="basic"``: conv3x3(stride) - BN - ReLU - conv3x3 - BN [- gate]; output
    ``width`` channels. ``block="bottleneck"``: conv1x1 - BN - ReLU - conv3x3(stride) - BN -
    ReLU - conv1x1 - BN [- gate]; output ``4 * width`` channels. Then add the shortcut
    (identity, or conv1x1(stride) + BN when the shape changes) and ReLU.
    """

    width: int
    stride: int
    block: str
    norm: Callable[..., nn.Module]
    attention: Callable[[str], nn.Module | None]
    zero_init_residual: bool = False
    dtype: Any = None

    @property
    def out_channels(self) -> int:
        return self.width * (4 if self.block == "bottleneck" else 1)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.block == "bottleneck":
            y = nn.relu(self.norm(name="bn1")(_conv(self.width, 1, 1, self.dtype, "conv1")(x)))
            y = _conv(self.width, 3, self.stride, self.dtype, "conv2")(y)
            y = nn.relu(self.norm(name="bn2")(y))
            y = _conv(self.out_channels, 1, 1, self.dtype, "conv3")(y)
            last_bn = "bn3"
        else:
            y = _conv(self.width, 3, self.stride, self.dtype, "conv1")(x)
            y = nn.relu(self.norm(name="bn1")(y))
            y = _conv(self.width, 3, 1, self.dtype, "conv2")(y)
            last_bn = "bn2"
        scale_init = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
        y = self.norm(name=last_bn, scale_init=scale_init)(y)
        gate = self.attention("se")
        if gate is not None:
            y = gate(y)
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.out_channels:
            shortcut = _conv(self.out_channels, 1, self.stride, self.dtype, "downsample_conv")(x)
            shortcut = self.norm(name="downsample_bn")(shortcut)
        return nn.relu(y + shortcut)


class ResNet(Classifier):
    """ResNet / SE-ResNet classifier: ``[B, H, W, C] -> float32 logits [B, K]``.

    Attributes (beyond ``Classifier``'s):
      stage_sizes: blocks per stage, e.g. ``(3, 4, 6, 3)`` for ResNet-50.
      block: ``"basic"`` (ResNet-18/34) or ``"bottleneck"`` (ResNet-50/101).
      base_width: width of the first stage (64 in the published models; smaller values
        make cheap test and CPU models).
      attn: channel gate in every block: ``"se"``, ``"local"`` or None.
      se_reduction / se_divisor / se_pool / se_gate: options of the gate (see
        ``gapjax.layers.SqueezeExcite``).
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
    attn: str | None = None
    se_reduction: float = 16
    se_divisor: int = 8
    se_pool: str = "gap"
    se_gate: str = "sigmoid"
    zero_init_residual: bool = False
    stage_strides: Sequence[int] | None = None
    adl_blocks: Sequence[str] = ()
    adl_drop_rate: float = 0.75
    adl_threshold: float = 0.9

    def backbone(self, x: Array, train: bool) -> Array:
        check_choice("stem", self.stem, STEMS)
        check_choice("block", self.block, BLOCKS)
        check_choice("attn", self.attn, (*ATTENTIONS, None))
        dtype = self.compute_dtype
        if self.stem == "imagenet":
            x = self.early_tap(_conv(self.base_width, 7, 2, dtype, "conv1")(x))
            x = nn.relu(self.norm_layer(train, "bn1")(x))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        else:
            x = self.early_tap(_conv(self.base_width, 3, 1, dtype, "conv1")(x))
            x = nn.relu(self.norm_layer(train, "bn1")(x))

        def norm(name: str, scale_init: Callable[..., Array] = nn.initializers.ones):
            return nn.BatchNorm(
                use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                axis_name=self.axis_name, scale_init=scale_init, name=name,
            )

        def attention(name: str) -> nn.Module | None:
            return make_attention(
                self.attn, reduction=self.se_reduction, divisor=self.se_divisor,
                pool=self.se_pool, gate=self.se_gate, dtype=dtype, name=name,
            )

        strides = self.stage_strides or [1] + [2] * (len(self.stage_sizes) - 1)
        for stage, num_blocks in enumerate(self.stage_sizes):
            for index in range(num_blocks):
                x = ResidualBlock(
                    width=self.base_width * 2**stage,
                    stride=strides[stage] if index == 0 else 1,
                    block=self.block,
                    norm=norm,
                    attention=attention,
                    zero_init_residual=self.zero_init_residual,
                    dtype=dtype,
                    name=f"layer{stage + 1}_{index}",
                )(x)
                if f"layer{stage + 1}_{index}" in self.adl_blocks:
                    x = ADL(self.adl_drop_rate, self.adl_threshold,
                            name=f"layer{stage + 1}_{index}_adl")(x, train)
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
        "ResNet attributes, e.g. num_classes, stem, head, pool, dtype.",
    )


for _depth in _DEPTHS:
    _register(f"resnet{_depth}", _depth, None)
    _register(f"seresnet{_depth}", _depth, "se")


# Weights: torchvision's ResNets and timm's SE-ResNets share the names; timm adds se.fc1 /
# se.fc2 (1x1 convolutions with bias).
RESNET_LAYOUT = LAYOUTS.add("resnet", Layout(
    source="torchvision", torch_models="torchvision.models.<name>()",
    renames=((r"layer(\d+)_(\d+)", r"layer\1.\2"), (r"downsample_conv", "downsample.0"),
             (r"downsample_bn", "downsample.1"), (r"se/reduce", "se/fc1"),
             (r"se/expand", "se/fc2"), (r"^head/classifier$", "fc")),
    kernels=((r"(^|/)se/(reduce|expand)$", CONV1X1_DENSE),)))
LAYOUTS.add("seresnet", RESNET_LAYOUT.extend(source="timm",
                                            torch_models="timm.create_model('<name>')"))
