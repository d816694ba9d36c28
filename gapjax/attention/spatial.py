"""Attention with a spatial part: CBAM (channel then spatial gate) and the strip-pooling
family (coordinate attention and its variants), each following the timm module of the same
name (``timm.layers.cbam``, ``timm.layers.coord_attn``).

Strip pooling is a pool per image row and per image column: ``squeeze`` (any ``POOLS``
name, default ``"gap"``, the published mean) reduces each row (``squeeze_h``, giving one
vector per row) and each column (``squeeze_w``) as a set of vectors.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from gapjax.attention.base import ATTENTIONS, Attention, ConvNorm, _Layer, check_positive
from gapjax.attention.functional import (
    activation,
    channel_mean_max,
    columns_as_sets,
    depthwise_conv_1d,
    rows_as_sets,
    scale_by,
)

Array = jax.Array


class _ChannelGate(_Layer):
    """CBAM's channel attention (timm ``ChannelAttn``): every squeeze goes through the
    shared MLP ``fc1`` / ``fc2`` and the logits are summed before the gate."""

    hidden: int
    squeezes: tuple[str, ...]
    act_layer: str
    gate_layer: str
    mlp_bias: bool
    dtype: Any = None
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        fc1 = self.conv(self.hidden, bias=self.mlp_bias, name="fc1")
        fc2 = self.conv(x.shape[-1], bias=self.mlp_bias, name="fc2")
        pooled = [self.squeeze_with(name, x, f"squeeze_{i}")
                  for i, name in enumerate(self.squeezes)]
        widths = {p.shape[-1] for p in pooled}
        if len(widths) > 1:
            raise ValueError(f"cbam: the squeezes {self.squeezes} pool to different widths "
                             f"{sorted(widths)}; the shared MLP needs one width")
        logits = sum(fc2(activation(self.act_layer)(fc1(p[:, None, None, :]))) for p in pooled)
        return scale_by(x, self.gate(logits))


class _SpatialGate(_Layer):
    """CBAM's spatial attention (timm ``SpatialAttn`` / ``LightSpatialAttn``): the mean
    and max over channels (concatenated, or averaged when ``light``), ``conv`` (a
    ``ConvNorm``: k x k conv, BatchNorm) to one map, gate."""

    kernel_size: int
    light: bool
    gate_layer: str
    dtype: Any = None
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        mean, peak = channel_mean_max(x)
        if self.light:
            maps = (0.5 * mean.astype(jnp.float32) + 0.5 * peak.astype(jnp.float32))
        else:
            maps = jnp.concatenate([mean, peak], axis=-1)
        logits = ConvNorm(1, self.kernel_size, dtype=self.dtype, axis_name=self.axis_name,
                          name="conv")(maps.astype(x.dtype), train)
        return scale_by(x, self.gate(logits))


@ATTENTIONS.register("cbam")
class ConvolutionalBlockAttention(Attention):
    """CBAM (Woo et al. 2018; timm ``CbamModule``): a channel gate, then a spatial gate.

    ``channel``: each pool of ``squeeze`` (default ``("gap", "gmp")``, the paper's average
    and max pooling; one name or a tuple of ``POOLS`` names, all of one width) passes
    through the shared bias-free MLP ``channel/fc1``, ``channel/fc2`` (``rd_ratio`` 1/16,
    divisor 1) and the logits are summed. ``spatial``: mean and max over channels, a
    ``spatial_kernel_size`` conv ``spatial/conv/conv`` (no bias) + BatchNorm
    ``spatial/conv/bn``. ``squeeze`` applies to the channel gate only; the spatial gate
    pools across channels, not positions.
    """

    rd_ratio: float = 1.0 / 16
    rd_channels: int | None = None
    rd_divisor: int = 1
    spatial_kernel_size: int = 7
    act_layer: str = "relu"
    gate_layer: str = "sigmoid"
    mlp_bias: bool = False
    squeeze: str | tuple[str, ...] = ("gap", "gmp")

    light: ClassVar[bool] = False

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        x = self.prepare(x)
        check_positive("spatial_kernel_size", self.spatial_kernel_size, integer=True)
        squeezes = (self.squeeze,) if isinstance(self.squeeze, str) else tuple(self.squeeze)
        if not squeezes:
            raise ValueError("cbam: squeeze needs at least one POOLS name")
        x = _ChannelGate(self.reduced_width(x.shape[-1]), squeezes, self.act_layer,
                         self.gate_layer, self.mlp_bias, self.dtype, name="channel")(x)
        return _SpatialGate(self.spatial_kernel_size, self.light, self.gate_layer,
                            self.dtype, self.axis_name, name="spatial")(x, train)


@ATTENTIONS.register("lcbam")
class LightConvolutionalBlockAttention(ConvolutionalBlockAttention):
    """Light CBAM (timm ``LightCbamModule``): the channel gate reads one squeeze, default
    ``"avgmax"`` (``(GAP + GMP) / 2``), and the spatial gate one map, the average of the
    channel mean and max (conv ``[k, k, 1, 1]``). timm hard-codes the sigmoid in both
    gates; here ``gate_layer`` applies (sigmoid by default)."""

    squeeze: str | tuple[str, ...] = "avgmax"

    light: ClassVar[bool] = True


class _StripPools(Attention):
    """Shared by the strip-pooling modules: the two strip squeezes."""

    def strips(self, x: Array) -> tuple[Array, Array]:
        """``[B, H, W, C] -> ([B, H, w], [B, W, w])``: each row pooled over its ``W``
        positions (``squeeze_h``) and each column over its ``H`` positions
        (``squeeze_w``)."""
        batch, height, width, _ = x.shape
        rows = self.squeeze_with(self.squeeze, rows_as_sets(x), "squeeze_h")
        cols = self.squeeze_with(self.squeeze, columns_as_sets(x), "squeeze_w")
        return rows.reshape(batch, height, -1), cols.reshape(batch, width, -1)

    def factored_width(self, channels: int) -> int:
        """Coordinate attention's bottleneck: ``reduced_width(C * se_factor)`` (``se_factor``
        2/3 keeps the parameters near SE's)."""
        check_positive("se_factor", self.se_factor)
        return self.reduced_width(channels * self.se_factor)

    def finish(self, x: Array, gates: Array) -> Array:
        out = scale_by(x, gates)
        return out + x if self.has_skip else out


