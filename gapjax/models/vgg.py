"""VGG-11 and VGG-16 (optionally with BatchNorm), NHWC, in the torchvision layout.

Features: 3x3 convolutions (padding 1, with bias) + ReLU, BN between them when
``batch_norm=True``, and a 2x2 max pool after each of the five blocks. Heads:

* ``head="fc"`` (default, the published model): torchvision's adaptive average pool to
  7x7, flatten, Dense 4096 - ReLU - Dropout(0.5) - Dense 4096 - ReLU - Dropout(0.5) -
  Dense K. At 224x224 the final map is already 7x7 and the pool does nothing; at other
  sizes the pool keeps the head at 25,088 inputs: larger maps are averaged to 7x7, smaller
  ones are *repeated* to 7x7 (a 1x1 map becomes 49 copies), which adds no information but
  keeps every parameter of the published head. With ``1000`` classes the parameter counts
  equal torchvision's (vgg16: 138,357,544; vgg16_bn: 138,365,992).
* ``head="gap"``: any ``POOLS`` pool on the same final map, then Dense K (CAM's VGG head
  apart from CAM's extra convolution): 512 * K + K head parameters instead of ~124M.

``stem="cifar"`` drops the fifth max pool, so a 32x32 image keeps a 2x2 final map (stride
16) and the FC head flattens that map directly (no 7x7 grid) unless ``fc_grid`` says
otherwise. ``base_width`` scales every width (64 in the published models).

``attn`` (any ``gapjax.attention.ATTENTIONS`` name, options ``attn_kwargs``) adds an attention
module after each block's last convolution (+ BN) + ReLU, before its max pool, as
``block<b>_se``; in torch's naming it is the next ``features.<i>`` entry (an
``nn.Sequential`` with the module inserted there).
"""

from __future__ import annotations

import math
import re
from typing import Any

import flax.linen as nn
import jax

from gapjax.layers import (
    Classifier,
    attention_options,
    block_attention,
    check_attention,
    check_choice,
    conv_kernel_init,
)
from gapjax.models.layouts import LAYOUTS, FlattenDense, Layout, module_shapes
from gapjax.models.zoo import register_preset
from gapjax.wsol_methods import ADL

Array = jax.Array

STEMS = ("imagenet", "cifar")

#: Output widths of the convolutions per block, as multiples of ``base_width / 64``.
CONFIGS: dict[int, tuple[tuple[int, ...], ...]] = {
    11: ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    16: ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
}

AUTO = "auto"


class VGG(Classifier):
    """VGG classifier: ``[B, H, W, C] -> float32 logits [B, K]``.

    Attributes (beyond ``Classifier``'s):
      depth: 11 or 16.
      batch_norm: BN after every convolution (torchvision's ``vgg*_bn``).
      base_width: width of the first block (64 in the published models).
      head: ``"fc"`` by default (the published model) or ``"gap"``.
      fc_widths: hidden widths of the FC head, ``(4096, 4096)`` by default.
      fc_grid: grid the FC head pools to before flattening; ``"auto"`` = ``(7, 7)`` with
        the imagenet stem and None (flatten as is) with the cifar stem.
      pool_after: the blocks (1-5) followed by a max pool; None = all five (the cifar
        stem: the first four). WSOL's VGG-16 CAM: ``(1, 2, 3, 4)`` (14x14 at 224), with its
        larger final feature map ``(1, 2, 3)`` (28x28).
      extra_convs: widths of 3x3 convolutions + ReLU after the blocks (``conv6_1``, ...);
        CAM's VGG-16 has ``(1024,)``.
      adl_blocks: ADL layers (``gapjax.wsol_methods.ADL``) after block ``"block{b}"``'s
        convolutions (and attention) or after its pool ``"pool{b}"``, with
        ``adl_drop_rate`` and ``adl_threshold``.
      attn: attention after each block (``block<b>_se``): an ``ATTENTIONS`` name or None;
        ``attn_kwargs`` its options (timm's names).
    """

    depth: int = 16
    batch_norm: bool = False
    base_width: int = 64
    head: str = "fc"
    fc_widths: tuple[int, ...] = (4096, 4096)
    fc_grid: Any = AUTO
    pool_after: Any = None
    extra_convs: tuple[int, ...] = ()
    adl_blocks: tuple[str, ...] = ()
    adl_drop_rate: float = 0.75
    adl_threshold: float = 0.9
    attn: str | None = None
    attn_kwargs: Any = None

    def _adl(self, x: Array, point: str, train: bool) -> Array:
        if point not in self.adl_blocks:
            return x
        return ADL(self.adl_drop_rate, self.adl_threshold, name=f"{point}_adl")(x, train)

    def resolved_fc_grid(self) -> tuple[int, int] | None:
        if self.fc_grid == AUTO:
            return (7, 7) if self.stem == "imagenet" else None
        return None if self.fc_grid is None else tuple(self.fc_grid)

    def fc_kernel_init(self):
        return nn.initializers.normal(0.01)  # torchvision's init of the VGG classifier

    def backbone(self, x: Array, train: bool) -> Array:
        check_choice("stem", self.stem, STEMS)
        check_choice("depth", self.depth, tuple(CONFIGS))
        check_attention(self.attn)
        options = attention_options(self.attn_kwargs)
        blocks = CONFIGS[self.depth]
        for block_index, widths in enumerate(blocks):
            for conv_index, width in enumerate(widths):
                name = f"conv{block_index + 1}_{conv_index + 1}"
                x = nn.Conv(
                    width * self.base_width // 64, (3, 3), padding=((1, 1), (1, 1)),
                    dtype=self.compute_dtype, kernel_init=conv_kernel_init,
                    bias_init=nn.initializers.zeros, name=name,
                )(x)
                if block_index == conv_index == 0:
                    x = self.early_tap(x)
                if self.batch_norm:
                    x = self.norm_layer(train, f"bn{block_index + 1}_{conv_index + 1}")(x)
                x = nn.relu(x)
            attention = block_attention(self.attn, options, x.shape[-1],
                                        dtype=self.compute_dtype, axis_name=self.axis_name,
                                        name=f"block{block_index + 1}_se")
            if attention is not None:
                x = attention(x, train)
            x = self._adl(x, f"block{block_index + 1}", train)
            last = block_index == len(blocks) - 1
            pooled = (not (last and self.stem == "cifar") if self.pool_after is None
                      else block_index + 1 in tuple(self.pool_after))
            if pooled:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
                x = self._adl(x, f"pool{block_index + 1}", train)
        for index, width in enumerate(self.extra_convs):
            x = nn.relu(nn.Conv(
                width, (3, 3), padding=((1, 1), (1, 1)), dtype=self.compute_dtype,
                kernel_init=conv_kernel_init, bias_init=nn.initializers.zeros,
                name=f"conv{len(blocks) + 1}_{index + 1}",
            )(x))
        return x


