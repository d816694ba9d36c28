"""EfficientNet-B0..B3 in timm's layout (``timm.create_model('efficientnet_b0')``).

Layout (Tan & Le 2019; timm's ``EfficientNet``): ``conv_stem`` 3x3/2 - ``bn1`` - SiLU,
seven stages of MBConv blocks (``gapjax.models.mbconv``: a depthwise-separable block,
then inverted residuals with expansion 6, every block with an SE, ``gapjax.attention``'s
``"se"``, of width ``round(block input * 0.25)``, SiLU and a sigmoid gate; ``attn_kwargs``
overrides its options), ``conv_head`` 1x1 - ``bn2`` -
SiLU, then the GAP head (any ``POOLS`` pool + Dense ``classifier``). The final map is
the input downsampled 32x (7x7 at 224).

B1..B3 scale the B0 table: widths by ``width_multiplier`` (1.0, 1.0, 1.1, 1.2; rounded
to multiples of 8 as timm's ``round_channels``), depths by ``depth_multiplier`` (1.0,
1.1, 1.2, 1.4; ``ceil`` per stage). The head width is ``round_channels(1280 * w)``.
With 1000 classes the parameter counts equal timm's to the unit: 5,288,548 (B0),
7,794,184 (B1), 9,109,994 (B2), 12,233,232 (B3).

Maps: the head is a pool and a linear classifier, so with ``pool="gap"`` CAM and
contribution maps are exact (``map_kinds == ("cam", "contribution")``).
"""

from __future__ import annotations

from typing import Any

import jax

from gapjax.layers import Classifier, check_choice
from gapjax.models import LAYOUTS, register_preset
from gapjax.models.mbconv import (
    MBCONV_LAYOUT,
    StageSpec,
    activation,
    apply_blocks,
    batch_norm,
    block_configs,
    conv2d,
    round_channels,
)

Array = jax.Array

#: The B0 table (timm's ``ds_r1_k3_s1_e1_c16_se0.25``, ``ir_r2_k3_s2_e6_c24_se0.25``, ...).
EFFICIENTNET_STAGES: tuple[tuple[StageSpec, ...], ...] = (
    (StageSpec("ds", 1, 3, 1, 1.0, 16, 0.25),),
    (StageSpec("ir", 2, 3, 2, 6.0, 24, 0.25),),
    (StageSpec("ir", 2, 5, 2, 6.0, 40, 0.25),),
    (StageSpec("ir", 3, 3, 2, 6.0, 80, 0.25),),
    (StageSpec("ir", 3, 5, 1, 6.0, 112, 0.25),),
    (StageSpec("ir", 4, 5, 2, 6.0, 192, 0.25),),
    (StageSpec("ir", 1, 3, 1, 6.0, 320, 0.25),),
)


class EfficientNet(Classifier):
    """EfficientNet: ``[B, H, W, 3] -> float32 logits [B, K]``.

    Attributes (beyond ``Classifier``'s):
      width_multiplier / depth_multiplier: the compound scaling of B0's table.
      drop_path: stochastic depth of the last block (block ``i`` of ``n``: ``rate * i /
        n``, timm's rule); off in evaluation. timm trains B0..B3 with 0.2.
      attn_kwargs: options of every block's ``"se"`` (``gapjax.attention``) over the
        family's ``rd_channels``, ``act_layer="silu"``, ``gate_layer="sigmoid"``, e.g.
        ``{"squeeze": "gem"}`` (see ``mbconv.se_options``).
      stem: only ``"imagenet"`` (the 3x3/2 stem).
    """

    width_multiplier: float = 1.0
    depth_multiplier: float = 1.0
    drop_path: float = 0.0
    attn_kwargs: Any = None

    def backbone(self, x: Array, train: bool) -> Array:
        check_choice("stem", self.stem, ("imagenet",))
        dtype, silu = self.compute_dtype, activation("silu")
        stem_channels = round_channels(32, self.width_multiplier)
        x = self.early_tap(conv2d(stem_channels, 3, 2, dtype=dtype, name="conv_stem")(x))
        x = silu(batch_norm(train, dtype=dtype, axis_name=self.axis_name, name="bn1")(x))
        stages = block_configs(
            EFFICIENTNET_STAGES, stem_channels=stem_channels, default_act="silu",
            width_multiplier=self.width_multiplier, depth_multiplier=self.depth_multiplier,
            drop_path=self.drop_path)
        x = apply_blocks(x, stages, train, se_act=None, se_gate="sigmoid",
                         attn_kwargs=self.attn_kwargs, dtype=dtype, axis_name=self.axis_name)
        head_channels = round_channels(1280, self.width_multiplier)
        x = conv2d(head_channels, 1, dtype=dtype, name="conv_head")(x)
        return silu(batch_norm(train, dtype=dtype, axis_name=self.axis_name, name="bn2")(x))


#: name -> (width multiplier, depth multiplier), timm's ``efficientnet_b*``.
SCALINGS = {
    "efficientnet_b0": (1.0, 1.0),
    "efficientnet_b1": (1.0, 1.1),
    "efficientnet_b2": (1.1, 1.2),
    "efficientnet_b3": (1.2, 1.4),
}

for _name, (_width, _depth) in SCALINGS.items():
    register_preset(
        _name, EfficientNet, {"width_multiplier": _width, "depth_multiplier": _depth},
        f"EfficientNet-{_name[-2:].upper()} (width x{_width}, depth x{_depth}), timm's "
        f"{_name}; keyword arguments are EfficientNet attributes (num_classes, pool, head, "
        "dtype, drop_path, dropout, ...).",
    )


# Weights: timm's names, block for block (``mbconv.MBCONV_LAYOUT``).
LAYOUTS.add("efficientnet_", MBCONV_LAYOUT.extend(
    torch_models="timm.create_model('efficientnet_b{0,1,2,3}')"))