@ATTENTIONS.register("coord")
class CoordinateAttention(_StripPools):
    """Coordinate attention (Hou et al. 2021; timm ``CoordAttn``).

    Strip-pool the rows and columns, concatenate the ``H + W`` vectors and transform them
    together: 1x1 conv ``conv1`` (C -> ``make_divisible(C * rd_ratio * se_factor,
    rd_divisor)``), BatchNorm ``bn1``, hard-swish; split, then ``conv_h`` / ``conv_w``
    (-> C) give a gate per row ``[B, H, 1, C]`` and per column ``[B, 1, W, C]``:
    ``x * a_h * a_w`` (``+ x`` with ``has_skip``).
    """

    rd_ratio: float = 1.0 / 16
    rd_channels: int | None = None
    rd_divisor: int = 8
    se_factor: float = 2.0 / 3
    bias: bool = False
    act_layer: str = "hard_swish"
    norm_layer: str | None = "batchnorm"
    gate_layer: str = "sigmoid"
    has_skip: bool = False
    squeeze: str = "gap"

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        x = self.prepare(x)
        height, channels = x.shape[1], x.shape[-1]
        rows, cols = self.strips(x)
        y = jnp.concatenate([rows, cols], axis=1)[:, :, None, :]  # [B, H + W, 1, width]
        y = self.conv(self.factored_width(channels), bias=self.bias, name="conv1")(y)
        if self.norm_layer is not None:
            y = self.norm(self.norm_layer, train, "bn1", ("batchnorm",))(y)
        y = activation(self.act_layer)(y)
        gates_h = self.gate(self.conv(channels, bias=self.bias, name="conv_h")(y[:, :height]),
                            "gates_h")
        gates_w = self.gate(self.conv(channels, bias=self.bias, name="conv_w")(y[:, height:]),
                            "gates_w")
        return self.finish(x, gates_h * jnp.swapaxes(gates_w, 1, 2))


@ATTENTIONS.register("scoord")
class SimpleCoordinateAttention(_StripPools):
    """Simplified coordinate attention (timm ``SimpleCoordAttn``): Dense ``fc1`` shared
    by rows and columns (C -> ``make_divisible(C * rd_ratio * se_factor, rd_divisor)``),
    SiLU, then Dense ``fc_h`` / ``fc_w`` (-> C); one gate of the summed logits,
    ``x * gate(a_h + a_w)``."""

    rd_ratio: float = 0.25
    rd_channels: int | None = None
    rd_divisor: int = 8
    se_factor: float = 2.0 / 3
    bias: bool = True
    act_layer: str = "silu"
    gate_layer: str = "sigmoid"
    has_skip: bool = False
    squeeze: str = "gap"

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        x = self.prepare(x)
        channels = x.shape[-1]
        rows, cols = self.strips(x)
        fc1 = nn.Dense(self.factored_width(channels), use_bias=self.bias, dtype=self.dtype,
                       name="fc1")
        act = activation(self.act_layer)
        logits_h = nn.Dense(channels, use_bias=self.bias, dtype=self.dtype,
                            name="fc_h")(act(fc1(rows)))
        logits_w = nn.Dense(channels, use_bias=self.bias, dtype=self.dtype,
                            name="fc_w")(act(fc1(cols)))
        logits = (logits_h[:, :, None, :].astype(jnp.float32)
                  + logits_w[:, None, :, :].astype(jnp.float32))
        return self.finish(x, self.gate(logits))