def _register(name: str, depth: int, batch_norm: bool) -> None:
    register_preset(
        name, VGG, {"depth": depth, "batch_norm": batch_norm},
        f"VGG-{depth}{' with BatchNorm' if batch_norm else ''}; keyword arguments are VGG "
        "attributes, e.g. num_classes, head, pool, stem, dtype.",
    )


for _depth in CONFIGS:
    _register(f"vgg{_depth}", _depth, False)
    _register(f"vgg{_depth}_bn", _depth, True)


# --------------------------------------------------------------------------------------
# Weights: torchvision's vgg* (features.<i>, classifier.<3 n>)
# --------------------------------------------------------------------------------------


def _conv_order(path: str) -> tuple[int, ...] | None:
    match = re.fullmatch(r"conv(\d+)_(\d+)", path)
    return tuple(int(n) for n in match.groups()) if match else None


def _vgg_renames(shapes):
    """torchvision's ``features.<i>`` indices (conv, [bn], relu per layer, a max pool per
    block) and ``classifier.<3 n>`` for the n-th Dense of the head."""
    modules = module_shapes(shapes)
    convs = sorted(order for path in modules if (order := _conv_order(path)))
    renames, index, block = [], 0, None
    for block_index, conv_index in convs:
        if block is not None and block_index != block:
            index += 1  # the max pool closing the previous block
        block = block_index
        renames.append((rf"^conv{block_index}_{conv_index}$", f"features.{index}"))
        index += 1
        bn = f"bn{block_index}_{conv_index}"
        if bn in modules or any(p.startswith(f"batch_stats/{bn}/") for p in shapes):
            renames.append((rf"^{bn}$", f"features.{index}"))
            index += 1
        index += 1  # ReLU
        if conv_index == max(c for b, c in convs if b == block_index) and any(
                path.split("/")[1:2] == [f"block{block_index}_se"] for path in shapes):
            renames.append((rf"^block{block_index}_se(?=/|$)", f"features.{index}"))
            index += 1  # the attention module after the block's last ReLU
    hidden = sorted(int(m.group(1)) for path in modules
                    if (m := re.fullmatch(r"head/fc(\d+)", path)))
    for position, number in enumerate(hidden):
        renames.append((rf"^head/fc{number}$", f"classifier.{3 * position}"))
    renames.append((r"^head/classifier$", f"classifier.{3 * len(hidden)}"))
    return renames


def _vgg_kernels(shapes):
    """The head's first Dense reads the NCHW flatten of a square grid in torch."""
    modules = module_shapes(shapes)
    convs = [path for path in modules if _conv_order(path)]
    if not convs:
        return []
    channels = modules[max(convs, key=_conv_order)]["kernel"][-1]
    first = "head/fc1" if "head/fc1" in modules else "head/classifier"
    fan_in = modules.get(first, {}).get("kernel", (channels,))[0]
    cells = fan_in // channels
    side = math.isqrt(cells)
    if cells > 1 and side * side == cells and fan_in == cells * channels:
        return [(rf"^{first}$", FlattenDense((side, side)))]
    return []


LAYOUTS.add("vgg", Layout(source="torchvision", renames=_vgg_renames, kernels=_vgg_kernels,
                          torch_models="torchvision.models.<name>()"))

__all__ = ["CONFIGS", "VGG"]
