"""A small, fast convolutional classifier for the embedded digit datasets.

Stages of ``depth`` x (conv 3x3 - BN - ReLU), an optional attention module (``attn``, any
``gapjax.attention.ATTENTIONS`` name, options ``attn_kwargs``) at the end of each stage,
and a 2x2 max pool in front of every stage whose stride is 2. With the defaults (widths
32, 64, 128; strides 1, 2, 2) the final map is the input downsampled 4x:

* 8x8 sklearn digits -> 2x2x128, receptive field 32 px: every unit sees the whole digit;
* 64x64 cluttered or multi-label canvases -> 16x16x128, so class activation maps keep a
  useful resolution (strides ``(1, 2, 2, 2)`` with four widths give 8x8 instead).

``stem="cifar"`` (default) starts at full resolution; ``stem="imagenet"`` adds a
conv 7x7/2 - BN - ReLU - max pool 3x3/2 stem (4x cheaper for large inputs).
``head="fc"`` flattens the final map into one Dense (``fc_widths=()``), the counterpart of
GAP + Dense with ``h * w`` times its parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
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
from gapjax.models.zoo import register_preset

Array = jax.Array

STEMS = ("cifar", "imagenet")


class CNN(Classifier):
    """Small VGG-style CNN with BN: ``[B, H, W, C] -> float32 logits [B, K]``.

    Attributes (beyond ``Classifier``'s):
      widths: output channels of each stage.
      strides: per stage, 1 (keep resolution) or 2 (2x2 max pool before the stage);
        None = ``(1, 2, 2, ...)``, i.e. ``len(widths) - 1`` downsamplings.
      depth: convolutions per stage.
      attn: attention module after each stage (``stage<n>_se``): an ``ATTENTIONS`` name
        (``"se"``, ``"eca"``, ``"cbam"``, ``"local"``, a fork's, ...) or None.
      attn_kwargs: its options (timm's names: ``rd_ratio``, ``rd_divisor``, ``squeeze``,
        ``gate_layer``, ...), e.g. ``{"squeeze": "gem"}``.
      se_reduction / se_divisor / se_pool / se_gate: the older spelling of
        ``attn_kwargs`` ``rd_ratio = 1 / se_reduction``, ``rd_divisor``, ``squeeze``,
        ``gate_layer`` (None: not set).
    """

    stem: str = "cifar"
    widths: Sequence[int] = (32, 64, 128)
    strides: Sequence[int] | None = None
    depth: int = 2
    attn: str | None = None
    attn_kwargs: Any = None
    se_reduction: float | None = None
    se_divisor: int | None = None
    se_pool: str | None = None
    se_gate: str | None = None

    def stage_strides(self) -> tuple[int, ...]:
        """The validated per-stage strides."""
        if self.strides is None:
            return (1,) + (2,) * (len(self.widths) - 1)
        strides = tuple(self.strides)
        if len(strides) != len(self.widths):
            raise ValueError(
                f"strides={strides!r} must have one entry per stage, like "
                f"widths={tuple(self.widths)!r}"
            )
        for stride in strides:
            check_choice("strides[i]", stride, (1, 2))
        return strides

    def backbone(self, x: Array, train: bool) -> Array:
        check_choice("stem", self.stem, STEMS)
        check_attention(self.attn)
        options = attention_options(self.attn_kwargs, se_reduction=self.se_reduction,
                                    se_divisor=self.se_divisor, se_pool=self.se_pool,
                                    se_gate=self.se_gate)
        if self.depth < 1:
            raise ValueError(f"depth={self.depth!r} must be at least 1 convolution per stage")
        dtype = self.compute_dtype
        if self.stem == "imagenet":
            x = nn.Conv(
                self.widths[0], (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)),
                use_bias=False, dtype=dtype, kernel_init=conv_kernel_init, name="stem_conv",
            )(x)
            x = nn.relu(self.norm_layer(train, "stem_bn")(self.early_tap(x)))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        first_conv = self.stem != "imagenet"
        for stage, (width, stride) in enumerate(zip(self.widths, self.stage_strides())):
            if stride == 2:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
            for index in range(self.depth):
                name = f"stage{stage + 1}_conv{index + 1}"
                x = nn.Conv(
                    width, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, dtype=dtype,
                    kernel_init=conv_kernel_init, name=name,
                )(x)
                if first_conv:
                    x, first_conv = self.early_tap(x), False
                x = nn.relu(self.norm_layer(train, f"stage{stage + 1}_bn{index + 1}")(x))
            attention = block_attention(self.attn, options, width, dtype=dtype,
                                        axis_name=self.axis_name, name=f"stage{stage + 1}_se")
            if attention is not None:
                x = attention(x, train)
        return x


register_preset("cnn", CNN, {}, "The small digits CNN; keyword arguments are ``CNN`` "
                "attributes (num_classes, widths, strides, depth, attn, head, pool, dtype, ...).")

__all__ = ["CNN"]