class _StripConv(_Layer):
    """A depthwise convolution along one strip axis with ``nn.Conv``'s parameters for
    timm's ``Conv2d(C, C, (k, 1) or (1, k), groups=C)``: ``kernel [k, 1, 1, C]`` (rows,
    ``axis="h"``) or ``[1, k, 1, C]`` (columns, ``"w"``), optional ``bias [C]``; computed
    by ``depthwise_conv_1d`` on ``[B, L, C]`` strips, in float32, cast to the compute
    dtype."""

    axis: str
    kernel_size: int
    bias: bool
    dtype: Any = None

    @nn.compact
    def __call__(self, strips: Array) -> Array:
        channels, size = strips.shape[-1], self.kernel_size
        shape = (size, 1, 1, channels) if self.axis == "h" else (1, size, 1, channels)
        kernel = self.param("kernel", nn.initializers.lecun_normal(), shape, jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32) \
            if self.bias else None
        out = depthwise_conv_1d(strips, kernel.reshape(size, channels), bias)
        return out.astype(self.dtype or jnp.result_type(strips.dtype, jnp.float32))


class _DepthwiseStrips(_StripPools):
    """Depthwise 1-D convolutions along each strip: ``conv_h`` (kernel ``k x 1`` over
    the rows' vectors) and ``conv_w`` (``1 x k``), zero padding ``k // 2``, k odd."""

    def channel_strips(self, x: Array) -> tuple[Array, Array]:
        """``[B, H, W, C] -> ([B, H, C], [B, W, C])``: the strips with the squeeze's
        output folded back to ``C`` channels (``pooled_channels``)."""
        rows, cols = self.strips(x)
        channels = x.shape[-1]
        return (self.pooled_channels(rows, channels, self.squeeze),
                self.pooled_channels(cols, channels, self.squeeze))

    def strip_convs(self, rows: Array, cols: Array) -> tuple[Array, Array]:
        """``[B, H, C], [B, W, C] -> [B, H, 1, C], [B, 1, W, C]``."""
        size = self.kernel_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size % 2 == 0:
            raise ValueError(f"kernel_size={size!r} is not valid; it must be a positive odd "
                             "integer")
        h = _StripConv("h", size, self.bias, self.dtype, name="conv_h")(rows)
        w = _StripConv("w", size, self.bias, self.dtype, name="conv_w")(cols)
        return h[:, :, None, :], w[:, None, :, :]


@ATTENTIONS.register("ela")
class EfficientLocalAttention(_DepthwiseStrips):
    """Efficient local attention (Xu & Wan 2024; timm ``EfficientLocalAttn``): per strip
    a depthwise 1-D conv (``kernel_size`` 7, no bias), ``norm_h`` / ``norm_w``
    (GroupNorm with one group), SiLU and a gate: ``x * a_h * a_w``. No channel
    reduction."""

    kernel_size: int = 7
    bias: bool = False
    act_layer: str = "silu"
    gate_layer: str = "sigmoid"
    norm_layer: str | None = "groupnorm"
    has_skip: bool = False
    squeeze: str = "gap"

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        x = self.prepare(x)
        rows, cols = self.channel_strips(x)
        h, w = self.strip_convs(rows, cols)
        if self.norm_layer is not None:
            h = self.norm(self.norm_layer, train, "norm_h", ("groupnorm", "batchnorm"))(h)
            w = self.norm(self.norm_layer, train, "norm_w", ("groupnorm", "batchnorm"))(w)
        act = activation(self.act_layer)
        return self.finish(x, self.gate(act(h), "gates_h") * self.gate(act(w), "gates_w"))


@ATTENTIONS.register("strip")
class StripAttention(_DepthwiseStrips):
    """Strip attention (timm ``StripAttn``): ``x * gate(conv_h(x_h) + conv_w(x_w))``
    with the row and column pools broadcast over the map; ``use_conv=False`` drops the
    depthwise convolutions (``kernel_size`` 3, no bias)."""

    use_conv: bool = True
    kernel_size: int = 3
    bias: bool = False
    gate_layer: str = "sigmoid"
    has_skip: bool = False
    squeeze: str = "gap"

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        x = self.prepare(x)
        rows, cols = self.channel_strips(x)
        if self.use_conv:
            h, w = self.strip_convs(rows, cols)
        else:
            h, w = rows[:, :, None, :], cols[:, None, :, :]
        return self.finish(x, self.gate(h.astype(jnp.float32) + w.astype(jnp.float32)))


__all__ = [
    "ConvolutionalBlockAttention",
    "CoordinateAttention",
    "EfficientLocalAttention",
    "LightConvolutionalBlockAttention",
    "SimpleCoordinateAttention",
    "StripAttention",
]
